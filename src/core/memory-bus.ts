import { clockId, mergeById, type DeliveryListener, type EventBus, type HistoryEntry, type OnceOutcome, type PublishItem, type PublishOnce, type ReplayResult } from './bus'
import { frameWithId } from './framing'

interface ChannelHistory {
  entries: HistoryEntry[]
  /** Index of the oldest kept entry; entries before it were dropped. */
  head: number
  /**
   * Highest id dropped from this channel (by size or age; with HISTORY_SIZE=0,
   * its latest id, as nothing is kept); a cursor below it has a gap.
   */
  droppedUpTo: number
}

export interface MemoryBusOptions {
  historySize: number
  historyTtlS: number
  /** Memory the idempotency keys may take, estimated (the oldest go first). */
  maxOnceBytes?: number
}

const MAX_ONCE_BYTES = 64 * 1024 * 1024

/** What a remembered key costs, as measured with --expose-gc: ≈ 0.4 KB, and ≈ 10 bytes per id of a batch. */
function onceCost (ids: number[]): number {
  return 420 + 11 * ids.length
}

/**
 * The embedded engine: one process, history in memory. Ids and appends happen
 * synchronously inside `publish`; fan-out runs on the next turn of the event
 * loop so a publisher is answered before subscribers are written to.
 */
export class MemoryBus implements EventBus {
  readonly mode = 'memory' as const
  private readonly histories = new Map<string, ChannelHistory>()
  private listener: DeliveryListener = () => {}
  private readonly outbox: Array<{ channels: string[], id: number, frame: Buffer }> = []
  private flushScheduled = false
  /** Nothing from before this store existed can be replayed. */
  private readonly epoch = clockId()
  private last = this.epoch
  private readonly sweepTimer: NodeJS.Timeout
  /** Idempotency keys used within their window, oldest first. */
  private readonly onceKeys = new Map<string, { fingerprint: string, ids: number[], expiresAt: number }>()
  private onceBytes = 0

  constructor (private readonly options: MemoryBusOptions) {
    // Channels that went quiet are dropped once all their events are past the window.
    this.sweepTimer = setInterval(() => this.sweep(), Math.min(60_000, options.historyTtlS * 1000)).unref()
  }

  /** Synchronous core of `publish`, for callers that must check state and publish in one step. */
  publishNow (items: PublishItem[]): number[] {
    const ids: number[] = []
    for (const item of items) {
      const id = Math.max(this.last + 1, clockId())
      this.last = id
      const frame = frameWithId(id, item.body)
      for (const name of item.channels) {
        if (this.options.historySize > 0) this.append(name, { id, frame })
        else this.history(name).droppedUpTo = id
      }
      this.outbox.push({ channels: item.channels, id, frame })
      ids.push(id)
    }
    if (!this.flushScheduled) {
      this.flushScheduled = true
      setImmediate(() => this.flush())
    }
    return ids
  }

  async publish (items: PublishItem[]): Promise<number[]> {
    return this.publishNow(items)
  }

  async publishOnce (items: PublishItem[], once: PublishOnce): Promise<OnceOutcome> {
    const now = Date.now()
    const seen = this.seenOnce(once, now)
    if (seen !== null) return seen
    const ids = this.publishNow(items)
    // Bounded: a publisher sending a new key with every event at a high rate
    // would otherwise hold the whole window's keys in memory.
    this.onceBytes += onceCost(ids)
    const budget = this.options.maxOnceBytes ?? MAX_ONCE_BYTES
    this.forgetOldestOnceKeys(() => this.onceBytes > budget)
    this.onceKeys.set(once.key, { fingerprint: once.fingerprint, ids, expiresAt: now + once.windowS * 1000 })
    return { kind: 'published', ids }
  }

  async usedOnce (once: PublishOnce): Promise<OnceOutcome | null> {
    return this.seenOnce(once, Date.now())
  }

  /** What the key answers at `now`, keys past their window forgotten first; null when it is unused. */
  private seenOnce (once: PublishOnce, now: number): OnceOutcome | null {
    this.forgetOldestOnceKeys((seen) => seen.expiresAt <= now)
    const seen = this.onceKeys.get(once.key)
    if (seen === undefined) return null
    return seen.fingerprint === once.fingerprint ? { kind: 'repeated', ids: seen.ids } : { kind: 'conflict' }
  }

  async replay (channels: string[], after: number): Promise<ReplayResult> {
    if (after > this.last) return { reset: 'future', events: [] }
    if (after < this.epoch) return { reset: 'unknown', events: [] }
    const cutoff = this.cutoff()
    // Trimming first, as the Redis bus does.
    const lists: HistoryEntry[][] = []
    for (const name of channels) {
      const history = this.histories.get(name)
      if (history === undefined) continue
      this.prune(history, cutoff)
      if (history.droppedUpTo > after) return { reset: 'trimmed', events: [] }
      lists.push(this.after(history, after))
    }
    if (after < cutoff) return { reset: 'expired', events: [] }
    return { reset: null, events: mergeById(lists) }
  }

  async window (channels: string[]): Promise<HistoryEntry[]> {
    const cutoff = this.cutoff()
    const lists: HistoryEntry[][] = []
    for (const name of channels) {
      const history = this.histories.get(name)
      if (history === undefined) continue
      this.prune(history, cutoff)
      lists.push(history.entries.slice(history.head))
    }
    return mergeById(lists)
  }

  async listen (): Promise<void> {}
  unlisten (): void {}

  onSubscription (): void {}

  heardAt (): number {
    return performance.now()
  }

  deliveredUpTo (): number {
    return this.last
  }

  onDelivery (listener: DeliveryListener): void {
    this.listener = listener
  }

  async lastId (): Promise<number> {
    return this.last
  }

  isReady (): boolean {
    return true
  }

  async close (): Promise<void> {
    clearInterval(this.sweepTimer)
    this.histories.clear()
  }

  /** Ids are clock microseconds, so an id below this one is older than the window. */
  private cutoff (): number {
    return clockId() - this.options.historyTtlS * 1_000_000
  }

  private flush (): void {
    this.flushScheduled = false
    const batch = this.outbox.splice(0)
    for (const { channels, id, frame } of batch) {
      for (const name of channels) this.listener(name, id, frame)
    }
  }

  private history (name: string): ChannelHistory {
    let history = this.histories.get(name)
    if (history === undefined) {
      history = { entries: [], head: 0, droppedUpTo: 0 }
      this.histories.set(name, history)
    }
    return history
  }

  private append (name: string, entry: HistoryEntry): void {
    const history = this.history(name)
    history.entries.push(entry)
    if (history.entries.length - history.head > this.options.historySize) {
      history.droppedUpTo = history.entries[history.head].id
      history.head++
    }
    this.prune(history, this.cutoff())
  }

  private prune (history: ChannelHistory, cutoff: number): void {
    const { entries } = history
    while (history.head < entries.length && entries[history.head].id < cutoff) {
      history.droppedUpTo = entries[history.head].id
      history.head++
    }
    // Compact now and then instead of shifting on every drop.
    if (history.head > 64 && history.head * 2 > entries.length) {
      history.entries = entries.slice(history.head)
      history.head = 0
    }
  }

  private after (history: ChannelHistory, cursor: number): HistoryEntry[] {
    const { entries } = history
    let low = history.head
    let high = entries.length
    while (low < high) {
      const mid = (low + high) >>> 1
      if (entries[mid].id <= cursor) low = mid + 1
      else high = mid
    }
    return entries.slice(low)
  }

  /** Forgets idempotency keys, oldest first, while `forget` says so. */
  private forgetOldestOnceKeys (forget: (seen: { ids: number[], expiresAt: number }) => boolean): void {
    // Every key gets the same window, so insertion order is expiry order.
    for (const [key, seen] of this.onceKeys) {
      if (!forget(seen)) break
      this.onceKeys.delete(key)
      this.onceBytes -= onceCost(seen.ids)
    }
  }

  private sweep (): void {
    const now = Date.now()
    this.forgetOldestOnceKeys((seen) => seen.expiresAt <= now)
    const cutoff = this.cutoff()
    for (const [name, history] of this.histories) {
      this.prune(history, cutoff)
      // Kept while its drop mark is inside the window: a cursor below it must still get 'trimmed'.
      if (history.head >= history.entries.length && history.droppedUpTo < cutoff) this.histories.delete(name)
    }
  }
}
