import type { StreamConnection } from './connection'
import type { Registry } from './registry'
import type { AdmittedEntry, ControlMessage, OpenTracker } from './state'
import type { StreamService } from './streams'

/** The reason of an eviction by the per-user limit (evict-oldest). */
export const LIMIT_EVICTION = 'too many streams for this user'

/** An open past its admission check that is not in the registry yet. */
export interface PendingOpen {
  readonly connectionId: string
  /** Its admission's seq, once admitted. */
  seq: number | null
  /** What its admission recorded, once admitted: written again if Redis loses it. */
  entry: AdmittedEntry | null
  /** Evicted meanwhile: why, and by the admission of which seq (the latest; Infinity: unknown). */
  evictedFor: string | null
  evictedAt: number
}

/**
 * This instance's side of the shared record of stream ids, between an open's
 * admission and its stream's close.
 *
 * Every admission of an id on one instance writes the same entry of the
 * shared record, and two opens of one id can be under way at once (a reopen
 * racing another, or racing the live holder it replaces). So the ledger
 * keeps the opens past their admission check and not yet in the registry,
 * and which ids' entries are left to the last stream or open of the id here
 * to give back. `Context` is what a release is logged with.
 */
export class AdmissionLedger<Context> {
  /**
   * Opens of each id past the admission check and not yet in the registry,
   * each noting whether it was evicted meanwhile: another open's admission
   * can evict it while it still waits on Redis, and it must end once
   * registered, or it would live on outside the per-user limit.
   */
  private readonly pendingById = new Map<string, Set<PendingOpen>>()
  /**
   * Ids whose stream (or admitted open) ended while another stream or open
   * of the id here went on, and their users: the last of them to end gives
   * the entry back.
   */
  private readonly releaseLeftTo = new Map<string, string>()
  /** What waits for the opens of an id to settle (untilOpened). */
  private readonly waitingForOpens = new Map<string, Array<() => void>>()

  constructor (
    private readonly registry: Registry,
    private readonly streams: StreamService,
    private readonly recordClose: (connectionId: string, userId: string, context: Context, graceMs?: number) => Promise<void>
  ) {}

  /** Tracks an open of `connectionId` from its admission check on; each open keeps its own record. */
  begin (connectionId: string): PendingOpen {
    const open: PendingOpen = { connectionId, seq: null, entry: null, evictedFor: null, evictedAt: -Infinity }
    let ofId = this.pendingById.get(connectionId)
    if (ofId === undefined) this.pendingById.set(connectionId, ofId = new Set())
    ofId.add(open)
    return open
  }

  /** The open is registered, or will never be. */
  leave (open: PendingOpen): void {
    const ofId = this.pendingById.get(open.connectionId)
    if (ofId === undefined || !ofId.delete(open) || ofId.size > 0) return
    this.pendingById.delete(open.connectionId)
    const waiting = this.waitingForOpens.get(open.connectionId)
    this.waitingForOpens.delete(open.connectionId)
    for (const settled of waiting ?? []) settled()
  }

  /**
   * Settles once no open of the id is between its admission check and the
   * registry (true), or after `timeoutMs` (false). A reopen that takes an id
   * over from another instance has that instance's stream evicted before it
   * registers its own: a change to the stream arriving then waits for it
   * here, rather than finding no stream.
   */
  async untilOpened (connectionId: string, timeoutMs: number): Promise<boolean> {
    if (!this.pendingById.has(connectionId)) return true
    return await new Promise<boolean>((resolve) => {
      const settled = (): void => {
        clearTimeout(timer)
        resolve(true)
      }
      const timer = setTimeout(() => {
        const waiting = this.waitingForOpens.get(connectionId)
        const rest = waiting?.filter((other) => other !== settled) ?? []
        if (rest.length > 0) this.waitingForOpens.set(connectionId, rest)
        else this.waitingForOpens.delete(connectionId)
        resolve(false)
      }, timeoutMs).unref()
      const waiting = this.waitingForOpens.get(connectionId)
      if (waiting === undefined) this.waitingForOpens.set(connectionId, [settled])
      else waiting.push(settled)
    })
  }

  /** The open's stream holds the id's entry now, and gives it back as it closes. */
  heldByStream (connectionId: string): void {
    this.releaseLeftTo.delete(connectionId)
  }

  /** The user whose entry of the id was left to the opens of the id here to give back, if any. */
  leftTo (connectionId: string): string | undefined {
    return this.releaseLeftTo.get(connectionId)
  }

  /**
   * Gives back the id's entry, unless a stream or open of the id here still
   * holds it: the last of them does. `graceMs`: the user's presence grace if
   * it was their last stream (see State.release).
   */
  async releaseUnlessHeld (connectionId: string, userId: string, context: Context, graceMs?: number): Promise<void> {
    if (this.registry.get(connectionId) !== undefined || this.pendingById.has(connectionId)) {
      this.releaseLeftTo.set(connectionId, userId)
      return
    }
    this.releaseLeftTo.delete(connectionId)
    await this.recordClose(connectionId, userId, context, graceMs)
  }

  /** The registered stream of the id that this admission opened, if it is the one registered. */
  ownStream (connectionId: string, admissionSeq: number): StreamConnection | undefined {
    const connection = this.registry.get(connectionId)
    return connection?.admissionSeq === admissionSeq ? connection : undefined
  }

  /**
   * Ends this instance's stream of an id that lost its entry in the shared
   * record, and, with `pendingToo`, the opens of the id that have not
   * registered yet (fresh ones, or reopens about to replace the stream,
   * which holds on to it until then). Only those admitted before the
   * eviction was decided (`decidedAt`, an admission's seq; null: all): an
   * eviction still in flight as the id is admitted again is not the newer
   * stream's.
   */
  evictHere (connectionId: string, reason: string, decidedAt: number | null, pendingToo: boolean): void {
    const connection = this.registry.get(connectionId)
    if (connection !== undefined && (decidedAt === null || connection.admissionSeq < decidedAt)) {
      this.streams.close(connection, 'evicted', 'evicted', { reason })
    }
    if (!pendingToo) return
    for (const pending of this.pendingById.get(connectionId) ?? []) {
      // Not admitted yet: whether the eviction is its own is known once it is.
      if (pending.seq !== null && decidedAt !== null && pending.seq > decidedAt) continue
      pending.evictedFor = reason
      pending.evictedAt = Math.max(pending.evictedAt, decidedAt ?? Infinity)
    }
  }

  /**
   * An eviction message aimed at this instance (or at whichever holds the id).
   * The limit's evictions, and a reopen's aimed at this instance, whose entry
   * in the shared record the newer stream elsewhere already took, also end an
   * open of the id still waiting to register. Not an untargeted reopen's
   * (from an instance of an earlier version): it moves the id to a newer
   * stream, and closing this one as evicted would give back the id's shared
   * record that the newer one may hold. (Of two opens of one id here, the
   * one admitted last holds it.)
   */
  applyEviction (message: Extract<ControlMessage, { type: 'evict' }>): void {
    this.evictHere(message.connectionId, message.reason, message.decidedAt, message.reason === LIMIT_EVICTION || message.instance !== null)
  }

  /** What the shared state needs to know of these opens when Redis comes back (see OpenTracker). */
  tracker (context: Context): OpenTracker {
    const pendingById = this.pendingById
    return {
      opening: function * () {
        for (const [connectionId, opens] of pendingById) {
          for (const open of opens) {
            // An open evicted by an admission after its own ends once
            // registered: its entry is not written again. (An eviction decided
            // before its admission was the id's earlier holder's.)
            const evicted = open.evictedFor !== null && open.seq !== null && open.evictedAt > open.seq
            yield { connectionId, seq: open.seq, admitted: evicted ? null : open.entry }
          }
        }
      },
      // A close recorded late, once Redis is back, follows the same rule: an
      // open of the id admitted meanwhile wrote the entry it would give back.
      releaseLate: async (connectionId, userId) => await this.releaseUnlessHeld(connectionId, userId, context)
    }
  }
}
