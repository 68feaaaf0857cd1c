import type { ServerResponse } from 'node:http'
import type { Socket } from 'node:net'

/**
 * The response Node's HTTP server is writing on a connection: the first of
 * those queued on it (pipelining), held until Node's own 'finish' handler
 * lets go of it, even once all its bytes are written. Null when none is.
 * Node keeps it in a field outside its typings, read here only.
 */
export function responseInFlight (socket: Socket): ServerResponse | null {
  return (socket as Socket & { _httpMessage?: ServerResponse | null })._httpMessage ?? null
}
