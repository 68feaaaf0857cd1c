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
  name: string
  entries: StoredEntry[]
  /** Index of the oldest kept entry; entries before it were dropped. */
  head: number
  /**
   * Highest id trimmed from this channel (by HISTORY_SIZE or the memory cap;
   * with HISTORY_SIZE=0, its latest id, as nothing is kept; for a record
   * made after the cap let an earlier one go, its slot's mark in
   * `ForgottenMarks`); a cursor below it has a gap ('trimmed').
   */
  droppedUpTo: number
  /**
   * Highest id dropped for its age. A cursor below it is older than the
   * window ('expired'), unless the clock went back since the drop: it
   * is checked too.
   */
  expiredUpTo: number
  /** Neighbours in the list of channels that keep no event (see `EmptyChannels`). */
  emptyBefore: ChannelHistory | null
  emptyAfter: ChannelHistory | null
  listedEmpty: boolean
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
/**
 * What a channel's own record costs (its name, its map entry, its list),
 * measured with --expose-gc: kept after its events leave, so that a cursor
 * below them still gets its reset, it must count too.
 */
const CHANNEL_BYTES = 288
/**
 * How far before the window's cutoff a drop still counts: a reopen reads
 * its window a moment before it asks `trimmed`, whose cutoff is later.
 */
const DROP_SLACK_US = 1_000_000
const NO_CHANNELS: string[] = []
/** A slot of the table of forgotten drop marks: the mark (8 bytes) and whose it is (2). */
const MARK_SLOT_BYTES = 10
const MIN_MARK_SLOTS = 1024
const MAX_MARK_SLOTS = 4 * 1024 * 1024
/** The tag of a slot two channels let go within the window share: it answers for every channel. */
const SHARED = 0xffff

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
  /**
   * Records of channels that keep no event, in the order they were emptied
   * (with HISTORY_SIZE=0, last published to): past the cap they go, in
   * turn with the oldest events.
   */
  private readonly emptyChannels = new EmptyChannels()
  /**
   * Drop marks of channel records let go for the memory cap: a cursor
   * below its channel's, on a channel without a record or with one made
   * since, cannot tell whether it missed events.
   */
  private readonly forgotten: ForgottenMarks

  constructor (private readonly options: MemoryBusOptions) {
    this.forgotten = new ForgottenMarks(options.maxHistoryBytes ?? 0)
    // Channels that went quiet are dropped once all their events are past the window.
    this.sweepTimer = setInterval(() => this.sweep(), Math.min(60_000, options.historyTtlS * 1000)).unref()
  }

  /** What the history takes, estimated as HISTORY_MAX_BYTES counts it. */
  historyBytes (): number {
    return this.storedBytes + this.histories.size * CHANNEL_BYTES + this.forgotten.bytes()
  }

  /** Synchronous core of `publish`, for callers that must check state and publish in one step. */
  publishNow (items: PublishItem[]): number[] {
    const ids: number[] = []
    for (const item of items) {
      const id = Math.max(this.last + 1, clockId())
      this.last = id
      const kept = item.transient !== true && this.options.historySize > 0 && item.channels.length > 0
      const frame = frameWithId(id, item.body, kept)
      if (kept) {
        const stored: StoredEvent = { id, channels: item.channels, bytes: frame.length + EVENT_BYTES + ENTRY_BYTES * item.channels.length, holders: item.channels.length }
        this.stored.push(stored)
        this.storedBytes += stored.bytes
        this.storedLive++
        for (const name of item.channels) this.append(name, { id, frame, stored })
      } else if (item.transient !== true) {
        // (A transient event is not for replay, so a cursor below it missed nothing: no drop mark.)
        for (const name of item.channels) {
          const history = this.history(name)
          history.droppedUpTo = id
          // Moved to the back: the channels published to longest ago go first.
          this.emptyChannels.delete(history)
          this.emptyChannels.add(history)
        }
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
      if (history === undefined) {
        if (this.forgotten.of(name) > after) return { reset: 'trimmed', events: [] }
        continue
      }
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
    // A drop older than the window took nothing the window would still hold.
    const since = this.dropsCountFrom()
    return channels.some((name) => {
      const history = this.histories.get(name)
      return (history === undefined ? this.forgotten.of(name) : history.droppedUpTo) >= since
    })
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
    this.emptyChannels.clear()
    this.forgotten.clear()
    this.stored = []
    this.storedHead = 0
    this.storedBytes = 0
    this.storedLive = 0
  }

  /** Ids are clock microseconds, so an id below this one is older than the window. */
  private cutoff (): number {
    return clockId() - this.options.historyTtlS * 1_000_000
  }

  /** The oldest drop mark that still counts (see DROP_SLACK_US); at least 1, so an unset mark (0) never does, whatever the clock and the window. */
  private dropsCountFrom (cutoff = this.cutoff()): number {
    return Math.max(1, cutoff - DROP_SLACK_US)
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
      // The channel may be one whose record the cap let go, with its drop
      // marks: below its forgotten mark, it cannot tell what it lost.
      const forgottenMark = this.forgotten.of(name)
      // Most new channels have no mark: no clock read for them.
      const droppedUpTo = forgottenMark > 0 && forgottenMark >= this.dropsCountFrom() ? forgottenMark : 0
      history = { name, entries: [], head: 0, droppedUpTo, expiredUpTo: 0, emptyBefore: null, emptyAfter: null, listedEmpty: false }
      this.histories.set(name, history)
    }
    return history
  }

  private append (name: string, entry: StoredEntry): void {
    const history = this.history(name)
    if (history.head >= history.entries.length) {
      this.emptyChannels.delete(history)
      // A list of one, not push's room for 17: most of many channels keep one event or few.
      history.entries = [entry]
      history.head = 0
    } else {
      history.entries.push(entry)
    }
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
    if (history.head >= history.entries.length) this.emptyChannels.add(history)
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
   * never had them replay as before. Records of channels that keep no
   * event go too, in turn with the events by id, their marks kept in
   * `forgotten`.
   */
  private dropOldestOverBudget (publishedFrom: number): void {
    const budget = this.options.maxHistoryBytes ?? 0
    if (budget === 0) return
    let since: number | undefined
    while (this.historyBytes() > budget) {
      const oldest = this.storedHead < this.stored.length ? this.stored[this.storedHead] : undefined
      // Never the events just published: one larger than the cap (many
      // lines, or a conversation of many members) stays until the next.
      const droppable = oldest !== undefined && oldest.id < publishedFrom ? oldest : undefined
      const quietest = this.emptyChannels.oldest
      if (quietest !== null && (droppable === undefined || lastMark(quietest) < droppable.id)) {
        this.forgetChannel(quietest, since ??= this.dropsCountFrom())
        continue
      }
      if (droppable === undefined) break
      for (const name of droppable.channels) {
        const history = this.histories.get(name)
        // Older entries of the channel left before it: it is the head if the channel still keeps it.
        if (history !== undefined && history.head < history.entries.length && history.entries[history.head].stored === droppable) {
          this.dropHead(history)
          this.compact(history)
        }
      }
      // Never the case (see above), but the loop must end whatever the state.
      if (droppable.holders > 0) this.forget(droppable)
    }
  }

  /** Lets an empty channel's record go, its mark kept in `forgotten` if still inside the window (`since`: its cutoff, less the slack). */
  private forgetChannel (history: ChannelHistory, since: number): void {
    this.histories.delete(history.name)
    this.emptyChannels.delete(history)
    const mark = lastMark(history)
    if (mark >= since) this.forgotten.raise(history.name, mark, since)
  }

  private prune (history: ChannelHistory, cutoff: number): void {
    const { entries } = history
    while (history.head < entries.length && entries[history.head].id < cutoff) this.dropHead(history, true)
    this.compact(history)
  }

  private compact (history: ChannelHistory): void {
    const { entries } = history
    // An empty channel's list can be long (HISTORY_SIZE's worth of slots): it may stay for the window.
    if (history.head > 0 && history.head >= entries.length) {
      history.entries = []
      history.head = 0
      return
    }
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
    const since = this.dropsCountFrom(cutoff)
    for (const history of this.histories.values()) {
      this.prune(history, cutoff)
      // Kept while a drop mark is inside the window (unless the cap lets it go first: see `forgotten`): a cursor below it must still get its reset.
      if (history.head >= history.entries.length && lastMark(history) < since) this.forgetChannel(history, since)
    }
  }
}

/**
 * Channels' records that keep no event, oldest first: a list through the
 * records themselves, as a Set's iteration would step over every entry
 * deleted from its front since it was last rebuilt.
 */
class EmptyChannels {
  oldest: ChannelHistory | null = null
  private newest: ChannelHistory | null = null

  add (history: ChannelHistory): void {
    if (history.listedEmpty) return
    history.listedEmpty = true
    history.emptyBefore = this.newest
    history.emptyAfter = null
    if (this.newest === null) this.oldest = history
    else this.newest.emptyAfter = history
    this.newest = history
  }

  delete (history: ChannelHistory): void {
    if (!history.listedEmpty) return
    history.listedEmpty = false
    const { emptyBefore: before, emptyAfter: after } = history
    if (before === null) this.oldest = after
    else before.emptyAfter = after
    if (after === null) this.newest = before
    else after.emptyBefore = before
    history.emptyBefore = null
    history.emptyAfter = null
  }

  clear (): void {
    this.oldest = null
    this.newest = null
  }
}

/**
 * The drop marks of channel records let go, kept by a hash of the
 * channel's name in a table of fixed size. One mark for all would tell
 * every channel without a record that it may have missed events; the
 * table tells only those whose slot holds a mark within the window, and a
 * slot says whose mark it holds: a tag drawn from a second hash of the
 * name, or SHARED once two channels let go within the window met there.
 * So a channel that never had a record gets a reset only where two let
 * go within the window share its slot, or one whose tag is the same (1 in
 * 65 534), not wherever one let go hashed to its slot.
 * A slot's mark is its channels' highest; one older than the window is
 * nobody's any more and the next channel let go there takes the slot.
 * There is a power of two of slots, one for each 64 to 128 bytes of the
 * cap (at least 1 024, at most 4 M), of 10 bytes each: a thirteenth to a
 * sixth of the cap, at most 40 MB. Counted under the cap from the start,
 * though allocated when the first record goes: counted only then, the
 * first record let go under the default cap evicted the whole table's
 * worth of events at once (0.2-0.5 s with 32 MB).
 */
export class ForgottenMarks {
  private marks: Float64Array | null = null
  private tags: Uint16Array | null = null
  private readonly slots: number
  /** Where the last `locate` put the name: its slot, and its tag there. */
  private slot = 0
  private tag = 0

  /** `maxHistoryBytes` 0: no cap, so no record is ever let go. */
  constructor (maxHistoryBytes: number) {
    const wanted = Math.min(maxHistoryBytes / 64, MAX_MARK_SLOTS)
    this.slots = maxHistoryBytes === 0 ? 0 : 2 ** Math.floor(Math.log2(Math.max(MIN_MARK_SLOTS, wanted)))
  }

  bytes (): number {
    return this.slots * MARK_SLOT_BYTES
  }

  /** Keeps `mark` for `name`; `since`: the oldest mark that still counts (older ones are nobody's). */
  raise (name: string, mark: number, since: number): void {
    this.marks ??= new Float64Array(this.slots)
    this.tags ??= new Uint16Array(this.slots)
    this.locate(name)
    const held = this.marks[this.slot]
    if (held < since) {
      // Empty, or its channels' drops have left the window: this one's alone.
      this.marks[this.slot] = mark
      this.tags[this.slot] = this.tag
      return
    }
    if (this.tags[this.slot] !== this.tag) this.tags[this.slot] = SHARED
    if (mark > held) this.marks[this.slot] = mark
  }

  /** The highest mark let go that `name` may have had; 0 if none. */
  of (name: string): number {
    if (this.marks === null || this.tags === null) return 0
    this.locate(name)
    const tag = this.tags[this.slot]
    return tag === this.tag || tag === SHARED ? this.marks[this.slot] : 0
  }

  clear (): void {
    this.marks = null
    this.tags = null
  }

  /** The slot `name` hashes to. */
  slotOf (name: string): number {
    this.locate(name)
    return this.slot
  }

  /**
   * The slot: FNV-1a over the name's UTF-16 code units. The tag: a second
   * hash whose shifts feed high bits back into low ones, so that names
   * sharing FNV's low bits (a slot) do not share them here too.
   */
  private locate (name: string): void {
    let slotHash = 0x811c9dc5
    let tagHash = 0x9e3779b9
    for (let index = 0; index < name.length; index++) {
      const unit = name.charCodeAt(index)
      slotHash = Math.imul(slotHash ^ unit, 0x01000193)
      tagHash = Math.imul(tagHash ^ unit, 0x5bd1e995)
      tagHash ^= tagHash >>> 15
    }
    tagHash = Math.imul(tagHash ^ (tagHash >>> 13), 0xc2b2ae35)
    tagHash ^= tagHash >>> 16
    this.slot = (slotHash >>> 0) & (this.slots - 1)
    // 1 to 65 534: 0 is an empty slot's, 65 535 SHARED.
    this.tag = 1 + ((tagHash >>> 0) % (SHARED - 1))
  }
}

/** The newest id a channel let go, by trim or age. */
function lastMark (history: ChannelHistory): number {
  return Math.max(history.droppedUpTo, history.expiredUpTo)
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
