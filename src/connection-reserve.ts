import type { Server, ServerResponse } from 'node:http'
import type { Socket } from 'node:net'
import { DESCRIPTORS_KEPT } from './open-files'

/**
 * Past this many connections short of the open-file limit (both listeners
 * together), public connections doing nothing are closed: those that have
 * not sent a whole first request, and kept-alive ones between requests.
 * Streams stop DESCRIPTORS_KEPT short of the limit, so this leaves room for
 * other connections beside a full stream cap.
 */
export const RECLAIM_MARGIN = DESCRIPTORS_KEPT / 2
/** Past this many short of the limit, the public listener closes new connections at once: Redis and the log keep theirs. */
export const REFUSE_MARGIN = DESCRIPTORS_KEPT / 4
/**
 * Connections doing nothing for less than this are spared: one accepted a
 * moment ago is about to send its request (a probe, a browser's stream), and
 * a client pool sends its next request on one just answered.
 */
export const SPARED_MS = 1000

export interface ReserveLog {
  /** Connections doing nothing were closed to keep the reserve. */
  reclaimed: (closed: { beforeFirstRequest: number, betweenRequests: number }, connections: number) => void
  /** A connection was closed on arrival: the public listener was full. */
  refused: (connections: number) => void
}

/**
 * Keeps the descriptors of the open-file limit's reserve from idle
 * connections of the public listener. Streams are capped below the limit,
 * but a connection that never sends a request is held for a head's timeout
 * (60 s) and a kept-alive one for the keep-alive timeout (72 s): enough of
 * them, from a flood or a client pool gone wrong, took every descriptor, and
 * new connections (the health probe's among them) and Redis's reconnects
 * failed with EMFILE until they timed out.
 *
 * Closed, oldest first: connections past SPARED_MS without a whole first
 * request, and kept-alive ones whose last answer has gone out whole to the
 * kernel, with nothing queued behind it, for longer than that, having read
 * nothing meanwhile. Never a
 * stream (its first request came, and its response never finishes), an
 * answer still being written, or a connection of the internal listener
 * (publishers', counted but kept).
 */
export class ConnectionReserve {
  /** Public connections without a whole first request yet, since they came or last sent a byte: oldest first. */
  private readonly unrequested = new Map<Socket, Quiet>()
  /** Public kept-alive connections between requests, since their last answer finished or they last sent a byte: oldest first. */
  private readonly idle = new Map<Socket, Quiet>()
  private readonly publicSockets = new WeakSet<Socket>()
  private readonly servers: Server[] = []
  private readonly reclaimAt: number
  private readonly refuseAt: number
  // One listener function each for every socket and response: no closure per connection.
  private readonly forgetClosed: (this: Socket) => void
  private readonly noteAnswered: (this: ServerResponse) => void

  constructor (fileLimit: number, private readonly log: ReserveLog) {
    // (A limit of a few hundred keeps a share of it instead, not nothing.)
    this.reclaimAt = Math.max(fileLimit - RECLAIM_MARGIN, Math.ceil(fileLimit / 2))
    this.refuseAt = Math.max(fileLimit - REFUSE_MARGIN, Math.ceil(fileLimit * 3 / 4))
    const { unrequested, idle } = this
    this.forgetClosed = function (this: Socket) {
      unrequested.delete(this)
      idle.delete(this)
    }
    this.noteAnswered = function (this: ServerResponse) {
      const socket = this.req.socket as Socket & { _httpMessage?: ServerResponse | null }
      // A response to a request pipelined behind this one is on it now: not idle.
      if (socket.destroyed || (socket._httpMessage ?? null) !== null) return
      idle.set(socket, quietFromNow(socket))
    }
  }

  /** Counts `server`'s connections; those of the `public` listener may be closed, and past REFUSE_MARGIN refused. */
  watch (server: Server, isPublic: boolean): void {
    this.servers.push(server)
    server.on('connection', (socket: Socket) => {
      // (Counted already, this newcomer.) Not Node's maxConnections: it
      // closes a newcomer before any listener could make room for it.
      let connections = this.connections()
      if (connections >= this.reclaimAt) {
        this.reclaim()
        connections = this.connections()
      }
      if (!isPublic) return
      if (connections > this.refuseAt) {
        socket.destroy()
        this.log.refused(connections)
        return
      }
      this.publicSockets.add(socket)
      this.unrequested.set(socket, quietFromNow(socket))
      socket.on('close', this.forgetClosed)
    })
  }

  /** A whole request head has come on `socket`, to be answered with `response`. */
  requested (socket: Socket, response: ServerResponse): void {
    if (!this.publicSockets.has(socket)) return
    this.unrequested.delete(socket)
    this.idle.delete(socket)
    // Once the answer is in the kernel's hands; a stream's never is.
    response.on('finish', this.noteAnswered)
  }

  private connections (): number {
    let count = 0
    // Node's own count, kept up to date as connections come and close (the
    // public getConnections() answers in a callback).
    for (const server of this.servers) count += (server as Server & { _connections: number })._connections
    return count
  }

  private reclaim (): void {
    const spareFrom = Date.now() - SPARED_MS
    const connections = this.connections()
    // Maps keep insertion order: the oldest come first, and the first one
    // spared ends the walk, so a flood at the threshold costs little per arrival.
    const beforeFirstRequest = closeOlder(this.unrequested, spareFrom)
    const betweenRequests = closeOlder(this.idle, spareFrom)
    if (beforeFirstRequest + betweenRequests > 0) this.log.reclaimed({ beforeFirstRequest, betweenRequests }, connections)
  }
}

/** Since when a connection has done nothing, by what it had read then. */
interface Quiet {
  since: number
  bytesRead: number
}

function quietFromNow (socket: Socket): Quiet {
  return { since: Date.now(), bytesRead: socket.bytesRead }
}

/**
 * Closes the sockets of `quiet` that have done nothing since before
 * `spareFrom`; returns how many. One that has read bytes since it was
 * stamped (a head or a body still coming, a refused body read to its end)
 * is stamped again instead, and goes to the back.
 */
function closeOlder (quiet: Map<Socket, Quiet>, spareFrom: number): number {
  let closed = 0
  for (const [socket, stamp] of quiet) {
    if (stamp.since > spareFrom) break
    quiet.delete(socket)
    if (socket.bytesRead > stamp.bytesRead) {
      quiet.set(socket, quietFromNow(socket))
      continue
    }
    socket.destroy()
    closed++
  }
  return closed
}
