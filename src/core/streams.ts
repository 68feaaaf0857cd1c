import { mergeById, type EventBus, type HistoryEntry, type ReplayResult, type ResetReason } from './bus'
import { channel } from './channels'
import { StreamConnection, WriteScheduler, type CloseReason, type ReplayChanges, type Sink, type StreamKind } from './connection'
import { frameWithId, retryFrame, systemFrame } from './framing'
import { inTurns } from './in-turns'
import type { Hub } from './hub'
import type { Registry } from './registry'
import { within } from './within'

/** The reconnection time an evicted stream's browser is given (see StreamService.close): a day. */
export const EVICTED_RETRY_MS = 86_400_000
const EVICTED_RETRY_FRAME = retryFrame(EVICTED_RETRY_MS)

/** What every topic's channel name starts with, and no other channel's. */
const TOPIC_CHANNEL_PREFIX = channel.topic('')

/** Why a stream of an id ends when a newer stream of the id takes it. */
export const REOPENED_REASON = 'stream reopened elsewhere'

export interface StreamSpec {
  connectionId: string
  /** Its admission's seq (SharedState.admit): of two streams of one id, the one admitted last holds it. */
  admissionSeq: number
  /** Admission.issuedBefore: a catch-up after a lost subscription starts no lower. */
  issuedBefore: number
  userId: string
  kind: StreamKind
  topics: string[]
  channels: string[]
  sink: Sink
  tokenExpiresAt: number | null
  allowedTopics: readonly string[] | null
  remoteAddress: string
  requestId?: string
  /** `Last-Event-ID` as parsed; 'malformed' gets a reset. */
  cursor: number | 'malformed' | null
  /** Without a cursor, replay these channels' whole window (a reopened stream's own events). */
  windowChannels?: string[]
  /** Topics looked up once the stream is registered, so no concurrent subscription is missed. */
  extraTopics?: () => Promise<string[]>
  /** Closes a job stream after the event that ends its job. */
  closeAfter?: (frame: Buffer) => boolean
  /** Runs after the stream has joined its channels and sent `connected`, instead of replay. */
  prelude?: (connection: StreamConnection) => Promise<void>
  /** Status line and headers, written with the first events in one write. */
  head: Buffer
  /** Extra fields of the `connected` event. */
  connectedExtra?: Record<string, unknown>
}

export interface StreamEvents {
  opened (connection: StreamConnection): void
  closed (connection: StreamConnection): void
  replayed (connection: StreamConnection, count: number): void
  reset (connection: StreamConnection, reason: string): void
  /** The bus missed deliveries: `count` live streams catch up from history. */
  catchingUp (count: number): void
  /** A catch-up ended on a fault of its own: the streams it had not done stay held until the next one. */
  catchUpFailed (error: unknown): void
  /** Records the stream's topics for listings and stats; settles once recorded or logged as not. */
  topicsChanged (connection: StreamConnection): Promise<void>
  /** An open lost its id to a reopen admitted after it, and ended before it was registered. */
  superseded (connection: StreamConnection, holder: StreamConnection): void
  /** `count` quiet streams were sent an id line alone (see moveQuietCursors). */
  cursorsMoved (count: number): void
}

export interface StreamServiceOptions {
  retryMs: number
  keepaliveMs: number
  maxBufferedBytes: number
  historyTtlS: number
  /** See ConnectionInit.handBack. */
  handBack?: (sink: Sink) => void
}

const EXPIRY_TICK_MS = 250
/** Where a token already past its bucket waits for the next tick (see trackExpiry). */
const OVERDUE_BUCKET = -1
/** How soon after a reset the stream's cursor is moved. */
const CURSOR_SOON_MS = 200
/** How long a drain waits at most for a watermark to give cursorless streams (see giveCursorsBeforeLeaving). */
const DRAIN_MARK_WAIT_MS = 1000

/**
 * When quiet streams' cursors are moved (see moveQuietCursors): a stream
 * that has had no event for half the history window is moved, checked every
 * eighth of it (within 1 s to 1 min), so a client's cursor is never older
 * than half the window and one check while its stream is open.
 */
export function cursorSchedule (historyTtlS: number): { checkEveryMs: number, quietForMs: number } {
  const windowMs = historyTtlS * 1000
  return { checkEveryMs: Math.max(1000, Math.min(60_000, Math.floor(windowMs / 8))), quietForMs: Math.floor(windowMs / 2) }
}
/** How much of the history window an outage may last for a catch-up to read the window instead of sending reset (see missedSince). */
const WINDOW_SHARE_FOR_OUTAGE = 0.9
/** Streams replaying at once after the bus missed deliveries: bounded, so Redis is not flooded. */
const CATCH_UP_CONCURRENCY = 32

/**
 * When keepalives go out. A stream idle for `idleAfterMs` gets one at the
 * next check, so no gap between writes reaches `idleAfterMs + checkEveryMs`
 * (7/12 of KEEPALIVE_MS), which leaves room for a late timer or a busy event
 * loop under the interval the contract promises. Checking at half the
 * interval for streams idle for half of it let a gap reach the whole
 * interval, and a timer 1 ms late passed it. An idle stream gets one every
 * two checks: half of KEEPALIVE_MS.
 */
export function keepaliveSchedule (keepaliveMs: number): { checkEveryMs: number, idleAfterMs: number } {
  return { checkEveryMs: Math.max(25, Math.floor(keepaliveMs / 4)), idleAfterMs: Math.floor(keepaliveMs / 3) }
}

/**
 * Opens, feeds and closes streams. One timer drives keepalives and one drives
 * token expiry for every stream; nothing here holds a timer per connection.
 */
export class StreamService {
  readonly scheduler = new WriteScheduler()
  private readonly expiries = new Map<number, Set<StreamConnection>>()
  /** The first bucket of `expiries` the next tick reads; every earlier one has been read and let go. */
  private nextExpiryBucket: number
  private readonly keepaliveTimer: NodeJS.Timeout
  private readonly expiryTimer: NodeJS.Timeout
  private draining = false
  /** Times the bus lost its subscription: a catch-up overtaken by a new loss can tell. */
  private lossCount = 0
  private subscriptionDown = false
  /** When the subscription went down (the first loss of the current outage). */
  private lostAt = 0
  private catchingUp = false
  private readonly cursorTimer: NodeJS.Timeout
  private readonly cursorCheckMs: number
  private readonly quietForMs: number
  private movingCursors = false
  private checkCursorsAgain = false
  private cursorsSoonTimer: NodeJS.Timeout | null = null
  private catchUpAgain = false

  constructor (
    private readonly bus: EventBus,
    private readonly hub: Hub,
    private readonly registry: Registry,
    private readonly options: StreamServiceOptions,
    private readonly events: StreamEvents
  ) {
    const { checkEveryMs, idleAfterMs } = keepaliveSchedule(options.keepaliveMs)
    this.keepaliveTimer = setInterval(() => this.keepalive(Date.now() - idleAfterMs), checkEveryMs).unref()
    this.nextExpiryBucket = this.bucketOf(Date.now())
    this.expiryTimer = setInterval(() => this.expire(Date.now()), EXPIRY_TICK_MS).unref()
    const { checkEveryMs: cursorCheckMs, quietForMs } = cursorSchedule(options.historyTtlS)
    this.quietForMs = quietForMs
    this.cursorCheckMs = cursorCheckMs
    this.cursorTimer = setInterval(() => { void this.moveQuietCursors() }, cursorCheckMs).unref()
    bus.onSubscription({ lost: () => this.subscriptionLost(), restored: () => this.subscriptionRestored() })
  }

  get isDraining (): boolean {
    return this.draining
  }

  async open (spec: StreamSpec): Promise<StreamConnection> {
    const connection = new StreamConnection({
      id: spec.connectionId,
      userId: spec.userId,
      kind: spec.kind,
      topics: spec.topics,
      sink: spec.sink,
      scheduler: this.scheduler,
      maxBufferedBytes: this.options.maxBufferedBytes,
      tokenExpiresAt: spec.tokenExpiresAt,
      allowedTopics: spec.allowedTopics,
      remoteAddress: spec.remoteAddress,
      requestId: spec.requestId,
      handBack: this.options.handBack
    })
    connection.onClose = this.cleanupClosed
    connection.admissionSeq = spec.admissionSeq
    connection.baseline = Math.max(this.bus.deliveredUpTo(), spec.issuedBefore)
    // Queued first, so whatever ends the stream from here on follows a head.
    connection.holdHead(spec.head)
    const retry = retryFrame(this.options.retryMs)
    // `connected` with the stream's topics as they are when it is asked for:
    // framed again only after a change (topics are replaced, never mutated).
    let framedTopics = connection.topics
    let framed: Buffer | null = null
    const connectedFrame = (): Buffer => {
      if (framed === null || connection.topics !== framedTopics) {
        framedTopics = connection.topics
        framed = systemFrame('connected', { connectionId: connection.id, userId: connection.userId, topics: [...framedTopics], ...spec.connectedExtra })
      }
      return framed
    }
    // And by `retry` and `connected`, as every stream answered 200 begins,
    // even one ended before they are sent (superseded, evicted or drained
    // while its user's topics are read): its client learns its id.
    connection.framesBeforeClose = [retry, connectedFrame()]
    // Two reopens of one id can both pass the caller's check while it waits on
    // Redis: one id has one holder, the one admitted last (whichever gets here
    // first), or the other would live on outside the registry and its counts.
    const previous = this.registry.get(spec.connectionId)
    if (previous !== undefined && previous.admissionSeq > connection.admissionSeq) {
      // The id's record is the other's: this one's close must not give it back.
      connection.replaced = true
      this.close(connection, 'evicted', 'evicted', { reason: REOPENED_REASON })
      // Never registered, so no 'closed': without this the open leaves no trace.
      this.events.superseded(connection, previous)
      return connection
    }
    if (previous !== undefined) {
      previous.replaced = true
      this.close(previous, 'evicted', 'evicted', { reason: REOPENED_REASON })
    }
    this.registry.add(connection)
    // Registered while the bus is without its subscription: not held by
    // subscriptionLost, so it is caught up like the others (below).
    const openedDuringLoss = this.subscriptionDown
    this.trackExpiry(connection)
    this.events.opened(connection)
    if (spec.sink.destroyed) connection.close('client')
    if (spec.closeAfter !== undefined) connection.closeAfter = spec.closeAfter
    if (spec.extraTopics !== undefined) {
      connection.userTopicsLeftWhileReading = new Set()
      const read = await spec.extraTopics()
      const left = connection.userTopicsLeftWhileReading
      connection.userTopicsLeftWhileReading = null
      const joining = read.filter((topic) => !left.has(topic))
      const added = this.registry.addTopics(connection, joining)
      connection.joinedForUser(joining, added)
      if (added.length > 0) void this.events.topicsChanged(connection)
    }
    // A reopen without a cursor replays only the window of `windowChannels`,
    // yet its other channels' events published from here on must not be lost:
    // noting the last id before joining lets sendWindow read them back.
    const windowChannels = spec.prelude === undefined && spec.cursor === null && spec.windowChannels !== undefined && spec.windowChannels.length > 0
      ? spec.windowChannels
      : null
    const joinedAfter = windowChannels !== null ? await this.bus.lastId().catch((): null => null) : null
    // What its other channels had before is not its own, after a loss too.
    if (joinedAfter !== null) connection.baseline = Math.max(connection.baseline, joinedAfter)
    if (openedDuringLoss) {
      // Its catch-up starts above its baseline, the bus's mark from before the
      // outage: events its channels had then are not its own. What was issued
      // before it joins is not (a failed read keeps the older mark: at worst
      // it is sent some of them, never fewer).
      const issued = joinedAfter ?? await this.bus.lastId().catch((): null => null)
      if (issued !== null) connection.baseline = Math.max(connection.baseline, issued)
    }
    // Its topics as they are now: a subscription change applied while this
    // open waited found nothing joined to leave, so the spec's list may hold
    // a topic taken away since (and joining it would be for good).
    const channels = spec.channels.filter((name) => !name.startsWith(TOPIC_CHANNEL_PREFIX)).concat(connection.topics.map(channel.topic))
    connection.framesBeforeClose = [retry, connectedFrame()]
    await this.hub.join(connection, channels)
    connection.framesBeforeClose = null
    if (connection.closed) return connection
    connection.sendSystem(retry)
    // Its topics as they are now, if a change came while it joined.
    connection.sendSystem(connectedFrame())
    connection.releaseHead()
    // Subscriptions changed from here until the stream goes live: its
    // replay and a read-back (readBackLetGo) read a topic joined meanwhile
    // from when it was joined, and no more one it left.
    const changes: ReplayChanges = { joined: new Map(), left: new Set() }
    connection.replayChanges = changes
    if (spec.prelude !== undefined) {
      await spec.prelude(connection)
    } else if (spec.cursor !== null) {
      await this.replay(connection, spec.cursor, changes)
    } else if (windowChannels !== null) {
      await this.sendWindow(connection, windowChannels, joinedAfter)
    }
    if (!connection.closed && (openedDuringLoss || this.subscriptionDown)) {
      connection.catchUpFrom = Math.max(connection.lastId, connection.baseline)
      // Its baseline dates from before the outage, not from its opening.
      connection.catchUpSince = this.lostAt
      connection.replayChanges = null
      // Restored meanwhile, maybe caught up without it: once more, for it.
      if (!this.subscriptionDown) this.runCatchUp()
      return connection
    }
    await this.readBackLetGo(connection, changes)
    connection.replayChanges = null
    connection.goLive()
    return connection
  }

  /**
   * Reads back from history the live events a held stream let go (see
   * StreamConnection.deliver): from the newest it was sent, in rounds until
   * one ends with what arrived meanwhile within the bound. A reader slower
   * than the live rate is paced by it for as long as history keeps what it
   * lacks, then gets `reset`. A topic subscribed since the stream's head
   * went out is read from when it was joined, as a replay reads it, and one
   * it left is read no more (see replayChanges).
   */
  private async readBackLetGo (connection: StreamConnection, changes: ReplayChanges): Promise<void> {
    while (!connection.closed && connection.takeHeldLetGo()) {
      // Not below its baseline: what its channels had before it joined is not its own.
      const from = Math.max(connection.lastId, connection.baseline)
      const reset = await this.sendPaced(connection, from, changes)
      if (reset !== null) {
        this.sendReset(connection, reset)
        return
      }
    }
  }

  /** Adds channels to a live stream; what they publish from now on reaches it. */
  async join (connection: StreamConnection, channels: string[]): Promise<void> {
    const changes = connection.replayChanges
    if (changes !== null) {
      const fresh = channels.filter((name) => !connection.channels.includes(name))
      if (fresh.length > 0) {
        // Unreadable, the replay's own position stands in: lower, so nothing is missed.
        const mark = await this.bus.lastId().catch(() => connection.lastId)
        // Two joins racing: the earlier mark, so neither misses what follows it.
        for (const name of fresh) changes.joined.set(name, Math.min(changes.joined.get(name) ?? mark, mark))
      }
    }
    await this.hub.join(connection, channels)
  }

  leave (connection: StreamConnection, channels: string[]): void {
    const changes = connection.replayChanges
    if (changes !== null) {
      for (const name of channels) {
        if (!connection.channels.includes(name)) continue
        changes.joined.delete(name)
        changes.left.add(name)
      }
    }
    this.hub.leave(connection, channels)
  }

  close (connection: StreamConnection, reason: CloseReason, event?: string, data?: unknown): void {
    const frame = event === undefined ? undefined : systemFrame(event, data ?? {})
    // A browser whose page does not close its EventSource on `evicted`
    // would reconnect after its retry and evict the stream that took the
    // slot, and the two would take it from each other for ever: told to
    // wait a day, it leaves the slot to the newer one. A page that closes
    // it, or opens a new EventSource later, is not affected.
    connection.close(reason, reason === 'evicted' && frame !== undefined ? Buffer.concat([EVICTED_RETRY_FRAME, frame]) : frame)
  }

  /**
   * Refuses new streams and ends every open one with `shutdown`, so clients
   * reconnect elsewhere. Settles once all their sockets have closed: a client
   * that does not read its last frames is cut after `graceMs`.
   */
  async drain (graceMs: number): Promise<void> {
    this.draining = true
    // A part of the grace at most: `shutdown` must still go out in it.
    await this.giveCursorsBeforeLeaving(Math.min(DRAIN_MARK_WAIT_MS, Math.floor(graceMs / 4)))
    const frame = systemFrame('shutdown', { reason: 'server shutting down' })
    const connections = [...this.registry.all()]
    const closed = connections.map(async (connection) => await connection.sinkClosed())
    for (const connection of connections) connection.close('shutdown', frame, graceMs)
    await Promise.all(closed)
  }

  /**
   * A live stream that has had no event has no cursor (its first move comes
   * after a check): its client would reconnect without one and lose what is
   * published meanwhile. So would one sent `reset` and nothing since, with
   * the cursor it was refused. Each is sent a watermark first, as at a check
   * (see moveQuietCursors): every event below it that was the stream's has
   * reached it, and it is inside the window, so the reconnect elsewhere
   * replays exactly what the stream lacks. Not had within `waitMs` (Redis
   * away), the streams leave as before, without.
   */
  private async giveCursorsBeforeLeaving (waitMs: number): Promise<void> {
    const bare = [...this.registry.all()].filter((connection) => connection.live && (connection.lastId === 0 || connection.cursorBehind))
    if (bare.length === 0) return
    const mark = await within(this.bus.watermark().catch((): null => null), waitMs, () => null)
    if (mark !== null) this.moveCursors(mark, bare, () => true)
  }

  /** Sends `id: <mark>` alone to each of `connections` that `due` picks (see StreamConnection.moveCursor), counted. */
  private moveCursors (mark: number, connections: Iterable<StreamConnection>, due: (connection: StreamConnection) => boolean): void {
    const frame = frameWithId(mark, '\n')
    let moved = 0
    for (const connection of connections) if (due(connection) && connection.moveCursor(mark, frame)) moved++
    if (moved > 0) this.events.cursorsMoved(moved)
  }

  stop (): void {
    clearInterval(this.keepaliveTimer)
    clearInterval(this.cursorTimer)
    if (this.cursorsSoonTimer !== null) clearTimeout(this.cursorsSoonTimer)
    clearInterval(this.expiryTimer)
    this.expiries.clear()
  }

  /**
   * For a stream that starts from a snapshot instead of history (a job's
   * `initial_status`): a cursor no history could have issued still gets its
   * `reset`, as on every other stream. (Any other cursor is covered by the
   * snapshot.)
   */
  async resetIfImpossible (connection: StreamConnection, cursor: number | 'malformed' | null): Promise<void> {
    if (cursor === null) return
    if (cursor === 'malformed') {
      this.sendReset(connection, 'malformed')
      return
    }
    // Unreadable, the id is not called from the future: the snapshot follows anyway.
    const issued = await this.bus.lastId().catch(() => Number.POSITIVE_INFINITY)
    if (cursor > issued) this.sendReset(connection, 'future')
  }

  /**
   * Page by page, each written (at the client's pace) before the next is
   * read. A later page's reset (the history trimmed while the client read
   * the earlier ones) ends the replay there: the client hears it, and goes live.
   * A topic the stream joins meanwhile (a subscription) is read too, from
   * the last id issued before it joined: its live events are held, and a
   * later page's newer ids would make them look sent already. Not from the
   * cursor: what it had before is not the stream's (a live stream that
   * subscribes gets none of it), and its history trimmed past the cursor
   * would reset the whole replay. One it leaves is read no more.
   */
  private async replay (connection: StreamConnection, cursor: number | 'malformed', changes: ReplayChanges): Promise<void> {
    if (cursor === 'malformed') {
      this.sendReset(connection, 'malformed')
      return
    }
    const reset = await this.sendPaced(connection, cursor, changes)
    if (reset !== null) {
      this.sendReset(connection, reset)
      return
    }
    // The client has every event up to its cursor: one still on its way to
    // this process (its subscriber behind the instance the client left) and
    // held meanwhile is not sent again, nor its cursor taken back.
    if (cursor > connection.lastId) connection.lastId = cursor
  }

  /**
   * The stream's history after `after`, page by page, each written at the
   * client's pace before the next is read: the channels joined since
   * `changes` began from their marks, those left not at all. Resolves with
   * the reset that ended it (a failed read is 'unavailable'), or null.
   */
  private async sendPaced (connection: StreamConnection, after: number, changes: ReplayChanges): Promise<ResetReason | null> {
    const channels = [...connection.channels].filter((name) => !changes.joined.has(name))
    return await this.eachReplayPage(channels, after, async (events) => {
      // With what it holds: a skipHistory event that came meanwhile is in
      // no history, and a later page would move the stream past its id.
      await this.sendHistory(connection, events, true)
      return !connection.closed
    }, changes).catch((): ResetReason => 'unavailable')
  }

  /** Every page of a replay, for readers that merge it whole. */
  private async replayWhole (channels: string[], after: number): Promise<ReplayResult> {
    const events: HistoryEntry[] = []
    const reset = await this.eachReplayPage(channels, after, async (page) => {
      for (const entry of page) events.push(entry)
      return true
    })
    return reset === null ? { reset: null, events } : { reset, events: [] }
  }

  /**
   * Reads a replay page by page (see EventBus.replay), handing each page's
   * events to `take` before reading the next, until the last page or until
   * `take` answers false. Resolves with the reset that ended it, or null.
   * `changes`: channels left since are read no more, and those joined are
   * read from their marks, one read per mark. Every read is paged: what one
   * gives past where another stopped is left for the next round, so the
   * pages stay in id order.
   */
  private async eachReplayPage (channels: string[], after: number, take: (events: HistoryEntry[]) => Promise<boolean>, changes?: ReplayChanges): Promise<ResetReason | null> {
    for (;;) {
      const reads = [{ channels: changes === undefined ? channels : channels.filter((name) => !changes.left.has(name)), from: after }]
      if (changes !== undefined) {
        const byMark = new Map<number, string[]>()
        for (const [name, mark] of changes.joined) {
          const names = byMark.get(mark)
          if (names === undefined) byMark.set(mark, [name])
          else names.push(name)
        }
        for (const [mark, names] of byMark) reads.push({ channels: names, from: Math.max(after, mark) })
      }
      const pages: HistoryEntry[][] = []
      let more = false
      let upTo = Number.POSITIVE_INFINITY
      for (const read of reads) {
        if (read.channels.length === 0) continue
        const page = await this.bus.replay(read.channels, read.from)
        if (page.reset !== null) return page.reset
        pages.push(page.events)
        if (page.more === true && page.events.length > 0) {
          more = true
          upTo = Math.min(upTo, page.events[page.events.length - 1].id)
        }
      }
      const events = mergeById(pages)
      if (!(await take(more ? events.filter((entry) => entry.id <= upTo) : events)) || !more) return null
      after = upTo
    }
  }

  /**
   * The window of `windowChannels`, merged with every event the stream's
   * channels published since `joinedAfter` and with what it holds, in id order.
   * Writing the window alone moves the stream past ids it never sent: a
   * user, topic or broadcast event that arrived (or is still on its way)
   * with an id below the window's newest would then be dropped as a
   * duplicate. The second read comes after the window's, so it holds every
   * event older than the window's newest that was published after the join,
   * whichever connection brings its live copy and whenever that arrives.
   */
  private async sendWindow (connection: StreamConnection, windowChannels: string[], joinedAfter: number | null): Promise<void> {
    const window = await this.bus.window(windowChannels)
    // The window lacks events its channels let go (a connection that was
    // sent more than HISTORY_SIZE before it was joined): the client hears
    // so, as a replay past a trim does, then gets what is left. Asked after
    // the window is read: a trim in between is told once too often, never missed.
    if (await this.bus.trimmed(windowChannels)) this.sendReset(connection, 'trimmed')
    // A reset or a failed read leaves what the stream holds as the only
    // source of the join gap: still merged, only late arrivals may be missed.
    const recent = joinedAfter === null || connection.closed
      ? []
      : (await this.replayWhole([...connection.channels], joinedAfter).catch(() => ({ events: [] }))).events
    await this.sendHistory(connection, mergeById([window, recent]), true)
  }

  /** `withHeld`: see StreamConnection.replay. With no history, held events go out in order when the stream goes live. */
  private async sendHistory (connection: StreamConnection, events: HistoryEntry[], withHeld = false): Promise<void> {
    if (events.length === 0) return
    const count = await connection.replay(events, withHeld)
    this.events.replayed(connection, count)
  }

  /**
   * The bus lost its subscription: from here on, until it is restored, events
   * are in the history only. Each live stream holds what arrives and notes
   * where it stands, so its catch-up starts from there whatever arrives in
   * between (ioredis resubscribes some channels before the bus says all are
   * back). One still being set up cannot be caught up beside its own replay:
   * it is closed, and the browser reconnects with its Last-Event-ID.
   */
  private subscriptionLost (): void {
    this.lossCount++
    // Noticed maybe well after delivery stopped: what it missed is no older than this.
    const heard = this.bus.heardAt()
    if (!this.subscriptionDown) this.lostAt = heard
    this.subscriptionDown = true
    // Pub/sub delivers in id order: every event at or below this mark on a
    // live stream's channels has reached it. A stream that has had no event
    // yet starts no lower than its baseline: what was published before it
    // opened is not its own, and a catch-up from the process's mark alone
    // (old, on a quiet instance) sent it events from before its open.
    const delivered = this.bus.deliveredUpTo()
    for (const connection of [...this.registry.all()]) {
      // One catching up from an earlier loss keeps its bound, which is lower.
      if (connection.closed || connection.catchUpFrom !== null) continue
      if (connection.hold()) {
        connection.catchUpFrom = Math.max(connection.lastId, delivered, connection.baseline)
        connection.catchUpSince = heard
      } else {
        connection.close('error')
      }
    }
  }

  private subscriptionRestored (): void {
    this.subscriptionDown = false
    this.runCatchUp()
  }

  /**
   * One catch-up at a time: asked for during one, another runs after it for
   * the streams still held, unless the subscription is down again (the next
   * restore runs it then; nothing is lost by waiting).
   */
  private runCatchUp (): void {
    if (this.catchingUp) {
      this.catchUpAgain = true
      return
    }
    this.catchingUp = true
    this.catchUp().catch((error: unknown) => this.events.catchUpFailed(error)).finally(() => {
      this.catchingUp = false
      const again = this.catchUpAgain
      this.catchUpAgain = false
      if (again && !this.subscriptionDown) this.runCatchUp()
    })
  }

  /**
   * Every held stream replays from history what it may have missed, merged
   * with what arrived meanwhile, and goes on live: no gap, no duplicate, no
   * reconnect. A stream whose history is gone gets `reset`, as a reconnect
   * would. One caught by a new loss before it is done stays held, from where
   * it got to, for the next catch-up.
   */
  private async catchUp (): Promise<void> {
    if (this.subscriptionDown) return
    const losses = this.lossCount
    const streams = [...this.registry.all()].filter((connection) => connection.catchUpFrom !== null && !connection.closed)
    this.events.catchingUp(streams.length)
    // Lost again: the streams not done stay held, from where they got to,
    // for the next catch-up (a failed read then is no reason for a reset).
    const lostAgain = (): boolean => this.lossCount !== losses
    // What was issued before the subscription was back at the latest: what
    // comes after it arrives live, held. Read without this bound, history
    // would be read up to its head at each page, and a reader slower than
    // its channels would never be done, nor its turn given up.
    const issued = await this.bus.lastId().catch((): null => null)
    await inTurns(streams, CATCH_UP_CONCURRENCY, async (connection) => {
      if (lostAgain()) return
      const from = connection.catchUpFrom ?? connection.lastId
      try {
        const reset = await this.sendMissedSince(connection, from, issued, lostAgain)
        if (lostAgain()) {
          connection.catchUpFrom = Math.max(from, connection.lastId)
          return
        }
        if (reset !== null) this.sendReset(connection, reset)
        // Read back in turn, a reader slower than the live rate would hold
        // its turn, and every stream behind it held, for as long as history
        // keeps what it lacks: it reconnects and replays instead.
        if (connection.takeHeldLetGo()) connection.close('slow')
      } catch {
        if (!lostAgain()) this.sendReset(connection, 'unavailable')
      }
      if (lostAgain()) {
        connection.catchUpFrom = Math.max(from, connection.lastId)
        return
      }
      connection.catchUpFrom = null
      connection.goLive()
    })
  }

  /**
   * Sends a held stream what it may have missed since `from`, from history,
   * page by page with what it held (each page's copies are the only ones a
   * slow reader keeps, whatever the number of streams caught up), up to
   * `upTo` (null: to the end), or resolves with why it cannot be told.
   * Stops at a new loss: a page read
   * after it must not be merged, for what the stream held since may include
   * events from after that loss's restore, and the events of the new gap are
   * in neither, so the merge would move the stream past them. The next
   * catch-up reads on from where it got to.
   */
  private async sendMissedSince (connection: StreamConnection, from: number, upTo: number | null, lostAgain: () => boolean): Promise<ResetReason | null> {
    const reset = await this.eachReplayPage([...connection.channels], from, async (page) => {
      if (lostAgain()) return false
      await this.sendHistory(connection, page, true)
      const newest = page.length > 0 ? page[page.length - 1].id : Number.POSITIVE_INFINITY
      return !connection.closed && !lostAgain() && (upTo === null || newest < upTo)
    })
    if (reset === null) return null
    // 'future': the store issues ids below the stream's last, which only a
    // store that lost its data, with a clock behind the ids it had issued,
    // does (a restart empty, a failover that lost writes): a reset, and the
    // stream takes ids from where the store stands, or it would drop every
    // event until the ids pass its last.
    if (reset === 'future') {
      // Unreadable: from nothing, so that none of the new events is dropped
      // (a later catch-up from there is told `unknown`).
      const issued = await this.bus.lastId().catch(() => 0)
      connection.lastId = Math.min(connection.lastId, issued)
      // Or the next loss's catch-up would start above the new ids again.
      connection.baseline = Math.min(connection.baseline, issued)
      return 'future'
    }
    // Nothing was trimmed, and what the loss can have missed is younger
    // than the window: the window holds it (the bound is only older).
    // The stream's own outage counts: one held since an earlier loss
    // (its read then overtaken) may have missed events older than this one.
    // (A tenth of the window is kept for the read to come, and clocks.)
    if (reset === 'expired' && performance.now() - connection.catchUpSince < this.options.historyTtlS * 1000 * WINDOW_SHARE_FOR_OUTAGE) {
      const window = await this.bus.window([...connection.channels])
      if (!lostAgain()) await this.sendHistory(connection, window.filter((entry) => entry.id > from), true)
      return null
    }
    return reset
  }

  /** See StreamEvents.topicsChanged. */
  async recordTopics (connection: StreamConnection): Promise<void> {
    await this.events.topicsChanged(connection)
  }

  /** Tells the stream it may have missed events it cannot be sent (see ResetReason). */
  private sendReset (connection: StreamConnection, reason: ResetReason): void {
    this.events.reset(connection, reason)
    connection.sendSystem(systemFrame('reset', { reason }))
    // The client keeps the cursor that could not be served (reset has no
    // id): each reconnect with it would be reset again until it is moved.
    connection.cursorBehind = true
    this.checkCursorsSoon()
  }

  private checkCursorsSoon (): void {
    if (this.cursorsSoonTimer !== null) return
    this.cursorsSoonTimer = setTimeout(() => {
      this.cursorsSoonTimer = null
      void this.moveQuietCursors()
    }, CURSOR_SOON_MS).unref()
  }

  private readonly cleanupClosed = (connection: StreamConnection): void => this.cleanup(connection)

  private cleanup (connection: StreamConnection): void {
    this.untrackExpiry(connection)
    this.hub.leaveAll(connection)
    if (this.registry.remove(connection)) this.events.closed(connection)
  }

  private keepalive (idleSince: number): void {
    for (const connection of this.registry.all()) connection.keepalive(idleSince)
  }

  /**
   * A client's cursor is the id of the last event it got. On a stream quiet
   * for longer than the history window, that id falls out of the window, and
   * the reconnect after a deploy's drain or a network change would get
   * `reset` (`expired`) although nothing was missed: every client of a quiet
   * app would resynchronise at once. So a stream that has had no event for
   * half the window is sent `id: <watermark>` alone, which moves the
   * browser's cursor without dispatching anything; so are the streams whose
   * client has no cursor or a refused one (see below).
   */
  private async moveQuietCursors (): Promise<void> {
    if (this.draining || this.registry.size === 0) return
    if (this.movingCursors) {
      this.checkCursorsAgain = true
      return
    }
    this.movingCursors = true
    try {
      // Asked at every check: ids are microseconds of the bus's clock (the
      // Redis server's in Redis mode), which this process's may not agree
      // with, and the watermark is that clock's now.
      const mark = await this.bus.watermark()
      if (mark === null) return
      const quietSinceId = mark - this.quietForMs * 1000
      const openedBefore = Date.now() - this.cursorCheckMs
      // Moved once its last event is old, however recently it opened (a
      // replay from an old cursor); after a reset, at once; one that has
      // had none once it has been open for a check (a reconnect without a
      // cursor misses what is published meanwhile: a drain must not find
      // it so for long), not at its open, whose first bytes stay as they were.
      this.moveCursors(mark, this.registry.all(), (connection) => connection.cursorBehind ||
        (connection.lastId > 0 ? connection.lastId <= quietSinceId : connection.openedAt <= openedBefore))
    } catch {
      // The store is unreachable: its loss is reported elsewhere, and the next check tries again.
    } finally {
      this.movingCursors = false
      if (this.checkCursorsAgain) {
        this.checkCursorsAgain = false
        this.checkCursorsSoon()
      }
    }
  }

  private bucketOf (at: number): number {
    return Math.floor(at / EXPIRY_TICK_MS)
  }

  private trackExpiry (connection: StreamConnection): void {
    if (connection.tokenExpiresAt === null) return
    // A token that ran out since it was checked would land in a bucket the
    // tick has passed: it goes with the overdue ones, read at the next tick.
    // (Its close looks in the bucket of its expiry and finds nothing: the
    // tick lets go of it.)
    const due = this.bucketOf(connection.tokenExpiresAt)
    const bucket = due < this.nextExpiryBucket ? OVERDUE_BUCKET : due
    let set = this.expiries.get(bucket)
    if (set === undefined) {
      set = new Set()
      this.expiries.set(bucket, set)
    }
    set.add(connection)
  }

  private untrackExpiry (connection: StreamConnection): void {
    if (connection.tokenExpiresAt === null) return
    const bucket = this.bucketOf(connection.tokenExpiresAt)
    const set = this.expiries.get(bucket)
    if (set === undefined) return
    set.delete(connection)
    if (set.size === 0) this.expiries.delete(bucket)
  }

  /**
   * Reads only the buckets due since the last tick, not every bucket: tokens
   * valid for a day spread 100 000 streams over up to 345 600 of them.
   */
  private expire (now: number): void {
    const due = this.bucketOf(now)
    // The clock stepped back: the buckets from here on are to come again.
    if (due < this.nextExpiryBucket) this.nextExpiryBucket = due
    const expired: StreamConnection[] = []
    const overdue = this.expiries.get(OVERDUE_BUCKET)
    if (overdue !== undefined) {
      this.expiries.delete(OVERDUE_BUCKET)
      for (const connection of overdue) {
        if (connection.closed || connection.tokenExpiresAt === null) continue
        // Not yet, after a step back of the clock: in its own bucket, to come.
        if (connection.tokenExpiresAt <= now) expired.push(connection)
        else this.trackExpiry(connection)
      }
    }
    const read = (bucket: number, set: Set<StreamConnection>): void => {
      for (const connection of set) {
        if (connection.tokenExpiresAt !== null && connection.tokenExpiresAt <= now) expired.push(connection)
      }
      // Passed buckets are done with: everything in them is expired now.
      if (bucket < due) this.expiries.delete(bucket)
    }
    if (due - this.nextExpiryBucket <= this.expiries.size) {
      for (let bucket = this.nextExpiryBucket; bucket <= due; bucket++) {
        const set = this.expiries.get(bucket)
        if (set !== undefined) read(bucket, set)
      }
    } else {
      // The clock leapt forward (set at boot, say): fewer buckets than steps.
      for (const [bucket, set] of this.expiries) if (bucket <= due) read(bucket, set)
    }
    // The current bucket may hold tokens that run out later in it: read again.
    this.nextExpiryBucket = due
    const frame = systemFrame('auth-expired', { reason: 'token expired' })
    for (const connection of expired) connection.close('expired', frame)
  }
}
