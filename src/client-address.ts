import { createHash } from 'node:crypto'
import { isIP } from 'node:net'

/**
 * The client's address as logs and limits name it. Behind a trusted proxy it
 * is taken from X-Forwarded-For, which may carry anything where an address
 * should be (a proxy that passes the header on without appending to it), a
 * token even: that is named by a digest of it, short, and unreadable in a log.
 */
export function clientAddress (ip: string): string {
  return isIP(ip) !== 0 ? ip : `other:${createHash('sha256').update(ip).digest('base64url').slice(0, 22)}`
}
