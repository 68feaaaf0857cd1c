import { STATUS_CODES } from 'node:http'
import type { Socket } from 'node:net'
import { responseInFlight } from './in-flight'

export function httpReason (statusCode: number): string {
  return STATUS_CODES[statusCode] ?? 'Error'
}

/**
 * Writes a refusal in the contract's shape straight to a connection, which
 * then closes: for requests Fastify never answers (refused by Node's parser,
 * CONNECT) or no longer can (a stream taken over from it). `headers` adds
 * to the fixed ones (CORS, so that a page can read the refusal; Retry-After).
 */
export function refuseOnSocket (socket: Socket, statusCode: number, code: string, message: string, headers: Record<string, string | number | string[]> = {}): void {
  // Not into a response already under way (a pipelined request's): it would
  // be spliced into its bytes. Node's own handler holds back alike.
  if (!socket.writable || responseInFlight(socket)?.headersSent === true) return
  const body = JSON.stringify({ statusCode, code, error: httpReason(statusCode), message })
  let head = `HTTP/1.1 ${statusCode} ${httpReason(statusCode)}\r\n`
  for (const [name, value] of Object.entries(headers)) {
    for (const item of Array.isArray(value) ? value : [value]) {
      const text = String(item)
      // Never let a value split the head.
      if (!/[\r\n]/.test(name) && !/[\r\n]/.test(text)) head += `${name}: ${text}\r\n`
    }
  }
  socket.write(`${head}Content-Type: application/json; charset=utf-8\r\nContent-Length: ${Buffer.byteLength(body)}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n${body}`)
}
