import { createHash } from 'node:crypto'
import { isIP } from 'node:net'

/**
 * The client's address as logs and limits name it. Behind a trusted proxy it
 * is taken from X-Forwarded-For, which may carry anything where an address
 * should be (a proxy that passes the header on without appending to it), a
 * token even: that is named by a digest of it, short, and unreadable in a log.
 * An address with its port is the address; a client already gone is `gone`.
 */
export function clientAddress (ip: string | undefined): string {
  // Fastify's request.ip, typed a string, is undefined once the client has
  // reset the connection (a tab closed while its stream opens).
  if (ip === undefined) return 'gone'
  if (isIP(ip) !== 0) return ip
  // Some proxies write the client's port too: 1.2.3.4:5678, [2001:db8::1]:5678.
  const withPort = /^(?:(\d{1,3}(?:\.\d{1,3}){3})|\[([0-9A-Fa-f:.]+)\]):\d{1,5}$/.exec(ip)
  const address = withPort?.[1] ?? withPort?.[2]
  if (address !== undefined && isIP(address) !== 0) return address
  return `other:${createHash('sha256').update(ip).digest('base64url').slice(0, 22)}`
}
