import type { Server } from 'node:http'
import type { Socket } from 'node:net'
import { DESCRIPTORS_KEPT } from './open-files'

/**
 * Past this many connections short of the open-file limit, those doing
 * nothing are closed: ones that have not sent a whole first request, and
 * kept-alive ones between requests. Streams stop DESCRIPTORS_KEPT short of
 * the limit, so this leaves room for other connections beside a full
 * stream cap.
 */
export const RECLAIM_MARGIN = DESCRIPTORS_KEPT / 2
/** Past this many short of the limit, the public listener closes new connections at once: Redis and the log keep theirs. */
export const REFUSE_MARGIN = DESCRIPTORS_KEPT / 4

export interface ReserveLog {
  /** Connections doing nothing were closed to keep the reserve: `unrequested` of them before their first request, and every kept-alive one between requests. */
  reclaimed: (unrequested: number, connections: number) => void
  /** A connection was closed on arrival: the public listener was full. */
  refused: (connections: number) => void
}

/**
 * Keeps the descriptors of the open-file limit's reserve from the listeners'
 * idle connections. Streams are capped below the limit, but a connection
 * that never sends a request is held for a head's timeout (60 s) and a
 * kept-alive one for the keep-alive timeout (72 s): enough of them, from a
 * flood or a client pool gone wrong, took every descriptor, and new
 * connections (the health probe's among them) and Redis's reconnects failed
 * with EMFILE until they timed out. Streams are never closed here: they
 * have left Node's list of HTTP connections (plugins/streams.ts), and their
 * first request came.
 */
export class ConnectionReserve {
  /** Connections that have not sent a whole first request head yet. */
  private readonly unrequested = new Set<Socket>()
  private readonly servers: Server[] = []
  private readonly forgetClosed: (this: Socket) => void
  private readonly reclaimAt: number
  private readonly refuseAt: number

  constructor (fileLimit: number, private readonly log: ReserveLog) {
    // (A limit of a few hundred keeps a share of it instead, not nothing.)
    this.reclaimAt = Math.max(fileLimit - RECLAIM_MARGIN, Math.ceil(fileLimit / 2))
    this.refuseAt = Math.max(fileLimit - REFUSE_MARGIN, Math.ceil(fileLimit * 3 / 4))
    const unrequested = this.unrequested
    // One listener function for every socket: no closure per connection.
    this.forgetClosed = function (this: Socket) { unrequested.delete(this) }
  }

  /** Counts `server`'s connections in the reserve; `refuseAtLimit` for the listener anyone can reach. */
  watch (server: Server, refuseAtLimit: boolean): void {
    this.servers.push(server)
    if (refuseAtLimit) {
      server.maxConnections = this.refuseAt
      server.on('drop', () => this.log.refused(this.connections()))
    }
    server.on('connection', (socket: Socket) => {
      // Before the newcomer joins those closed: it may be the health probe.
      if (this.connections() >= this.reclaimAt) this.reclaim()
      this.unrequested.add(socket)
      socket.on('close', this.forgetClosed)
    })
  }

  /** `socket` has sent a whole request head: no longer idle before its first request. */
  requested (socket: Socket): void {
    this.unrequested.delete(socket)
  }

  private connections (): number {
    let count = 0
    // Node's own count, kept up to date as connections come and close (the
    // public getConnections() answers in a callback).
    for (const server of this.servers) count += (server as Server & { _connections: number })._connections
    return count
  }

  private reclaim (): void {
    const connections = this.connections()
    const unrequested = this.unrequested.size
    for (const socket of this.unrequested) socket.destroy()
    this.unrequested.clear()
    // Those between two requests: their clients open another when they need one.
    for (const server of this.servers) server.closeIdleConnections()
    this.log.reclaimed(unrequested, connections)
  }
}
