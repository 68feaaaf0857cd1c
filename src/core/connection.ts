import type { HistoryEntry } from './bus'
import { NOT_PLACED } from './arena'
import { END_CHUNK, KEEPALIVE_FRAME } from './framing'

/** The writable end of a stream (a socket); frames written to it are complete chunks. */
export interface Sink {
  write (chunk: Buffer, callback?: (error?: Error | null) => void): boolean
  end (): void
  destroy (): void
  /**
   * Closes the connection at once with a reset, dropping what it has not
   * sent: a graceful close (`destroy`) leaves the kernel holding the unsent
   * bytes, up to the socket's send buffer (megabytes), for as long as the
   * peer keeps its end open without reading.
   */
  resetAndDestroy (): unknown
  readonly writableLength: number
  readonly destroyed: boolean
  /** Bytes of what it was given that it did not send (an HTTP/1.0 stream's chunk framing). */
  readonly droppedFraming?: number
  on (event: 'close', listener: () => void): unknown
  once (event: 'drain' | 'close' | 'finish', listener: () => void): unknown
  off (event: 'drain' | 'close', listener: () => void): unknown
}

export type CloseReason = 'client' | 'slow' | 'evicted' | 'expired' | 'shutdown' | 'completed' | 'error'
export type StreamKind = 'stream' | 'job' | 'jobs'

export interface ConnectionInit {
  id: string
  userId: string
  kind: StreamKind
  topics: Iterable<string>
  sink: Sink
  scheduler: WriteScheduler
  maxBufferedBytes: number
  /** When the token stops being valid, in ms since the epoch. */
  tokenExpiresAt: number | null
  /** Topic patterns the token allows (`*` wildcard), or null for any. */
  allowedTopics?: readonly string[] | null
  remoteAddress: string
  /** The id of the request that opened the stream, to tie log lines together. */
  requestId?: string
  /**
   * Takes the sink back once the stream's response has ended and the
   * connection may serve another request (one function for every stream);
   * without it the sink is closed.
   */
  handBack?: ((sink: Sink) => void) | null
}

/**
 * Coalesces the writes due on each socket into a single `write`: one syscall
 * and usually one TCP segment per socket, however many events arrived for it.
 * A large fan-out is flushed in slices with I/O in between, so publishers keep
 * being answered and events that arrive meanwhile join the writes still due.
 */
export class WriteScheduler {
  private dirty: StreamConnection[] = []
  private cursor = 0
  private scheduled = false

  // Short slices answer a publish sooner and let an event that arrives
  // mid-pass start its own sooner; longer ones only make a saturated burst
  // accept fewer events (bench/README.md has the trade-off measured).
  constructor (private readonly sliceMs = 2) {}

  mark (connection: StreamConnection): void {
    this.dirty.push(connection)
    if (!this.scheduled) {
      this.scheduled = true
      setImmediate(this.flushSome)
    }
  }

  private readonly flushSome = (): void => {
    const deadline = performance.now() + this.sliceMs
    const dirty = this.dirty
    let index = this.cursor
    while (index < dirty.length) {
      dirty[index++].flush()
      if ((index & 63) === 0 && performance.now() > deadline) break
    }
    if (index < dirty.length) {
      this.cursor = index
      setImmediate(this.flushSome)
      return
    }
    this.dirty = []
    this.cursor = 0
    this.scheduled = false
  }
}

function ignore (): void {}

// Copies of exact size: a push would reserve room for 16 more on every stream.
/** The list with `item` added, or null when it already holds it. */
function withItem (list: string[], item: string): string[] | null {
  return list.includes(item) ? null : [...list, item]
}

/** The list without `item`, or null when it does not hold it. */
function withoutItem (list: string[], item: string): string[] | null {
  const index = list.indexOf(item)
  return index === -1 ? null : list.filter((_, at) => at !== index)
}

/** A list kept as null while empty, with `item` in it or not: the same list when nothing changes. */
function toggled (list: string[] | null, item: string, present: boolean): string[] | null {
  const next = present ? withItem(list ?? [], item) : list === null ? null : withoutItem(list, item)
  if (next === null) return list
  return next.length === 0 ? null : next
}

/** User-wide topics a stream remembers leaving by its own request. */
const LEFT_ON_ITS_OWN_KEPT = 256
const REPLAY_CHUNK_BYTES = 64 * 1024
const DRAIN_WAIT_MS = 30_000
/** A held arena view's copy, shared by every stream holding that view; it lives as long as the view. */
const heldCopies = new WeakMap<Buffer, Buffer>()

/** The most bytes of small pieces joined into one write when more than the bound is due (see flushPiecewise). */
const PIECE_GROUP_BYTES = 64 * 1024

/** Whether kept, `bytes` would keep alive a buffer more than twice its size (an arena slab, say). */
function viewOfLarger (bytes: Buffer): boolean {
  return bytes.buffer.byteLength > 2 * bytes.length
}

/** How long a closed stream's last bytes may take to flush before the socket is destroyed anyway. */
export const CLOSE_GRACE_MS = 5000

/** Channels a stream joined and left while its replay was written. */
export interface ReplayChanges {
  /** Each with the last id issued before it joined: what it had before is not the stream's. */
  joined: Map<string, number>
  /** Left: the replay reads no more of them (one joined again is in `joined`, from then). */
  left: Set<string>
}

export class StreamConnection {
  readonly id: string
  readonly userId: string
  readonly kind: StreamKind
  // Topics and channels are short lists on every one of tens of thousands of
  // streams: arrays cost a fraction of a Set's hash table.
  private topicList: string[]
  private channelList: string[] = []
  /** Topics held only for the user's user-wide subscription (null: none, the usual case). */
  private userWideOnly: string[] | null = null
  /** Topics the stream holds of its own that its user's subscription covers too (null: none, the usual case). */
  private alsoForUser: string[] | null = null
  /** User-wide topics the stream left by its own request (null: none, the usual case). */
  private leftByItself: string[] | null = null
  readonly openedAt = Date.now()
  readonly remoteAddress: string
  readonly allowedTopics: readonly string[] | null
  readonly requestId: string | undefined
  tokenExpiresAt: number | null
  /** Id of the last event written or queued: deliveries at or below it are duplicates. */
  lastId = 0
  /**
   * Events up to this id are not the stream's to catch up after a loss:
   * delivered to the process before it opened, issued before it was
   * admitted, or (reopened without a cursor) on its channels before it joined them.
   */
  baseline = 0
  /** The client was sent `reset`, and still holds the cursor that got it: moved at the next chance. */
  cursorBehind = false
  /** Set while the stream catches up after the bus lost its subscription: replayed from above this id. */
  catchUpFrom: number | null = null
  /** When (performance.now()) the bus last knew its subscription whole before the outage that set `catchUpFrom`: nothing it missed is older. */
  catchUpSince = 0
  /** From the stream's head until it goes live: the subscriptions changed meanwhile, which its replay and a read-back honour (see StreamService.open). */
  replayChanges: ReplayChanges | null = null
  eventsSent = 0
  /** Bytes handed to the sink, chunk framing included. */
  private bytesGiven = 0
  lastWriteAt = Date.now()
  closeReason: CloseReason | null = null
  /** When set, the stream ends after the first event for which it returns true. */
  closeAfter: ((frame: Buffer) => boolean) | null = null
  /** Another stream of this instance took over this id: the id's shared records are that stream's now. */
  replaced = false
  /**
   * What an open still joining its channels sends first once it is done
   * (`retry`, `connected`): a close meanwhile (an eviction by a newer stream
   * of the user) writes them after the head, so that every stream that
   * answers 200 begins with `connected`.
   */
  framesBeforeClose: readonly Buffer[] | null = null
  /** Its admission's seq (SharedState.admit): evictions decided before it are not this stream's. */
  admissionSeq = 0
  /** Called once, when the stream closes for any reason (one function shared by every stream). */
  onClose: (connection: StreamConnection) => void = ignore

  private readonly sink: Sink
  private readonly handBack: ((sink: Sink) => void) | null
  private readonly scheduler: WriteScheduler
  private readonly maxBufferedBytes: number
  /** Live events that arrive while history is being replayed; null once live. */
  private held: HistoryEntry[] | null = []
  private heldBytes = 0
  /**
   * Held events past the buffer bound were let go, to be read back from
   * history (every delivered event was stored there first) when the
   * stream's open ends its hold: a replay that outlasts a bound's worth of
   * live traffic is the length of the backlog, not a slow reader. A
   * catch-up after a lost subscription closes such a stream as slow instead.
   */
  private heldLetGo = false
  /** A replay's write waits for the reader to drain it (writeAndPace). */
  private pacing = false
  /**
   * What the held frames keep alive: each is a view of a shared arena slab,
   * which lives as long as one view of it does. A hold that lasts (a slow
   * replay) while sparse events arrive would keep a whole slab per event.
   */
  private heldSlabBytes = 0
  private lastHeldSlab: ArrayBufferLike | null = null
  /** Held frames before this index are copies already. */
  private heldCompacted = 0
  // What the next write holds: earlier pieces, then a run of frames that lie
  // back to back in one buffer (see FrameArena), which goes out as one view.
  private pieces: Buffer[] | null = null
  private run: Buffer | null = null
  private runBytes = 0
  /** The arena placement of the run's last frame. */
  private runPlacement = NOT_PLACED
  private pendingBytes = 0
  /** Bytes Node held unsent for the socket after the last write; it only shrinks until the next. */
  private unsentAtLastWrite = 0
  /**
   * The largest frame among the bytes held, pending or unsent (an upper
   * bound: it drops back only once a write leaves nothing unsent). One event
   * may render larger than MAX_BUFFERED_BYTES (a string of many short lines
   * gets a `data: ` prefix on each), and a reader keeping up must not be
   * called slow for the size of that event: the bound is on what is behind
   * it, MAX_BUFFERED_BYTES beyond the largest frame.
   */
  private largestFrame = 0
  private queued = false

  constructor (init: ConnectionInit) {
    this.id = init.id
    this.userId = init.userId
    this.kind = init.kind
    this.topicList = [...new Set(init.topics)]
    this.sink = init.sink
    this.handBack = init.handBack ?? null
    this.scheduler = init.scheduler
    this.maxBufferedBytes = init.maxBufferedBytes
    this.tokenExpiresAt = init.tokenExpiresAt
    this.remoteAddress = init.remoteAddress
    this.allowedTopics = init.allowedTopics ?? null
    this.requestId = init.requestId
    // 'close' fires once; `on` spares the wrapper objects `once` allocates.
    init.sink.on('close', this.onSinkClose)
  }

  get topics (): readonly string[] {
    return this.topicList
  }

  /** Channels this stream is joined to in the hub. */
  get channels (): readonly string[] {
    return this.channelList
  }

  /** Returns false when the stream already had the topic. */
  addTopic (topic: string): boolean {
    const next = withItem(this.topicList, topic)
    if (next === null) return false
    this.topicList = next
    return true
  }

  /** Returns false when the stream did not have the topic. */
  removeTopic (topic: string): boolean {
    const next = withoutItem(this.topicList, topic)
    if (next === null) return false
    this.topicList = next
    this.keepTopic(topic)
    return true
  }

  /**
   * While the stream's open reads its user's user-wide topics: the ones a
   * user-wide unsubscribe took away meanwhile, which that read may still
   * return. Null otherwise.
   */
  userTopicsLeftWhileReading: Set<string> | null = null

  /** Notes that the stream holds `topic` only for its user's user-wide subscription. */
  holdForUser (topic: string): void {
    this.userWideOnly = toggled(this.userWideOnly, topic, true)
  }

  /** The stream holds `topic` of its own (`?topics=`, its own subscription), whatever its user's do. */
  keepTopic (topic: string): void {
    this.userWideOnly = toggled(this.userWideOnly, topic, false)
  }

  /**
   * Its user's subscription brought `asked` to the stream, which joined
   * `added` of them: those it holds for its user alone, the others of its
   * own as well (unless already held for its user).
   */
  joinedForUser (asked: readonly string[], added: readonly string[]): void {
    for (const topic of added) this.holdForUser(topic)
    for (const topic of asked) if (!added.includes(topic) && !this.heldForUser(topic)) this.coveredForUser(topic, true)
  }

  /** The topics the stream holds only for its user's user-wide subscription. */
  get userWideTopics (): readonly string[] {
    return this.userWideOnly ?? []
  }

  /** Whether the stream holds `topic` only for its user's user-wide subscription, which may take it away. */
  heldForUser (topic: string): boolean {
    return this.userWideOnly?.includes(topic) === true
  }

  /**
   * Notes whether its user's subscription covers `topic` too, which the
   * stream holds of its own: leaving it, the stream leaves one of its
   * user's topics (see leftOnItsOwn).
   */
  coveredForUser (topic: string, covered: boolean): void {
    this.alsoForUser = toggled(this.alsoForUser, topic, covered)
  }

  /** Whether its user's subscription covers `topic`, held for it alone or of the stream's own too. */
  isForUser (topic: string): boolean {
    return this.heldForUser(topic) || this.alsoForUser?.includes(topic) === true
  }

  /**
   * Notes whether the stream left its user's user-wide `topic` by its own
   * request (true), or whether that no longer stands: the stream or its user
   * changed the topic again (false). Bringing the stream back in line with
   * its user's topics leaves such a topic out.
   */
  leftOnItsOwn (topic: string, left: boolean): void {
    const next = toggled(this.leftByItself, topic, left)
    // Bounded like the topics a stream holds: the oldest go first.
    this.leftByItself = next !== null && next.length > LEFT_ON_ITS_OWN_KEPT ? next.slice(-LEFT_ON_ITS_OWN_KEPT) : next
  }

  /** Whether the stream left its user's user-wide `topic` by its own request. */
  hasLeftOnItsOwn (topic: string): boolean {
    return this.leftByItself?.includes(topic) === true
  }

  addChannel (name: string): boolean {
    const next = withItem(this.channelList, name)
    if (next === null) return false
    this.channelList = next
    return true
  }

  removeChannel (name: string): boolean {
    const next = withoutItem(this.channelList, name)
    if (next === null) return false
    this.channelList = next
    return true
  }

  get closed (): boolean {
    return this.closeReason !== null
  }

  /** Bytes of the response sent so far, head included. */
  get bytesSent (): number {
    return this.bytesGiven - (this.sink.droppedFraming ?? 0)
  }

  get live (): boolean {
    return this.held === null && !this.closed
  }

  /** A published event from any of this stream's channels; `placement` as FrameArena numbers it. */
  deliver (id: number, frame: Buffer, placement = NOT_PLACED): void {
    if (this.closed || id <= this.lastId) return
    if (this.held !== null) {
      this.held.push({ id, frame })
      this.heldBytes += frame.length
      if (frame.length > this.largestFrame) this.largestFrame = frame.length
      if (this.heldBytes > this.bufferBound()) {
        this.setHeld([])
        this.heldLetGo = true
        return
      }
      if (frame.buffer !== this.lastHeldSlab) {
        this.lastHeldSlab = frame.buffer
        this.heldSlabBytes += frame.buffer.byteLength
        // Twice the bound: the copy then happens at most once per bound's worth of new slabs.
        if (this.heldSlabBytes > 2 * this.bufferBound()) this.compactHeld()
      }
      return
    }
    this.lastId = id
    this.eventsSent++
    this.enqueue(frame, placement)
    if (this.closeAfter?.(frame) === true) this.close('completed')
  }

  /**
   * Moves the client's cursor to `id`, an id no event has (see
   * EventBus.watermark), with `frame`, its `id:` line alone: a browser takes
   * the id and dispatches nothing. Only a live stream, and only forward.
   */
  moveCursor (id: number, frame: Buffer): boolean {
    if (!this.live) return false
    // An event sent since moved the client's cursor already.
    this.cursorBehind = false
    if (id <= this.lastId) return false
    this.lastId = id
    this.enqueue(frame, NOT_PLACED)
    return !this.closed
  }

  /**
   * Queues the response head without scheduling a write (counted as queued,
   * it is in no scheduler's list): it goes out with `connected` once
   * releaseHead is called, as the contract flushes them at once, or with
   * the frame a close writes. In between, joining channels may wait on Redis.
   */
  holdHead (head: Buffer): void {
    this.queued = true
    this.enqueue(head, NOT_PLACED)
  }

  releaseHead (): void {
    if (this.closed) return
    this.queued = true
    this.scheduler.mark(this)
  }

  /** Bytes without an id (response head, system event, comment), queued after what is already due. */
  sendSystem (frame: Buffer): void {
    if (this.closed) return
    this.enqueue(frame, NOT_PLACED)
  }

  /**
   * Writes history with backpressure: a slow reader is paced, not dropped.
   * With `withHeld`, the live events held so far up to the newest of
   * `entries` are written with them, in id order; the others stay held, for
   * the next page of history or `goLive`. A caller whose history does not
   * cover every channel needs it: an event held with an id below the
   * history's newest would otherwise be taken for a duplicate by `goLive`.
   */
  async replay (entries: HistoryEntry[], withHeld = false): Promise<number> {
    if (withHeld && entries.length > 0) {
      const due = this.takeHeldUpTo(entries[entries.length - 1].id)
      // Held arrivals may repeat an id (one event on two channels) or one of
      // `entries`: sorted, the lastId check below writes each once.
      if (due.length > 0) entries = [...entries, ...due].sort((a, b) => a.id - b.id)
    }
    // What is already queued (connected, reset) goes first.
    this.flush()
    let chunk: Buffer[] = []
    let chunkBytes = 0
    let sent = 0
    // Counted as they are written, before the stream may close while they
    // pace: the caller counts the same events as replayed, and a closed
    // stream's count is taken when it closes.
    const write = async (): Promise<void> => {
      sent += chunk.length
      this.eventsSent += chunk.length
      await this.writeAndPace(chunk, chunkBytes)
    }
    for (const entry of entries) {
      if (this.closed) return sent
      if (entry.id <= this.lastId) continue
      this.lastId = entry.id
      chunk.push(entry.frame)
      chunkBytes += entry.frame.length
      // A job stream's terminal update ends it, replayed or live.
      if (this.closeAfter?.(entry.frame) === true) {
        await write()
        this.close('completed')
        return sent
      }
      if (chunkBytes >= REPLAY_CHUNK_BYTES) {
        await write()
        chunk = []
        chunkBytes = 0
      }
    }
    if (chunk.length > 0) await write()
    return sent
  }

  /**
   * Back to the setup phase for a live stream, to replay what it may have
   * missed: live events are held until `goLive`. False if it is not live.
   */
  hold (): boolean {
    if (!this.live) return false
    this.setHeld([])
    return true
  }

  /** Takes the held events up to `id` out of the hold; later ones stay. */
  private takeHeldUpTo (id: number): HistoryEntry[] {
    const held = this.held
    if (held === null || held.length === 0) return []
    const due: HistoryEntry[] = []
    const kept: HistoryEntry[] = []
    let keptBytes = 0
    let keptCopies = 0
    for (let index = 0; index < held.length; index++) {
      const entry = held[index]
      if (entry.id <= id) {
        due.push(entry)
        continue
      }
      kept.push(entry)
      keptBytes += entry.frame.length
      // The copies come first, in order: those kept stay first.
      if (index < this.heldCompacted) keptCopies++
    }
    if (due.length === 0) return due
    if (kept.length === 0) {
      this.setHeld([])
      return due
    }
    this.held = kept
    this.heldBytes = keptBytes
    this.heldCompacted = keptCopies
    return due
  }

  private setHeld (held: HistoryEntry[] | null): void {
    this.held = held
    this.heldBytes = 0
    this.heldSlabBytes = 0
    this.lastHeldSlab = null
    this.heldCompacted = 0
  }

  /**
   * The held frames that are views of a slab, copied so that the slabs can
   * go. Every stream holding an event holds the same view (see Hub), and a
   * lost subscription holds them all at once: each view is copied once,
   * whichever stream gets to it first, and frames copied before are skipped.
   */
  private compactHeld (): void {
    const held = this.held
    if (held === null) return
    let bytes = 0
    for (let index = this.heldCompacted; index < held.length; index++) {
      const frame = held[index].frame
      if (viewOfLarger(frame) && !heldCopies.has(frame)) bytes += frame.length
    }
    // One buffer of their own for the new copies: in Node's shared pool a
    // small copy would keep a pool slab alive with whatever else is in it.
    const copies = Buffer.allocUnsafeSlow(bytes)
    let offset = 0
    for (let index = this.heldCompacted; index < held.length; index++) {
      const entry = held[index]
      const frame = entry.frame
      if (!viewOfLarger(frame)) continue
      let copy = heldCopies.get(frame)
      if (copy === undefined) {
        copy = copies.subarray(offset, offset + frame.length)
        frame.copy(copy)
        offset += frame.length
        heldCopies.set(frame, copy)
      }
      entry.frame = copy
    }
    this.heldCompacted = held.length
    this.lastHeldSlab = null
    this.heldSlabBytes = 0
  }

  /** Whether held events were let go since the last call: they are to be read back from history before `goLive`. */
  takeHeldLetGo (): boolean {
    const letGo = this.heldLetGo
    this.heldLetGo = false
    return letGo
  }

  /** Ends the setup phase: events held during replay go out in order, then live delivery. */
  goLive (): void {
    const held = this.held
    this.setHeld(null)
    if (held === null || this.closed) return
    for (const { id, frame } of held) this.deliver(id, frame)
  }

  keepalive (idleSince: number): void {
    // Not while a replay waits for its reader: its bytes are on their way,
    // and one more write would find them unsent, past a small bound, and
    // take the stream for a slow consumer.
    if (this.pacing) return
    if (!this.closed && this.lastWriteAt <= idleSince && this.pendingBytes === 0) this.enqueue(KEEPALIVE_FRAME, NOT_PLACED)
  }

  flush (): void {
    this.queued = false
    if (this.closed) return
    const pieces = this.pieces
    if (pieces !== null && this.run !== null && this.pendingBytes + this.unsentAtLastWrite > this.bufferBound()) {
      pieces.push(this.runView(this.run))
      this.flushPiecewise(pieces)
      return
    }
    const chunk = this.takePending()
    if (chunk === null) return
    this.writeDue(chunk)
    this.judgeUnsent()
  }

  private writeDue (chunk: Buffer): void {
    // Behind a backed-up socket Node queues the write, and a view would keep
    // its whole slab alive for as long: such a socket gets its own copy.
    this.writeRaw(this.unsentAtLastWrite > 0 && viewOfLarger(chunk) ? Buffer.from(chunk) : chunk)
  }

  /** After the writes of a flush: what the socket left unsent past the bound makes the stream slow. */
  private judgeUnsent (): void {
    if (this.unsentAtLastWrite === 0) this.largestFrame = 0
    else if (this.unsentAtLastWrite > this.bufferBound()) this.close('slow')
  }

  /**
   * More is due than the bound, in pieces: joined, they would be a copy of
   * all of it for this stream alone, and a burst to many stalled streams
   * multiplied the process's memory by their number. They go out a group at
   * a time (small pieces in a row joined up to PIECE_GROUP_BYTES, a larger
   * one alone as its view: a write per piece made interleaved channels' many
   * small pieces 20 times slower to deliver) while the socket takes them;
   * once it holds bytes back with more than the bound still to come, the
   * stream is slow.
   */
  private flushPiecewise (pieces: Buffer[]): void {
    let remaining = this.pendingBytes
    this.clearPending()
    this.unsentAtLastWrite = this.sink.writableLength
    for (let start = 0; start < pieces.length;) {
      if (this.unsentAtLastWrite > 0 && this.unsentAtLastWrite + remaining > this.bufferBound()) {
        this.close('slow')
        return
      }
      let end = start + 1
      let bytes = pieces[start].length
      while (end < pieces.length && bytes + pieces[end].length <= PIECE_GROUP_BYTES) bytes += pieces[end++].length
      this.writeDue(end - start === 1 ? pieces[start] : Buffer.concat(pieces.slice(start, end), bytes))
      start = end
      remaining -= bytes
    }
    this.judgeUnsent()
  }

  private bufferBound (): number {
    return this.maxBufferedBytes + this.largestFrame
  }

  /**
   * Closes the stream, after a last frame if the socket can still take it. A
   * client that does not read what is left gets `graceMs`, then its socket goes.
   */
  close (reason: CloseReason, lastFrame?: Buffer, graceMs = CLOSE_GRACE_MS): void {
    if (this.closed) return
    this.closeReason = reason
    this.setHeld(null)
    const pending = this.takePending()
    if (!this.sink.destroyed) {
      if (reason === 'slow' || reason === 'error') {
        // Whatever is unsent will never be read; release it now, the kernel's copy too.
        this.sink.resetAndDestroy()
      } else {
        const last: Buffer[] = pending === null ? [] : [pending]
        if (this.framesBeforeClose !== null) last.push(...this.framesBeforeClose)
        if (lastFrame !== undefined) last.push(lastFrame)
        last.push(END_CHUNK)
        this.sink.off('close', this.onSinkClose)
        // The response is complete, and a client or proxy keeping the
        // connection alive may send its next request on it once it has read
        // it: flushed, the connection is handed back to serve it like any
        // other. Closing instead raced that request (ECONNRESET, or 502 for
        // a POST through nginx's upstream keepalive). Not while the server
        // shuts down, which must not be handed new connections.
        const handBack = reason === 'shutdown' ? null : this.handBack
        const sink = this.sink
        // A client that stopped reading never lets the end flush: its socket
        // goes after a grace period, with what it never read.
        const done = (flushed: boolean): void => {
          clearTimeout(grace)
          if (sink.destroyed) return
          if (!flushed) sink.resetAndDestroy()
          else if (handBack !== null) handBack(sink)
          else sink.destroy()
        }
        const grace = setTimeout(done, graceMs, false)
        grace.unref()
        const end = Buffer.concat(last)
        this.bytesGiven += end.length
        if (handBack !== null) {
          // Called once everything before it has gone to the kernel, or with an error.
          sink.write(end, (error) => done(error === undefined || error === null))
        } else {
          sink.write(end)
          sink.end()
          sink.once('finish', () => done(true))
          sink.once('close', () => done(false))
        }
      }
    }
    this.onClose(this)
  }

  /**
   * For a stream that failed while opening: when nothing of it has been
   * written yet (its head still held), closes it ('error') and leaves its
   * socket to the caller, which can then answer the failure as an HTTP error
   * instead of an empty reply. False, with nothing done, otherwise.
   */
  closeUnwritten (): boolean {
    if (this.closed || this.bytesGiven > 0 || this.sink.destroyed) return false
    this.closeReason = 'error'
    this.setHeld(null)
    this.clearPending()
    this.sink.off('close', this.onSinkClose)
    this.onClose(this)
    return true
  }

  private readonly onSinkClose = (): void => this.close('client')

  /** Settles once the stream's socket has closed (at once if it is already destroyed). */
  async sinkClosed (): Promise<void> {
    if (this.sink.destroyed) return
    await new Promise<void>((resolve) => this.sink.once('close', resolve))
  }

  private enqueue (frame: Buffer, placement: number): void {
    const run = this.run
    if (run !== null && placement === this.runPlacement + 1) {
      this.runBytes += frame.length
    } else {
      if (run !== null) (this.pieces ??= []).push(this.runView(run))
      this.run = frame
      this.runBytes = frame.length
    }
    this.runPlacement = placement
    this.pendingBytes += frame.length
    if (frame.length > this.largestFrame) this.largestFrame = frame.length
    if (this.pendingBytes + this.unsentAtLastWrite > this.bufferBound()) {
      // The bound may be stale: ask the socket before calling it slow. A
      // socket that has taken everything so far is not behind: what is due
      // goes to it at the next write (one publish may bring more than the
      // bound, and a reader keeping up must get it), and the flush judges it
      // by what that write leaves unsent.
      this.unsentAtLastWrite = this.sink.writableLength
      if (this.unsentAtLastWrite > 0 && this.pendingBytes + this.unsentAtLastWrite > this.bufferBound()) {
        this.close('slow')
        return
      }
    }
    if (!this.queued) {
      this.queued = true
      this.scheduler.mark(this)
    }
  }

  private runView (run: Buffer): Buffer {
    return this.runBytes === run.length ? run : Buffer.from(run.buffer, run.byteOffset, this.runBytes)
  }

  /** Everything due, as one Buffer, and nothing due any more. */
  private takePending (): Buffer | null {
    const run = this.run
    if (run === null) return null
    const last = this.runView(run)
    const pieces = this.pieces
    const bytes = this.pendingBytes
    this.clearPending()
    if (pieces === null) return last
    pieces.push(last)
    return Buffer.concat(pieces, bytes)
  }

  private clearPending (): void {
    this.run = null
    this.runBytes = 0
    this.pieces = null
    this.pendingBytes = 0
  }

  private writeRaw (chunk: Buffer): boolean {
    this.bytesGiven += chunk.length
    this.lastWriteAt = Date.now()
    const flushed = this.sink.write(chunk)
    this.unsentAtLastWrite = this.sink.writableLength
    return flushed
  }

  private async writeAndPace (chunk: Buffer[], bytes: number): Promise<void> {
    const flushed = this.writeRaw(chunk.length === 1 ? chunk[0] : Buffer.concat(chunk, bytes))
    if (flushed || this.closed) return
    this.pacing = true
    await new Promise<void>((resolve) => {
      const done = (): void => {
        this.pacing = false
        clearTimeout(timer)
        this.sink.off('drain', done)
        this.sink.off('close', done)
        resolve()
      }
      // A reader that stops reading altogether is a slow consumer after all.
      const timer = setTimeout(() => {
        done()
        this.close('slow')
      }, DRAIN_WAIT_MS).unref()
      this.sink.once('drain', done)
      this.sink.once('close', done)
    })
  }
}
