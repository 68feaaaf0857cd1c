import { clockId, mergeById, REPLAY_PAGE_BYTES, type DeliveryListener, type EventBus, type HistoryEntry, type OnceOutcome, type PublishItem, type PublishOnce, type ReplayResult, type SubscriptionListeners } from './bus'
import { frameWithId } from './framing'

/** An event kept in history, once however many channels keep it. */
interface StoredEvent {
  id: number
  channels: string[]
  /** What it costs, estimated: its frame, and an entry in each channel. */
  bytes: number
  /** Channels still keeping it. */
  holders: number
}

interface StoredEntry extends HistoryEntry {
  stored: StoredEvent
}

interface ChannelHistory {
  entries: StoredEntry[]
  /** Index of the oldest kept entry; entries before it were dropped. */
  head: number
  /**
   * Highest id trimmed from this channel (by HISTORY_SIZE or the memory cap;
   * with HISTORY_SIZE=0, its latest id, as nothing is kept); a cursor below
   * it has a gap ('trimmed').
   */
  droppedUpTo: number
  /**
   * Highest id dropped for its age. A cursor below it is older than the
   * window ('expired'), unless the clock went back since the drop: it
   * is checked too.
   */
  expiredUpTo: number
}

export interface MemoryBusOptions {
  historySize: number
  historyTtlS: number
  /** Memory the idempotency keys may take, estimated (the oldest go first). */
  maxOnceBytes?: number
  /** Memory the history may take, estimated (the oldest events go first); 0: no cap. */
  maxHistoryBytes?: number
}

/**
 * What an event kept in history costs beside its frame (the Buffer object,
 * its record, its slot in the queue, its channel list), and what each
 * channel's entry of it costs; measured with --expose-gc.
 */
const EVENT_BYTES = 320
const ENTRY_BYTES = 64
const NO_CHANNELS: string[] = []

/**
 * Put in a dropped entry's slot until the channel's list is compacted: a
 * channel with few events compacts rarely, and its dropped entries would
 * keep their frames alive meanwhile.
 */
const DROPPED: StoredEntry = { id: 0, frame: Buffer.alloc(0), stored: { id: 0, channels: NO_CHANNELS, bytes: 0, holders: 0 } }

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
  /** Events some channel keeps, oldest first from `storedHead` (those none keeps are skipped). */
  private stored: StoredEvent[] = []
  private storedHead = 0
  private storedBytes = 0
  /** Events of `stored` some channel still keeps. */
  private storedLive = 0

  constructor (private readonly options: MemoryBusOptions) {
    // Channels that went quiet are dropped once all their events are past the window.
    this.sweepTimer = setInterval(() => this.sweep(), Math.min(60_000, options.historyTtlS * 1000)).unref()
  }

  /** What the history takes, estimated as HISTORY_MAX_BYTES counts it. */
  historyBytes (): number {
    return this.storedBytes
  }

  /** Synchronous core of `publish`, for callers that must check state and publish in one step. */
  publishNow (items: PublishItem[]): number[] {
    const ids: number[] = []
    for (const item of items) {
      const id = Math.max(this.last + 1, clockId())
      this.last = id
      const kept = this.options.historySize > 0 && item.channels.length > 0
      const frame = frameWithId(id, item.body, kept)
      if (kept) {
        const stored: StoredEvent = { id, channels: item.channels, bytes: frame.length + EVENT_BYTES + ENTRY_BYTES * item.channels.length, holders: item.channels.length }
        this.stored.push(stored)
        this.storedBytes += stored.bytes
        this.storedLive++
        for (const name of item.channels) this.append(name, { id, frame, stored })
      } else {
        for (const name of item.channels) this.history(name).droppedUpTo = id
      }
      this.outbox.push({ channels: item.channels, id, frame })
      ids.push(id)
    }
    if (ids.length > 0) this.dropOldestOverBudget(ids[0])
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
    const tails: HistoryTail[] = []
    // Past the cursor by age: 'expired', unless trimmed too.
    let expired = after < cutoff
    for (const name of channels) {
      const history = this.histories.get(name)
      if (history === undefined) continue
      this.prune(history, cutoff)
      if (history.droppedUpTo > after) return { reset: 'trimmed', events: [] }
      if (history.expiredUpTo > after) expired = true
      tails.push({ entries: history.entries, next: this.firstAfter(history, after) })
    }
    if (expired) return { reset: 'expired', events: [] }
    return { reset: null, ...firstPage(tails) }
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

  async trimmed (channels: string[]): Promise<boolean> {
    return channels.some((name) => (this.histories.get(name)?.droppedUpTo ?? 0) > 0)
  }

  async listen (): Promise<void> {}
  unlisten (): void {}

  // Never lost: the listeners are never called.
  onSubscription (_listeners: SubscriptionListeners): void {}

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

  async watermark (): Promise<number> {
    // Events published but not yet handed out have lower ids: out first.
    if (this.flushScheduled) this.flush()
    this.last = Math.max(this.last + 1, clockId())
    return this.last
  }

  isReady (): boolean {
    return true
  }

  isAnswering (): boolean {
    return true
  }

  async close (): Promise<void> {
    clearInterval(this.sweepTimer)
    this.histories.clear()
    this.stored = []
    this.storedHead = 0
    this.storedBytes = 0
    this.storedLive = 0
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
      history = { entries: [], head: 0, droppedUpTo: 0, expiredUpTo: 0 }
      this.histories.set(name, history)
    }
    return history
  }

  private append (name: string, entry: StoredEntry): void {
    const history = this.history(name)
    history.entries.push(entry)
    if (history.entries.length - history.head > this.options.historySize) this.dropHead(history)
    this.prune(history, this.cutoff())
  }

  /** Drops a channel's oldest entry: trimmed, or `expired` for its age. */
  private dropHead (history: ChannelHistory, expired = false): void {
    const { stored } = history.entries[history.head]
    history.entries[history.head] = DROPPED
    if (expired) history.expiredUpTo = stored.id
    else history.droppedUpTo = stored.id
    history.head++
    if (--stored.holders === 0) this.forget(stored)
  }

  /** An event no channel keeps any more gives back its bytes and leaves the queue. */
  private forget (stored: StoredEvent): void {
    stored.holders = 0
    this.storedBytes -= stored.bytes
    this.storedLive--
    stored.channels = NO_CHANNELS
    // Mostly the oldest go first: the queue's head moves past them at once.
    while (this.storedHead < this.stored.length && this.stored[this.storedHead].holders === 0) this.storedHead++
    // Not when an old event stays (a quiet channel's) while busy channels
    // trim theirs behind it: the queue is rebuilt without the dropped ones
    // once they outnumber those kept.
    const dropped = this.stored.length - this.storedLive
    if (dropped > 1024 && dropped > this.storedLive) {
      this.stored = this.stored.slice(this.storedHead).filter((event) => event.holders > 0)
      this.storedHead = 0
    }
  }

  /**
   * Past the history's memory cap, the oldest events (published before
   * `publishedFrom`) leave every channel that keeps them: those channels'
   * cursors below them get 'trimmed', as after HISTORY_SIZE; channels that
   * never had them replay as before.
   */
  private dropOldestOverBudget (publishedFrom: number): void {
    const budget = this.options.maxHistoryBytes ?? 0
    if (budget === 0) return
    while (this.storedBytes > budget && this.storedHead < this.stored.length) {
      const oldest = this.stored[this.storedHead]
      // Never the events just published: one larger than the cap (many
      // lines, or a conversation of many members) stays until the next.
      if (oldest.id >= publishedFrom) break
      for (const name of oldest.channels) {
        const history = this.histories.get(name)
        // Older entries of the channel left before it: it is the head if the channel still keeps it.
        if (history !== undefined && history.head < history.entries.length && history.entries[history.head].stored === oldest) {
          this.dropHead(history)
          this.compact(history)
        }
      }
      // Never the case (see above), but the loop must end whatever the state.
      if (oldest.holders > 0) this.forget(oldest)
    }
  }

  private prune (history: ChannelHistory, cutoff: number): void {
    const { entries } = history
    while (history.head < entries.length && entries[history.head].id < cutoff) this.dropHead(history, true)
    this.compact(history)
  }

  private compact (history: ChannelHistory): void {
    const { entries } = history
    // Compact now and then instead of shifting on every drop.
    if (history.head > 64 && history.head * 2 > entries.length) {
      history.entries = entries.slice(history.head)
      history.head = 0
    }
  }

  /** The index of the first entry of `history` past `cursor`. */
  private firstAfter (history: ChannelHistory, cursor: number): number {
    const { entries } = history
    let low = history.head
    let high = entries.length
    while (low < high) {
      const mid = (low + high) >>> 1
      if (entries[mid].id <= cursor) low = mid + 1
      else high = mid
    }
    return low
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
      // Kept while a drop mark is inside the window: a cursor below it must still get its reset.
      if (history.head >= history.entries.length && Math.max(history.droppedUpTo, history.expiredUpTo) < cutoff) this.histories.delete(name)
    }
  }
}

/** A channel's history from a replay's cursor on: its entries from `next`. */
interface HistoryTail {
  entries: HistoryEntry[]
  next: number
}

/**
 * The first page of the tails merged in id order (an event on several of
 * them once), ended once its frames reach REPLAY_PAGE_BYTES: the page's entries are
 * the only references a slow replay holds, so history can let go of the rest.
 */
function firstPage (tails: HistoryTail[]): { events: HistoryEntry[], more?: true } {
  const events: HistoryEntry[] = []
  let bytes = 0
  for (;;) {
    let lowest: HistoryEntry | null = null
    for (const tail of tails) {
      const entry = tail.entries[tail.next]
      if (entry !== undefined && (lowest === null || entry.id < lowest.id)) lowest = entry
    }
    if (lowest === null) return { events }
    if (bytes >= REPLAY_PAGE_BYTES) return { events, more: true }
    for (const tail of tails) if (tail.entries[tail.next]?.id === lowest.id) tail.next++
    events.push(lowest)
    bytes += lowest.frame.length
  }
}
