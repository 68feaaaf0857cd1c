import type Redis from 'ioredis'
import { randomBytes } from 'node:crypto'
import { NotLeaseHolderError, REPLAY_PAGE_BYTES, type DeliveryListener, type EventBus, type HistoryEntry, type LeaseFence, type OnceOutcome, type PublishItem, type PublishOnce, type ReplayResult, type ResetReason, type SubscriptionListeners } from '../bus'
import { chunkOf, frameWithId, isEventBody } from '../framing'
import { reasonOf, type Log, type ScriptedRedis } from './client'

const ID_PREFIX = Buffer.from('id: ')
const NEWLINE = 0x0a
/** How long a watermark waits for its own message to come back on the subscriber. */
const WATERMARK_TIMEOUT_MS = 5000
/** SUBSCRIBE takes any number of channels; bounded, so one command stays a modest size however many streams listen. */
const RESUBSCRIBE_BATCH = 1000

export interface RedisBusOptions {
  prefix: string
  historySize: number
  historyTtlS: number
}

/** The id before the first newline of a bus message, as the scripts write it (1–16 digits, no leading zero), or null. */
function idOf (message: Buffer, newline: number): number | null {
  if (newline < 1 || newline > 16 || message[0] === 0x30) return null
  for (let index = 0; index < newline; index++) {
    const byte = message[index]
    if (byte < 0x30 || byte > 0x39) return null
  }
  const id = Number(message.toString('latin1', 0, newline))
  return Number.isSafeInteger(id) ? id : null
}

/**
 * The distributed engine. Publishing is one Lua script per batch (id, history,
 * PUBLISH); each instance SUBSCRIBEs to `<prefix>ch:<channel>` only while one
 * of its own streams listens to that channel.
 */
export class RedisBus implements EventBus {
  readonly mode = 'redis' as const
  private listener: DeliveryListener = () => {}
  private readonly channelPrefix: string
  /**
   * The channels the hub listens to, one entry per channel. A channel whose
   * listen failed stays in: the hub counts it as listened and will not ask
   * again, so only the next resubscription can mend it.
   */
  private readonly channels = new Set<string>()
  private subscription: SubscriptionListeners = { lost: () => {}, restored: () => {} }
  /**
   * The highest id delivered here (seeded at start with the last one issued,
   * before anything is subscribed): pub/sub delivers in id order, so every
   * later delivery has a higher id. Raised only by deliveries, and by a
   * watermark once its proof came (see watermark): an id issued but still
   * on its way would otherwise be counted as delivered.
   */
  private delivered = 0
  /** The subscription was lost and is not restored yet. */
  private lost = false
  /** Subscribed again since the loss; restored once the commands connection (history reads) is up too. */
  private resubscribed = false
  /** When a PING sent on the subscriber (after everything published before it) was last answered. */
  private heard = performance.now()
  private pingSentAt: number | null = null
  /** Messages read on the subscriber: a PONG queued behind many is late, not missing. */
  private received = 0
  private receivedMark = 0
  private progressAt = 0
  /** A silent connection is being dropped; the next one is checked once it is up. */
  private dropping = false
  /** close() has run: the subscriber closing after it is the stop, not a loss. */
  private stopped = false
  private readonly pingTimer: NodeJS.Timeout
  /** Times the subscriber's connection closed: a watermark's proof holds only on one connection. */
  private subscriberCloses = 0
  /**
   * This process's own bus channel, which only watermarks publish on: no
   * event channel starts with '~' (see channels.ts). Kept in `channels`, so
   * it is subscribed again after a reconnect like the others.
   */
  private readonly markChannel = `~mark:${randomBytes(8).toString('hex')}`
  private readonly markChannelName: Buffer
  /** The highest watermark heard back on `markChannel`, and those callers wait for. */
  private markHeard = 0
  private readonly markWaiters = new Set<{ id: number, settle: (heard: boolean) => void }>()
  private lastChunkId = 0
  private lastChunk: Buffer = Buffer.alloc(0)

  constructor (
    private readonly commands: ScriptedRedis,
    private readonly subscriber: Redis,
    private readonly options: RedisBusOptions,
    private readonly log: Pick<Log, 'warn'>
  ) {
    this.channelPrefix = `${options.prefix}ch:`
    this.markChannelName = Buffer.from(this.channelPrefix + this.markChannel)
    const skip = Buffer.byteLength(this.channelPrefix)
    // Whatever is read on the subscriber proves it alive, for any module's channels (ingress's patterns too).
    subscriber.on('pmessageBuffer', () => { this.received++ })
    subscriber.on('messageBuffer', (channelName: Buffer, message: Buffer) => {
      this.received++
      if (channelName.length <= skip || channelName.toString('latin1', 0, skip) !== this.channelPrefix) return
      const newline = message.indexOf(NEWLINE)
      const id = idOf(message, newline)
      const isMark = channelName.length === this.markChannelName.length && channelName.equals(this.markChannelName)
      // Anyone who can PUBLISH to Redis can reach these channels (a backend
      // mistaking one for ingress): what is not one of the scripts' messages
      // is dropped here, or it would be written to every stream as it came.
      if (id === null || (isMark ? newline !== message.length - 1 : !isEventBody(message, newline + 1))) {
        this.log.warn({ channel: channelName.toString('utf8', skip, Math.min(channelName.length, skip + 200)), bytes: message.length, hint: 'the bus channels are the gateway\'s own: publish to <prefix>publish' }, 'malformed bus message dropped')
        return
      }
      // Pub/sub delivers in id order: this is the highest. Lower than the
      // last one only when the store's ids went back (it lost its data, and
      // its clock is behind the ids it had issued): the mark follows them,
      // or every stream opened since would count their events as before it.
      this.delivered = id
      if (isMark) {
        this.heardMark(id)
        return
      }
      // "<id>\n<body>" becomes the chunk "id: <id>\n<body>": one copy, shared by
      // every local recipient. An event on several channels comes as one
      // message per channel, back to back from the script that published
      // it: the same chunk serves them all (ids are never reused).
      if (id !== this.lastChunkId) {
        this.lastChunkId = id
        this.lastChunk = chunkOf(message, ID_PREFIX)
      }
      this.listener(channelName.toString('utf8', skip), id, this.lastChunk)
    })
    // ioredis resubscribes after a reconnect by itself, but loses that if the
    // connection drops again before Redis answers, and the streams would then
    // silently stop receiving. Subscribing again costs nothing when nothing was
    // lost; a failure waits for the next 'ready', which the next reconnect brings.
    subscriber.on('ready', () => {
      this.resubscribe().then(() => {
        // Subscribed again: from here on nothing is missed, and what was
        // published meanwhile is in the history for the streams to catch up.
        this.resubscribed = true
        this.heard = performance.now()
        this.restoreIfWhole()
      }, (error: unknown) => {
        this.log.warn({ channels: this.channels.size, reason: reasonOf(error) }, 'could not subscribe again to the bus channels')
      })
    })
    // A subscriber's socket can die silently (a NAT or a balancer dropping it,
    // a paused VM): pub/sub then just goes quiet. A PING answered proves
    // every earlier event came through; one unanswered for long is a lost
    // connection, reconnected at once so its streams catch up. Paced to the
    // history window, so a catch-up after a brief outage finds in the window
    // all it can have missed.
    const pingEveryMs = Math.min(2000, Math.floor(options.historyTtlS * 1000 / 4))
    this.pingTimer = setInterval(() => this.checkSubscriber(pingEveryMs * 3), pingEveryMs).unref()
    // The catch-up reads history on the other connection, which may come back later.
    commands.redis.on('ready', () => this.restoreIfWhole())
    subscriber.on('close', () => {
      this.subscriberCloses++
      this.dropping = false
      // Also when the loss is known already: subscribed again after it, and
      // dropped again before the other connection came back, the subscriber
      // is not subscribed until its next 'ready' has subscribed it again.
      this.resubscribed = false
      // Closed by close(): a stop, not a loss to warn about.
      if (this.lost || this.delivered === 0 || this.stopped) return
      this.lost = true
      this.log.warn({ channels: this.channels.size }, 'bus subscription lost; streams catch up from history once it is back')
      this.subscription.lost()
    })
  }

  private checkSubscriber (timeoutMs: number): void {
    if (this.pingSentAt !== null) {
      const sentAt = this.pingSentAt
      const now = performance.now()
      // Messages still coming: Redis answers the PING after those queued
      // before it, which a busy instance may take long to read.
      if (this.received !== this.receivedMark) {
        this.receivedMark = this.received
        this.progressAt = now
        return
      }
      if (now - Math.max(sentAt, this.progressAt) <= timeoutMs) return
      const received = this.received
      // After this turn's I/O: an answer that came while the event loop was
      // busy (timers run before sockets are read) is not taken for silence.
      setImmediate(() => {
        if (this.pingSentAt !== sentAt || this.received !== received || this.subscriber.status !== 'ready') return
        this.log.warn({ silentMs: Math.round(performance.now() - this.heard) }, 'bus subscriber does not answer; reconnecting')
        // The old socket stays 'ready' until it is closed: one drop per silence.
        this.pingSentAt = null
        this.dropping = true
        this.subscriber.disconnect(true)
      })
      return
    }
    if (this.subscriber.status !== 'ready' || this.dropping) return
    const sentAt = performance.now()
    this.pingSentAt = sentAt
    this.receivedMark = this.received
    this.subscriber.ping().then(() => { this.heard = Math.max(this.heard, sentAt) }, () => {}).finally(() => {
      if (this.pingSentAt === sentAt) this.pingSentAt = null
    })
  }

  heardAt (): number {
    return this.heard
  }

  private restoreIfWhole (): void {
    if (!this.lost || !this.resubscribed || this.subscriber.status !== 'ready' || this.commands.redis.status !== 'ready') return
    this.lost = false
    this.subscription.restored()
  }

  onSubscription (listeners: SubscriptionListeners): void {
    this.subscription = listeners
  }

  deliveredUpTo (): number {
    return this.delivered
  }

  /** Seeds deliveredUpTo with the last id issued; called once, before any subscription. */
  async start (): Promise<void> {
    this.delivered = Math.max(this.delivered, await this.lastId())
  }

  async publish (items: PublishItem[], fence?: LeaseFence): Promise<number[]> {
    if (items.length === 0) return []
    const args: Array<string | number> = [this.options.prefix, this.options.historySize, this.options.historyTtlS]
    if (fence !== undefined) args.push(fence.holder, fence.leaseMs, fence.position ?? '')
    pushItems(args, items)
    const ids = await this.commands.run(fence === undefined ? 'PUBLISH' : 'PUBLISH_AS_HOLDER', args) as string[]
    if (ids[0] === 'not-holder') throw new NotLeaseHolderError()
    return ids.map(Number)
  }

  async publishOnce (items: PublishItem[], once: PublishOnce): Promise<OnceOutcome> {
    const args: Array<string | number> = [this.options.prefix, this.options.historySize, this.options.historyTtlS, once.key, once.fingerprint, once.windowS]
    pushItems(args, items)
    return onceOutcomeOf(await this.commands.run('PUBLISH_ONCE', args) as string[])
  }

  async usedOnce (once: PublishOnce): Promise<OnceOutcome | null> {
    const answer = await this.commands.run('ONCE_OUTCOME', [this.options.prefix, once.key, once.fingerprint]) as string[]
    return answer[0] === 'unused' ? null : onceOutcomeOf(answer)
  }

  async replay (channels: string[], after: number): Promise<ReplayResult> {
    const result = await this.read(channels, String(after), '')
    if (result[0] === 'reset') return { reset: result[1] as ResetReason, events: [] }
    return result[1] === '' ? { reset: null, events: this.entries(result) } : { reset: null, events: this.entries(result), more: true }
  }

  async window (channels: string[]): Promise<HistoryEntry[]> {
    if (channels.length === 0) return []
    const events: HistoryEntry[] = []
    let after = ''
    do {
      const page = await this.read(channels, '', after)
      for (const entry of this.entries(page)) events.push(entry)
      after = page[1]
    } while (after !== '')
    return events
  }

  async trimmed (channels: string[]): Promise<boolean> {
    if (channels.length === 0) return false
    // The highest id each channel trimmed, kept HISTORY_TTL_S from the trim (see the publish
    // scripts): past that, what it took is older than the window too.
    const dropped = await this.commands.call(async (redis) => await redis.mget(channels.map((name) => `${this.options.prefix}d:${name}`)))
    return dropped.some((id) => id !== null)
  }

  async listen (channel: string): Promise<void> {
    this.channels.add(channel)
    try {
      await this.subscriber.subscribe(this.channelPrefix + channel)
    } catch (error) {
      throw this.commands.translate(error)
    }
  }

  unlisten (channel: string): void {
    this.channels.delete(channel)
    // If this fails while Redis is down, ioredis may restore the subscription on
    // reconnect: its traffic then arrives for no stream here and is dropped.
    this.subscriber.unsubscribe(this.channelPrefix + channel).catch(() => {})
  }

  onDelivery (listener: DeliveryListener): void {
    this.listener = listener
  }

  /**
   * The script issues the id and PUBLISHes it on this process's own
   * channel: heard back on the subscriber, it comes after every event with a
   * lower id on the channels subscribed by then, as every publish is one
   * script. (One whose SUBSCRIBE was still on its way had no stream owed its
   * earlier events: the join that asked for it had not returned.) A message,
   * not a PING: it also proves the subscriber listens to the server the
   * script ran on, or to one of its replicas, which pass messages on in
   * order, and not to a master left behind by a failover.
   */
  async watermark (): Promise<number | null> {
    if (this.lost || this.subscriber.status !== 'ready') return null
    const closes = this.subscriberCloses
    if (!this.channels.has(this.markChannel)) await this.listen(this.markChannel)
    const id = Number(await this.commands.run('WATERMARK', [this.options.prefix, this.channelPrefix + this.markChannel]))
    const heard = this.markHeard >= id || await new Promise<boolean>((resolve) => {
      const waiter = {
        id,
        settle: (heard: boolean) => {
          clearTimeout(timer)
          this.markWaiters.delete(waiter)
          resolve(heard)
        }
      }
      const timer = setTimeout(() => waiter.settle(false), WATERMARK_TIMEOUT_MS)
      this.markWaiters.add(waiter)
    })
    // A subscriber that reconnected meanwhile may have missed some: the catch-up's to mend.
    if (!heard || closes !== this.subscriberCloses || this.lost) return null
    if (id > this.delivered) this.delivered = id
    return id
  }

  private heardMark (id: number): void {
    if (id > this.markHeard) this.markHeard = id
    for (const waiter of this.markWaiters) if (id >= waiter.id) waiter.settle(true)
  }

  async lastId (): Promise<number> {
    // A plain read: INIT (INFO, a possible new epoch) runs once per
    // connection, not at every reopen of a reconnect storm. Only a store
    // that lost the counter needs it again.
    const last = await this.commands.call(async (redis) => await redis.get(`${this.options.prefix}id`))
    return Number(last ?? await this.commands.run('INIT', [this.options.prefix]))
  }

  isReady (): boolean {
    return this.commands.redis.status === 'ready' && this.subscriber.status === 'ready'
  }

  isAnswering (): boolean {
    return this.isReady() && this.commands.isAnswering()
  }

  async close (): Promise<void> {
    this.stopped = true
    clearInterval(this.pingTimer)
    for (const waiter of this.markWaiters) waiter.settle(false)
  }

  private async resubscribe (): Promise<void> {
    const names = [...this.channels]
    for (let start = 0; start < names.length; start += RESUBSCRIBE_BATCH) {
      // Checked again at send time: a channel unlistened since must not come back.
      const batch = names.slice(start, start + RESUBSCRIBE_BATCH).filter((name) => this.channels.has(name))
      if (batch.length > 0) await this.subscriber.subscribe(...batch.map((name) => this.channelPrefix + name))
    }
  }

  /** One page of REPLAY (see there); `after` continues a window read. */
  private async read (channels: string[], cursor: string, after: string): Promise<string[]> {
    return await this.commands.run('REPLAY', [this.options.prefix, cursor, after, this.options.historyTtlS, REPLAY_PAGE_BYTES, ...channels]) as string[]
  }

  private entries (result: string[]): HistoryEntry[] {
    const events: HistoryEntry[] = []
    for (let index = 2; index + 1 < result.length; index += 2) {
      const id = Number(result[index])
      events.push({ id, frame: frameWithId(id, result[index + 1]) })
    }
    return events
  }
}

/** The publish scripts' arguments for `items` (see PUBLISH in scripts.ts). */
function pushItems (args: Array<string | number>, items: PublishItem[]): void {
  for (const item of items) args.push(`${item.transient === true ? '!' : ''}${JSON.stringify(item.channels)}`, item.body)
}

/** PUBLISH_ONCE's (and ONCE_OUTCOME's) answer: its kind, then the ids. */
function onceOutcomeOf ([kind, ...ids]: string[]): OnceOutcome {
  if (kind === 'conflict') return { kind }
  return { kind: kind === 'repeated' ? 'repeated' : 'published', ids: ids.map(Number) }
}
