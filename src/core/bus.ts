/**
 * The seam between the gateway and its event engine. Two operations matter:
 *
 *  - `publish`: assign an id, append to each channel's history, fan out;
 *  - `replay`: read history after a cursor, merged across channels in id order.
 *
 * Ids are decimal integers seeded from the clock in microseconds and strictly
 * increasing across every channel of the deployment, so one `Last-Event-ID`
 * is a complete cursor for a stream that listens to many channels. The
 * in-memory bus serves one process; the Redis bus serves many.
 */

export interface PublishItem {
  /** Channels the event is appended to and fanned out on; one id for all. */
  channels: string[]
  /** Rendered `event:`/`data:` lines (see framing.ts), without the `id:` line. */
  body: string
  /**
   * Delivered live with an id, but kept in no channel's history: a reconnect
   * does not replay it, it pushes no other event out of the window, and a
   * cursor below it is not told of a gap (`skipHistory`).
   */
  transient?: boolean
}

/**
 * A publish made at most once per key within a window, so a publisher that
 * lost the answer can send it again without publishing it twice.
 */
export interface PublishOnce {
  /** Already scoped to the publisher. */
  key: string
  /** Identifies the request: the key sent again with another request is refused. */
  fingerprint: string
  windowS: number
}

/** `repeated`: the key was used within the window; nothing new was published. */
export type OnceOutcome =
  | { kind: 'published' | 'repeated', ids: number[] }
  | { kind: 'conflict' }

/**
 * Where a replay page ends: once its events reach this many bytes (so one
 * event may take it past them, and it holds one at least). A stream is
 * written one page at a time: a client replaying a long history of large
 * events slowly holds one page, not the whole history, and not events the
 * history has let go meanwhile. (In Redis mode, Redis runs nothing else while
 * it reads one.)
 */
export const REPLAY_PAGE_BYTES = 256 * 1024

export interface HistoryEntry {
  id: number
  frame: Buffer
}

/**
 * `more`: `events` is one page of what follows the cursor; a replay from the
 * last of them reads on.
 */
export type ReplayResult =
  | { reset: null, events: HistoryEntry[], more?: boolean }
  | { reset: ResetReason, events: [] }

/** The ingress lease a publish must be made under: its holder's instance id, and how long a retaken lease lasts. */
export interface LeaseFence {
  holder: string
  leaseMs: number
  /** The ingress message's place, `<marker>:<n>` (see LEASE in redis/scripts.ts), recorded as it is published; '' when not known. */
  position?: string
}

/** A fenced publish found another instance holding the lease: it published nothing. */
export class NotLeaseHolderError extends Error {
  constructor () {
    super('another instance holds the ingress lease')
  }
}

export type ResetReason = 'malformed' | 'future' | 'unknown' | 'expired' | 'trimmed' | 'unavailable'

export type DeliveryListener = (channel: string, id: number, frame: Buffer) => void

export interface SubscriptionListeners {
  lost: () => void
  restored: () => void
}

export interface EventBus {
  readonly mode: 'memory' | 'redis'
  /**
   * Ids in the order of `items`. Deliveries come later, never inside the call: the caller is answered
   * (a publisher gets its 202) before any stream is written to.
   * With `fence`, only while `fence.holder` holds the ingress lease (Redis mode): otherwise nothing is
   * published and it rejects with NotLeaseHolderError.
   */
  publish (items: PublishItem[], fence?: LeaseFence): Promise<number[]>
  /** `publish`, unless `once.key` was used within its window: then that publish's ids, atomically. */
  publishOnce (items: PublishItem[], once: PublishOnce): Promise<OnceOutcome>
  /** What `publishOnce` with `once` would answer without publishing, or null when its key is unused. */
  usedOnce (once: PublishOnce): Promise<OnceOutcome | null>
  /** Events of `channels` with an id above `after` that are still in the window, merged in id order (maybe one page: see ReplayResult). */
  replay (channels: string[], after: number): Promise<ReplayResult>
  /** Every event of `channels` still in the window, merged in id order. */
  window (channels: string[]): Promise<HistoryEntry[]>
  /**
   * Whether any of `channels` let an event go before its time (past
   * HISTORY_SIZE, a memory cap, an event too large to keep): their window
   * then lacks some of what they had. Embedded mode answers only for drops
   * inside the window (older ones took nothing the window would hold), and
   * past its memory cap also for a channel whose record it may have let go.
   */
  trimmed (channels: string[]): Promise<boolean>
  /** Start delivering `channel` to the listener; resolves once no later event can be missed. */
  listen (channel: string): Promise<void>
  unlisten (channel: string): void
  onDelivery (listener: DeliveryListener): void
  /**
   * Deliveries stop when the Redis bus loses its subscription (`lost`) and
   * are whole again once it has it back (`restored`): what was published in
   * between is in the history only. The in-memory bus never loses any.
   */
  onSubscription (listeners: SubscriptionListeners): void
  /**
   * The highest id delivered to this process so far (at start, the last one
   * issued): every event delivered from now on has a higher id.
   */
  deliveredUpTo (): number
  /**
   * When (performance.now()) the subscription was last known to work: every
   * event published before then has been delivered. A loss can be noticed
   * well after delivery stopped (a half-open connection); what it missed is
   * no older than this.
   */
  heardAt (): number
  /** The highest id issued so far. */
  lastId (): Promise<number>
  /**
   * An id issued to no event, once every event with a lower id that this
   * process is to deliver has been handed to its listener; every event
   * published later gets a higher one. Null when that cannot be told (the
   * subscription was lost meanwhile). A stream that has had nothing for long
   * is moved to it, so that its client's cursor stays inside the history
   * window (see StreamService).
   */
  watermark (): Promise<number | null>
  /** Connected to the store (always in embedded mode): streams may be opened. */
  isReady (): boolean
  /** The store answers: connected, and no command timed out since its last answer. */
  isAnswering (): boolean
  close (): Promise<void>
}

/** Microseconds since the epoch: ids stay increasing across restarts of the process or the store. */
export function clockId (): number {
  return Math.floor((performance.timeOrigin + performance.now()) * 1000)
}

/** Merges per-channel lists (each sorted by id) into one, dropping an event seen on two channels. */
export function mergeById (lists: HistoryEntry[][]): HistoryEntry[] {
  const nonEmpty = lists.filter((list) => list.length > 0)
  if (nonEmpty.length === 0) return []
  if (nonEmpty.length === 1) return nonEmpty[0]
  const all = nonEmpty.flat().sort((a, b) => a.id - b.id)
  const merged: HistoryEntry[] = []
  for (const entry of all) {
    if (merged.length === 0 || merged[merged.length - 1].id !== entry.id) merged.push(entry)
  }
  return merged
}
