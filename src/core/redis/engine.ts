import Redis, { ReplyError, type RedisOptions } from 'ioredis'
import { NotLeaseHolderError, type LeaseFence } from '../bus'
import type { Registry } from '../registry'
import { CUT_OFF, reasonOf, redisOptions, RepeatedWarning, ScriptedRedis, STORE_CONDITION_CODES, StoreUnavailableError, type Log } from './client'
import { RedisBus } from './redis-bus'
import { DROP_IDLE_CONSUMERS } from './scripts'
import { utf8OrNull } from '../json'
import { within } from '../within'
import { RedisState } from './redis-state'
import { RedisRequestCounter } from './request-counter'
import { SentinelSwitchWatch } from './sentinel-watch'

export interface RedisEngineOptions {
  url: string
  /** Sentinels that name the master `url`'s host stands for; empty or absent: `url` is the server. */
  sentinels?: Array<{ host: string, port: number }>
  sentinelPassword?: string | null
  prefix: string
  historySize: number
  historyTtlS: number
  presenceGraceMs: number
  instanceTtlMs: number
  /** How long start-up waits for every connection to be ready (ioredis retries meanwhile). */
  startupTimeoutMs?: number
  /** How long a command waits for Redis's answer on a connection that stays up (a frozen Redis). */
  commandTimeoutMs?: number
  /** Ends the start-up early (a stop signal): it then rejects, leaving nothing behind. */
  startupSignal?: AbortSignal
}

/** How many pub/sub ingress messages, and how many bytes of them, may wait to be published. */
export const MAX_QUEUED_INGRESS = 10_000
export const MAX_QUEUED_INGRESS_BYTES = 64 * 1024 * 1024

/**
 * How often the holder renews the ingress lease, and the others ask whether
 * it still does and still listens (see LEASE): plain PUBLISH ingress messages
 * sent after a holder died wait in the standbys until one takes the lease over.
 */
export const TAKEOVER_PROBE_MS = 250
/**
 * What a standby keeps of the ingress messages, for a takeover from a holder
 * that died: past it (bytes), the oldest go first. Entries also go once
 * older than a lease, past any takeover they could serve.
 */
const STANDBY_MAX_BYTES = 32 * 1024 * 1024

/** Where an ingress message came: `<prefix>publish`, or `stream:<connectionId>`. */
export type IngressSource = { kind: 'publish' } | { kind: 'stream', connectionId: string }

/** An ingress message a standby kept, and its place: the `count`-th after marker `mark` (see LEASE). */
interface KeptMessage {
  source: IngressSource
  /** null: not UTF-8 (see utf8OrNull). */
  payload: string | null
  mark: number
  count: number
  at: number
  bytes: number
}

/** Renewals a holder may miss before a silent one loses the lease: a slow turn of its event loop is not a death. */
const MISSED_RENEWALS = 4
/** How long a stopping holder waits for a successor to listen (then lets the lease go as a dying one would). */
const HANDOVER_WAIT_MS = 1000
/** How long a stopping holder waits for what it took in to be published, when its stop has no deadline. */
const HANDOVER_DRAIN_MS = 10_000
/** Time a stop keeps for itself after the hand-over: passing or letting the lease go, and saying so. */
const HANDOVER_MARGIN_MS = 150
/** How long a stop waits for the ingress channels' UNSUBSCRIBE. */
const UNSUBSCRIBE_WAIT_MS = 1000

/** This instance takes over from a stopping holder (IngressLeader.handOver). */
interface Succession {
  holder: string
  /** Its own marker came back: every ingress message from here on is this instance's to handle. */
  marked: boolean
  /** Settles true once it holds the lease, false if the hand-over failed. */
  leaseTaken: Promise<boolean>
  settle: (taken: boolean) => void
  timer: NodeJS.Timeout
  /** Kept messages dropped because the lease never came: warned once. */
  dropped: number
}

/**
 * Handles one message that arrived on an ingress channel (`<prefix>publish`
 * or `stream:<connectionId>`) in two steps: it resolves once the message's
 * events are handed to Redis (or the message is dropped), with the promise of
 * their publication. Messages are handed over one after another, in arrival
 * order, which orders their ids; their publications overlap. They are
 * published under `fence` (EventBus.publish): a holder that lost its lease
 * without noticing yet publishes nothing.
 */
export type IngressHandler = (source: IngressSource, payload: string | null, fence: LeaseFence) => Promise<{ published: Promise<void> }>

/**
 * Every instance receives a PUBLISH on an ingress channel, yet each message
 * must be handled once. One instance holds a lease in Redis (`<prefix>leader`)
 * and handles them; the others keep trying to take the lease, so one takes
 * over about a second after the holder's process died (its connection
 * closed, and it stopped renewing), and within a lease when its connection
 * stays open (a frozen process). Started instances listen to the ingress
 * channels as standbys, keeping what comes for a lease's time: one that
 * takes over from a holder that died publishes what came after the last
 * message the holder published (its place is recorded with each publish;
 * see LEASE), so the second of silence loses nothing.
 * The same holder clears what dead instances left behind, and ends the
 * presence graces their (or stopped instances') timers can no longer end.
 */
export class IngressLeader {
  /** Holds the lease and is subscribed to the ingress channels: only both together make it the holder. */
  private holding = false
  /**
   * The ingress subscriptions may be in place while this instance does not
   * hold the lease: an unsubscribe that failed while the subscriber was down
   * is undone by ioredis restoring them on reconnect, so it is tried again.
   */
  private subscribed = false
  /**
   * The subscriber (re)connected. ioredis resubscribes by itself, but loses
   * that if the connection drops again before Redis answers: the holder
   * subscribes again, which Redis takes as a no-op when nothing was lost.
   */
  private reconnected = false
  /**
   * Ticks must not interleave: one's unsubscribe could land after another's
   * subscribe. A tick asked for while one runs runs after it (once, however
   * many ask), so a caller always gets a check that started after its call.
   */
  private running: Promise<void> | null = null
  private rerun: Promise<void> | null = null
  /** Listens to the ingress channels while not holding the lease (from start()), keeping what comes. */
  private standby = false
  /** The last marker heard on `<prefix>ingress-mark`, and the ingress messages since; 0: none heard since the subscriber (re)connected. */
  private mark = 0
  private markCount = 0
  private readonly kept: KeptMessage[] = []
  private keptHead = 0
  private keptBytes = 0
  /** Kept messages let go for their age or the bound since the last takeover: a replay may then have a gap. */
  private keptDropped = false
  /** The standby's subscriptions went through on the subscriber's current connection. */
  private standbyHeard = false
  private standbyInFlight = false
  /** Failed since they last went through: warned once. */
  private standbyFailing = false
  /** The place from which what this instance kept is its to publish, when this check took the lease (LEASE's answer). */
  private takenAt: string | null = null
  /** A tick asked for the holder's upkeep (reaping, graces), not only a renewal: the next check does it. */
  private upkeepAsked = false
  private stopped = false
  private stopping = false
  /** Subscribed to `leader-free` and to its own `alive:` channel since start (again after each reconnect). */
  private listening = false
  /** Whether that subscribe went through on the subscriber's current connection. */
  private heard = false
  private listenInFlight = false
  /** Failed since it last went through: warned once, not at every probe. */
  private listenFailing = false
  private succession: Succession | null = null
  /** Stopping, this holder waits for a successor's marker. */
  private awaitingSuccessor: ((successor: string) => void) | null = null
  /** Past the successor's marker: the messages that come now are the successor's. */
  private handedOff = false
  private readonly drainWaiters = new Set<() => void>()
  /** When the process must be gone (beginStop): the hand-over's waits end in time for the lease to be let go. */
  private stopDeadline = Infinity
  /**
   * How long a successor waits for the lease: past the holder's lease, which
   * then expires (a holder frozen mid-hand-over), so that it can take it
   * (LEASE lets only it) rather than drop what it kept.
   */
  private readonly successionWaitMs: number
  /** The last ingress message's hand-over to Redis: the next one starts when it is done. */
  private pending: Promise<void> = Promise.resolve()
  /** Messages, and their bytes, not yet published: waiting in `pending`, or in flight to Redis. */
  private queued = 0
  private queuedBytes = 0
  /** Dropping since the queue was last empty: warned once. */
  private overflowing = false
  private overflowListener: (source: 'publish' | 'stream') => void = () => {}
  /** Local deadline: past it this instance stops acting even if Redis is unreachable. */
  private validUntil = 0
  private readonly timer: NodeJS.Timeout
  private readonly probeTimer: NodeJS.Timeout | undefined
  private readonly staleMs: number
  private readonly checkEveryMs: number
  private graceTimer: NodeJS.Timeout | undefined
  private handler: IngressHandler = async () => ({ published: Promise.resolve() })
  /** What every ingress message is published under: this instance holding the lease. */
  private readonly fence: LeaseFence
  /**
   * A Redis that keeps its connection but does not answer (frozen, or behind
   * a network that drops packets) fails every check, several a second.
   */
  private readonly checkFailed: RepeatedWarning
  /** The last check's LEASE was answered (see check). */
  private leaseAnswered = false

  constructor (
    private readonly commands: ScriptedRedis,
    private readonly subscriber: Redis,
    private readonly state: RedisState,
    private readonly prefix: string,
    private readonly leaseMs: number,
    private readonly log: Log,
    probeEveryMs: number | null = TAKEOVER_PROBE_MS
  ) {
    // As Buffers, as the bus reads its events (see RedisState).
    const publishChannel = Buffer.from(`${prefix}publish`)
    const leaderFreeChannel = Buffer.from(`${prefix}leader-free`)
    const markChannel = Buffer.from(`${prefix}ingress-mark`)
    subscriber.on('messageBuffer', (name: Buffer, message: Buffer) => {
      // In the order Redis sent them: a successor's marker among the ingress messages (see handOver).
      if (name.equals(publishChannel)) this.dispatch({ kind: 'publish' }, utf8OrNull(message))
      else if (name.equals(markChannel)) this.onMark(Number(message.toString()))
      else if (name.equals(leaderFreeChannel)) this.onLeaseNotice(message.toString())
    })
    subscriber.on('pmessageBuffer', (_pattern: string, name: Buffer, message: Buffer) => {
      // A name that is not UTF-8 names no connection: the handler refuses it as such.
      const channel = name.toString()
      if (channel.startsWith('stream:')) this.dispatch({ kind: 'stream', connectionId: channel.slice('stream:'.length) }, utf8OrNull(message))
    })
    // A dropped connection may mean a Redis that restarted empty, its lease
    // key gone and free for another instance: the lease counts again only
    // once a check renews it, which a reconnect starts at once. (Meanwhile an
    // ingress message is dropped rather than handled twice.)
    // (The first connections at start-up are not reconnects: start-up checks itself.)
    let dropped = false
    const unconfirm = (): void => {
      dropped = true
      this.validUntil = 0
    }
    const recheck = (): void => { if (dropped) this.check() }
    subscriber.on('close', () => {
      unconfirm()
      this.heard = false
      // Messages come unheard until the subscriptions are back: places are not known until the next marker.
      this.mark = 0
      this.standbyHeard = false
      // Nor can what was kept be set against a record read after the
      // reconnect: a Redis that restarted may have come back with an older one.
      this.dropKept()
    })
    commands.redis.on('close', unconfirm)
    subscriber.on('ready', () => {
      this.reconnected = true
      // The subscriber does not resubscribe by itself (client.ts).
      if (this.listening) void this.listen()
      if (this.succession !== null) void this.subscribeIngress().catch(() => {})
      recheck()
    })
    commands.redis.on('ready', recheck)
    this.checkFailed = new RepeatedWarning(log, 'ingress lease check failed')
    this.fence = { holder: state.instanceId, leaseMs }
    this.successionWaitMs = leaseMs + 2000
    this.checkEveryMs = Math.max(100, Math.floor(leaseMs / 3))
    this.timer = setInterval(() => this.check(), this.checkEveryMs).unref()
    // Within the lease, so that a dead holder is taken over from, with its
    // record (see LEASE), before its key expires and takes the record's worth with it.
    const probeMs = probeEveryMs ?? TAKEOVER_PROBE_MS
    this.staleMs = Math.max(probeMs, Math.min(MISSED_RENEWALS * probeMs, leaseMs - 3 * probeMs))
    this.probeTimer = probeEveryMs === null ? undefined : setInterval(() => this.check(false), probeEveryMs).unref()
  }

  private check (upkeep = true): void {
    if (this.stopped) return
    // Every caller of a check that failed hears of it (see tick): once a
    // minute at most. Over once a whole check has passed with Redis's answer
    // (a reconnect skips it, and a failed reap after a renewal is no end).
    this.tick(upkeep).then(() => {
      if (this.leaseAnswered) this.checkFailed.clear()
    }, (error: unknown) => {
      // A fault of the gateway's own, not Redis's, keeps its stack.
      this.checkFailed.warn({ reason: reasonOf(error), ...(error instanceof StoreUnavailableError ? {} : { err: error }) })
    })
  }

  /**
   * Listens for holders giving the lease up, says it is alive (see LEASE),
   * and takes the lease if it is free.
   */
  async start (): Promise<void> {
    this.listening = true
    this.standby = true
    await this.listen()
    await this.tick()
  }

  /**
   * Never rejects: the notice is only a hint, and the timer's checks still take
   * a free lease. (Not heard alive, this instance would lose a lease it took
   * at another's next check: another holds it, which is all ingress needs.)
   */
  private async listen (): Promise<void> {
    this.listenInFlight = true
    try {
      await this.subscriber.subscribe(`${this.prefix}leader-free`, `${this.prefix}alive:${this.state.instanceId}`)
      this.heard = true
      if (this.listenFailing) this.log.info({ instance: this.state.instanceId }, 'subscribed to lease hand-overs')
      this.listenFailing = false
    } catch (error) {
      if (!this.listenFailing) this.log.warn({ reason: reasonOf(error) }, 'could not subscribe to lease hand-overs')
      this.listenFailing = true
    } finally {
      this.listenInFlight = false
    }
    if (this.standby) await this.listenAsStandby()
  }

  /** Never rejects: a failure is warned once and tried again at the next checks. */
  private async listenAsStandby (): Promise<void> {
    this.standbyInFlight = true
    try {
      await this.subscribeIngress()
      // Last: a marker heard here came after every ingress subscription was in place,
      // so the messages counted after it are those every other instance counts.
      await this.subscriber.subscribe(`${this.prefix}ingress-mark`)
      // Places are known from the first marker on: one now, not at the holder's next renewal.
      await this.commands.run('MARK', [this.prefix])
      this.standbyHeard = true
      if (this.standbyFailing) this.log.info({ instance: this.state.instanceId }, 'listening to the ingress channels as a standby')
      this.standbyFailing = false
    } catch (error) {
      if (!this.standbyFailing) this.log.warn({ reason: reasonOf(error) }, 'could not listen to the ingress channels as a standby: messages sent while a holder that died is replaced would be lost')
      this.standbyFailing = true
    } finally {
      this.standbyInFlight = false
    }
  }

  /**
   * A subscribe Redis refused (an ACL, a subscriber over its output limit) is
   * tried again at each check, not only at the next reconnect: unheard, this
   * instance cannot take the lease from a holder that died. Not awaited, so
   * that a subscriber that never answers cannot hold up the lease checks.
   */
  private listenAgainIfRefused (): void {
    if (this.subscriber.status !== 'ready' || this.listenInFlight || this.standbyInFlight) return
    if (this.listening && !this.heard) void this.listen()
    else if (this.standby && !this.standbyHeard) void this.listenAsStandby()
  }

  /**
   * The instance is draining: it keeps the lease if it holds it (and hands it
   * over when it stops), but takes it no more, or a stop elsewhere would hand
   * the lease to it just before it hands it over again.
   */
  beginStop (deadline = Infinity): void {
    this.stopping = true
    this.stopDeadline = deadline
  }

  /** Listening to the ingress channels, keeping what comes, without holding the lease. */
  get isStandby (): boolean {
    return this.standby && !this.holding
  }

  get isLeader (): boolean {
    return this.holding && Date.now() < this.validUntil
  }

  onMessage (handler: IngressHandler): void {
    this.handler = handler
  }

  /** `upkeep` false: a probe, which renews or takes the lease but leaves the holder's upkeep to the regular checks. */
  async tick (upkeep = true): Promise<void> {
    if (upkeep) this.upkeepAsked = true
    const running = this.running
    if (running === null) {
      const run = this.checkLease().finally(() => { this.running = null })
      this.running = run
      return await run
    }
    this.rerun ??= running.catch(() => {}).then(async () => {
      this.rerun = null
      await this.tick()
    })
    return await this.rerun
  }

  private async checkLease (): Promise<void> {
    const upkeep = this.upkeepAsked
    this.upkeepAsked = false
    this.leaseAnswered = false
    // A successor that began to stop still takes the lease it was promised, and passes it on at its own stop.
    if (this.stopped || (this.stopping && !this.holding && this.succession === null)) return
    if (this.commands.redis.status !== 'ready') return await this.step(false)
    this.listenAgainIfRefused()
    const startedAt = Date.now()
    const wasHolding = this.holding
    this.takenAt = null
    this.pruneKept(startedAt)
    const answer = await this.commands.run('LEASE', [this.prefix, this.state.instanceId, this.leaseMs, this.staleMs]) as number | [number, string]
    const held = answer === 1 || Array.isArray(answer)
    if (Array.isArray(answer)) this.takenAt = String(answer[1])
    this.leaseAnswered = true
    if (held) this.validUntil = startedAt + this.leaseMs - 200
    await this.step(held)
    if (this.holding && (upkeep || !wasHolding)) {
      await this.reapDead()
      this.endGracesAt(await this.state.endDueGraces())
    }
  }

  /**
   * The graces of a stopped or dead instance end here, not by its timers: one
   * due before the next check ends on time, so that its user:offline comes
   * PRESENCE_GRACE_MS after the close, not up to a check later.
   */
  private endGracesAt (dueInMs: number | null): void {
    clearTimeout(this.graceTimer)
    if (dueInMs === null || this.stopped || dueInMs >= this.checkEveryMs) return
    this.graceTimer = setTimeout(() => {
      if (!this.isLeader || this.stopped) return
      this.state.endDueGraces().then((next) => this.endGracesAt(next), (error: unknown) => {
        this.log.warn({ reason: reasonOf(error) }, 'presence graces not ended')
      })
    }, dueInMs + 1).unref()
  }

  async stop (): Promise<void> {
    const succession = this.succession
    if (succession !== null) {
      // A successor first takes the lease it was promised (its checks still
      // run), to pass it on below: dropped, what it kept would be lost.
      await within(succession.leaseTaken, Math.min(this.successionWaitMs, this.stopDeadline - 4 * HANDOVER_MARGIN_MS - Date.now()), () => false)
    }
    this.stopped = true
    // No longer a standby: it will not take over, and the ingress subscriptions go below.
    this.standby = false
    this.dropKept()
    clearInterval(this.timer)
    clearInterval(this.probeTimer)
    clearTimeout(this.graceTimer)
    // A check in flight may take the lease after this looked: it ends first.
    await this.rerun?.catch(() => {})
    await this.running?.catch(() => {})
    // Not to a Redis that let a command time out and has not answered since
    // (frozen): each step would wait its REDIS_COMMAND_TIMEOUT_MS, and the
    // stop would end by SHUTDOWN_TIMEOUT_MS, cut short. The lease then
    // expires on its own, as a dead holder's does.
    if (this.holding && this.commands.redis.status === 'ready' && this.commands.isAnswering()) {
      const passed = await this.handOver()
      // The subscriber has no command timeout (the bus watches it with PINGs):
      // frozen, it would hold the UNSUBSCRIBE, and the stop, for good. Its
      // connection closes right after anyway.
      await within(this.step(false), UNSUBSCRIBE_WAIT_MS, () => {})
      if (this.commands.isAnswering()) {
        if (!passed) await this.release()
        await this.commands.redis.publish(`${this.prefix}leader-free`, this.state.instanceId).catch(() => {})
      }
    } else if (this.subscribed && this.succession === null) {
      // A standby's subscriptions (see step for why the wait is bounded).
      await within(this.step(false), UNSUBSCRIBE_WAIT_MS, () => {})
    }
    if (this.succession !== null) this.endSuccession(this.succession, false)
  }

  /**
   * Passes the lease to another instance without a message lost or handled
   * twice, which letting it go would not: a plain PUBLISH that comes between
   * this holder's unsubscribe and the next one's subscribe reaches no one.
   * The successor subscribes to the ingress channels first, then publishes
   * a marker on `leader-free`. Redis sends every subscriber its messages in
   * the order it ran the PUBLISHes, so the marker stands at the same place
   * among the ingress messages for both: this holder handles those before
   * it, the successor those after it, once this one has published its last
   * and passed it the lease. Resolves false when no successor came forward
   * (or the lease could not be passed): then the lease is let go as before.
   */
  private async handOver (): Promise<boolean> {
    const self = this.state.instanceId
    const timeLeft = (): number => this.stopDeadline - HANDOVER_MARGIN_MS - Date.now()
    // Too little time for a successor to answer: let it go while there is time to.
    if (timeLeft() < 2 * HANDOVER_MARGIN_MS) return false
    let noSuccessor = (): void => {}
    const successorMarked = within(new Promise<string | null>((resolve) => {
      this.awaitingSuccessor = resolve
      noSuccessor = () => resolve(null)
    }), Math.min(HANDOVER_WAIT_MS, timeLeft() / 2), () => null)
    try {
      // Heard by this instance's own subscriber, and by any other.
      // Through call(): one that times out marks Redis silent, and the stop skips its other steps.
      if (await this.commands.call(async (redis) => await redis.publish(`${this.prefix}leader-free`, `handing:${self}`)) < 2) return false
      const successor = await successorMarked
      if (successor === null) return false
      // What came before the marker is this instance's alone: published before
      // the lease goes, or, past the deadline, lost with the process.
      await this.drained(Math.min(HANDOVER_DRAIN_MS, timeLeft()))
      const passed = await this.commands.run('PASS_LEASE', [this.prefix, self, successor, this.leaseMs]) === 1
      if (passed) this.log.info({ instance: self, successor }, 'passed the ingress lease on')
      return passed
    } catch (error) {
      this.log.warn({ reason: reasonOf(error) }, 'could not pass the ingress lease on')
      return false
    } finally {
      // Settles the wait (and clears its timer) on the ways out before the marker.
      noSuccessor()
      this.awaitingSuccessor = null
    }
  }

  /** Resolves once every message taken in is published (or `limitMs` has passed). */
  private async drained (limitMs: number): Promise<void> {
    if (this.queued === 0) return
    let wake = (): void => {}
    await within(new Promise<void>((resolve) => {
      wake = resolve
      this.drainWaiters.add(wake)
    }), limitMs, () => {})
    this.drainWaiters.delete(wake)
  }

  /** What comes on `leader-free`: a holder stopping (`handing:`), a successor's marker (`marked:`), or a lease let go. */
  private onLeaseNotice (notice: string): void {
    const self = this.state.instanceId
    if (notice.startsWith('handing:')) {
      const holder = notice.slice('handing:'.length)
      if (holder !== self) void this.succeed(holder)
      return
    }
    if (notice.startsWith('marked:')) {
      const [successor, holder] = notice.slice('marked:'.length).split('\n')
      if (successor === self && this.succession?.holder === holder) this.succession.marked = true
      else if (holder === self && this.awaitingSuccessor !== null && successor !== undefined) {
        this.handedOff = true
        this.awaitingSuccessor(successor)
      }
      return
    }
    // Another instance gave the lease up (it is stopping): until one takes
    // it, a PUBLISH ingress message is handled by no one, so not a timer
    // tick later. (The notice is only a hint; the tick remains.)
    if (notice !== self) this.check()
  }

  /** Offers to take over from `holder`, which is stopping (see handOver). */
  private async succeed (holder: string): Promise<void> {
    if (this.stopping || this.stopped || this.holding || this.succession !== null || this.subscriber.status !== 'ready') return
    let settle = (_taken: boolean): void => {}
    const leaseTaken = new Promise<boolean>((resolve) => { settle = resolve })
    const succession: Succession = { holder, marked: false, leaseTaken, settle, timer: setTimeout(() => this.endSuccession(succession, false), this.successionWaitMs).unref(), dropped: 0 }
    this.succession = succession
    try {
      if (await this.commands.run('CLAIM_SUCCESSION', [this.prefix, holder, this.state.instanceId, this.successionWaitMs]) !== 1) {
        this.succession = null
        clearTimeout(succession.timer)
        return
      }
      // A check already past its look at the succession may still unsubscribe: it ends first.
      await this.running?.catch(() => {})
      if (this.succession !== succession) return
      await this.subscribeIngress()
      await this.commands.redis.publish(`${this.prefix}leader-free`, `marked:${this.state.instanceId}\n${holder}`)
    } catch (error) {
      this.log.warn({ holder, reason: reasonOf(error) }, 'could not take over the ingress lease from a stopping holder')
      this.endSuccession(succession, false)
    }
  }

  private endSuccession (succession: Succession, taken: boolean): void {
    if (this.succession !== succession) return
    clearTimeout(succession.timer)
    this.succession = null
    succession.settle(taken)
    if (taken) return
    // Given up: the claim goes, so that any instance may take the lease again.
    void this.deleteOwn(`${this.prefix}successor`)
    // Not the holder: the check lets the ingress subscriptions go.
    this.check()
  }

  private async subscribeIngress (): Promise<void> {
    this.subscribed = true
    await this.subscriber.subscribe(`${this.prefix}publish`)
    await this.subscriber.psubscribe('stream:*')
  }

  /** Never rejects: a failure is logged or left for the next tick to retry. */
  private async step (held: boolean): Promise<void> {
    const instance = this.state.instanceId
    if (held) {
      if (this.holding && !this.reconnected) return
      this.reconnected = false
      try {
        await this.subscribeIngress()
      } catch (error) {
        // Renewing a lease while unsubscribed would drop every ingress message
        // cluster-wide: let another instance take it, and retry on the next tick.
        if (this.holding) this.log.info({ instance }, 'gave up the ingress lease')
        this.holding = false
        this.log.warn({ instance, reason: reasonOf(error) }, 'could not subscribe to the ingress channels')
        await this.release()
        return
      }
      if (!this.holding) this.log.info({ instance }, 'took the ingress lease')
      const tookOver = !this.holding
      this.holding = true
      // Before the successor's kept messages are let through: those come after the marker, these before.
      if (tookOver) this.publishKept(this.succession === null ? this.takenAt : null)
      if (this.succession !== null) this.endSuccession(this.succession, true)
      return
    }
    if (this.holding) this.log.info({ instance }, 'gave up the ingress lease')
    this.holding = false
    // A successor listens before it holds the lease, and a standby all along.
    if (!this.subscribed || this.succession !== null || this.standby) return
    if (this.subscriber.status !== 'ready') {
      // Its socket is gone, and a new one starts without subscriptions (client.ts):
      // nothing to undo. Asked meanwhile, UNSUBSCRIBE can wait on a socket that
      // never answers, and a stop would wait on it for good.
      this.subscribed = false
      return
    }
    try {
      await this.subscriber.unsubscribe(`${this.prefix}publish`)
      await this.subscriber.punsubscribe('stream:*')
      this.subscribed = false
    } catch {
      // The subscriber is down; `subscribed` stays set, so the next tick tries again.
    }
  }

  /** Hands the lease over at once rather than after it expires. */
  private async release (): Promise<void> {
    await this.deleteOwn(`${this.prefix}leader`)
  }

  /** Deletes `key` while it still names this instance (the lease, a succession claim): never another's. */
  private async deleteOwn (key: string): Promise<void> {
    await this.commands.call(async (redis) => await redis.eval(
      "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0",
      1, key, this.state.instanceId
    )).catch(() => {})
  }

  private onMark (mark: number): void {
    if (!Number.isFinite(mark)) return
    this.mark = mark
    this.markCount = 0
  }

  /** `payload` null: bytes that are not UTF-8, which the handler refuses; they still take their place among the messages. */
  private dispatch (source: IngressSource, payload: string | null): void {
    let position = ''
    if (this.mark !== 0) position = `${this.mark}:${++this.markCount}`
    if (this.handedOff) return
    // A successor keeps what comes after its marker until the lease is passed to it.
    let succession: Succession | null = null
    if (!this.isLeader) {
      if (this.succession?.marked !== true) {
        if (this.standby && !this.holding && this.mark !== 0) this.keep(source, payload, this.mark, this.markCount)
        return
      }
      succession = this.succession
    }
    this.enqueue(source, payload, position, succession)
  }

  private keep (source: IngressSource, payload: string | null, mark: number, count: number): void {
    const now = Date.now()
    // Characters, not bytes: near enough for a bound, without measuring each message.
    const bytes = (payload?.length ?? 0) + 64
    this.kept.push({ source, payload, mark, count, at: now, bytes })
    this.keptBytes += bytes
    this.pruneKept(now)
  }

  /** Lets kept messages go: those older than a lease, and past STANDBY_MAX_BYTES the oldest. */
  private pruneKept (now: number): void {
    while (this.keptHead < this.kept.length) {
      const oldest = this.kept[this.keptHead]
      if (now - oldest.at <= this.leaseMs && this.keptBytes <= STANDBY_MAX_BYTES) break
      this.keptBytes -= oldest.bytes
      this.keptHead++
      this.keptDropped = true
    }
    if (this.keptHead === this.kept.length) {
      this.kept.length = 0
      this.keptHead = 0
    } else if (this.keptHead > 1024 && this.keptHead * 2 > this.kept.length) {
      this.kept.splice(0, this.keptHead)
      this.keptHead = 0
    }
  }

  /**
   * On taking the lease: the kept messages after `after` (LEASE's answer:
   * the place the holder it took over from had published up to, or the
   * marker it took the lease with) are this instance's to publish, before
   * any that comes next. The rest are let go.
   */
  private publishKept (after: string | null): void {
    const kept = this.kept.slice(this.keptHead)
    const dropped = this.keptDropped
    this.dropKept()
    const place = after === null ? null : /^(\d+):(\d+)$/.exec(after)
    if (place === null) return
    const [mark, count] = [Number(place[1]), Number(place[2])]
    let published = 0
    for (const message of kept) {
      if (message.mark < mark || (message.mark === mark && message.count <= count)) continue
      // Every kept one is past the holder's last, older ones were let go, and
      // the first is not the one right after it: some may be missing.
      if (published === 0 && dropped && message === kept[0] && !(message.mark === mark && message.count === count + 1)) {
        this.log.warn({}, 'took the ingress lease: messages the holder before had not published may be lost (a standby keeps them for a lease, 32 MB at most)')
      }
      this.enqueue(message.source, message.payload, `${message.mark}:${message.count}`, null)
      published++
    }
    if (published > 0) this.log.info({ messages: published }, 'took the ingress lease: publishing the messages kept as a standby that no holder published')
  }

  private dropKept (): void {
    this.kept.length = 0
    this.keptHead = 0
    this.keptBytes = 0
    this.keptDropped = false
  }

  private enqueue (source: IngressSource, payload: string | null, position: string, succession: Succession | null): void {
    // A publisher faster than messages are published (a conversation
    // target takes a round trip first; a slow Redis) would grow the queue,
    // and the process, without end: past the bound, messages are dropped.
    const bytes = payload === null ? 0 : Buffer.byteLength(payload)
    if (this.queued >= MAX_QUEUED_INGRESS || this.queuedBytes + bytes > MAX_QUEUED_INGRESS_BYTES) {
      this.overflowListener(source.kind)
      if (!this.overflowing) {
        this.overflowing = true
        this.log.warn({ source: source.kind, queued: this.queued, bytes: this.queuedBytes }, 'ingress messages dropped: more are waiting to be published than the bound')
      }
      return
    }
    this.queued++
    this.queuedBytes += bytes
    const done = (): void => {
      this.queued--
      this.queuedBytes -= bytes
      if (this.queued !== 0) return
      this.overflowing = false
      for (const wake of this.drainWaiters) wake()
    }
    const failed = (error: unknown): void => {
      if (!(error instanceof NotLeaseHolderError)) {
        this.log.warn({ err: error, source: source.kind }, 'ingress message failed')
        return
      }
      // The lease key vanished (an emptied store) and another instance took
      // it before this one's next check: that one handles the message. One
      // check is enough for every message that finds it so.
      if (this.validUntil === 0) return
      this.log.info({ source: source.kind }, 'ingress lease lost to another instance: message left to it')
      this.validUntil = 0
      this.check()
    }
    // Each message is handed to Redis after the previous one: a batch or a
    // conversation target takes more steps before it is handed over than a
    // single event sent after it, and ids must follow the order messages came in.
    // A message counts until its publish settles, not only until it is
    // handed over: with Redis slow to answer, the publishes in flight (and
    // ioredis's queue of their payloads) are what grows.
    this.pending = this.pending
      .then(async () => {
        if (succession !== null && !(await succession.leaseTaken)) {
          done()
          if (succession.dropped++ === 0) this.log.warn({ holder: succession.holder }, 'ingress messages dropped: the stopping holder did not pass the lease on')
          return
        }
        let published: Promise<void>
        try {
          ({ published } = await this.handler(source, payload, { ...this.fence, position }))
        } catch (error) {
          done()
          throw error
        }
        published.then(done, done)
        published.catch(failed)
      })
      .catch(failed)
  }

  /** `listener` hears of each message dropped past the queue's bound. */
  onOverflow (listener: (source: 'publish' | 'stream') => void): void {
    this.overflowListener = listener
  }

  private async reapDead (): Promise<void> {
    if (!this.state.judgesSilence()) return
    for (const instance of await this.state.deadInstances()) {
      this.log.info({ instance }, 'clearing a dead instance')
      await this.state.reap(instance)
    }
  }
}

const DURABLE_GROUP = 'gateway'
const DURABLE_CLAIM_IDLE_MS = 30_000
/** Tries of an entry whose handling fails for a reason of its own before it is set aside. */
const DURABLE_MAX_ATTEMPTS = 5
const DURABLE_BLOCK_MS = 1000

/**
 * Redis errors that say Redis as a whole takes no such command now: its own
 * condition (STORE_CONDITION_CODES), and permissions, a cluster's redirects,
 * a lost script cache: every entry would fail alike until it passes.
 */
const REDIS_WIDE_ERROR = new RegExp(`^(?:${[...STORE_CONDITION_CODES, 'NOPERM', 'NOAUTH', 'WRONGPASS', 'MOVED', 'ASK', 'NOSCRIPT', 'UNBLOCKED', 'EXECABORT'].join('|')})\\b|^ERR max number of clients`)

/**
 * Gets each entry's `payload` field, or null for an entry without one (it is
 * still acknowledged), and the key to publish it once with (PUBLISH_ONCE's,
 * without the prefix).
 */
export type DurableHandler = (payload: string | null, onceKey: string) => Promise<void>

/** The message of an error Redis answered, or null for any other error. */
function replyMessage (error: unknown): string | null {
  // ioredis types ReplyError loosely: instanceof does not narrow it.
  return error instanceof ReplyError ? (error as Error).message : null
}

// Fields come as [name, value, name, value…]: a value may be the word "payload".
function payloadOf (fields: string[]): string | null {
  for (let index = 0; index + 1 < fields.length; index += 2) {
    if (fields[index] === 'payload') return fields[index + 1]
  }
  return null
}

/**
 * The durable ingress: `XADD <prefix>ingress * payload <json>`, read through a
 * consumer group and acknowledged only once published. Only the lease holder
 * reads, so entries get ids in the order they were added. The group starts
 * at the stream's first entry: entries added before any gateway ran are
 * read too. Entries a holder took but never acknowledged (it died, or lost
 * the lease) are claimed by the next holder as it takes over, before any new
 * entry, and by any holder once idle for 30 s. The handler publishes each
 * entry at most once (keyed by its id), so a claimed entry that its first
 * holder had already published is not published again.
 */
export class DurableIngress {
  private running = true
  private handler: DurableHandler = async () => {}
  private droppedListener: (entryId: string) => void = () => {}
  private failing = { entryId: '', attempts: 0 }
  /** The Redis error of the entry set aside last, until an entry goes through. */
  private setAsideFor: string | null = null
  private readonly loop: Promise<void>
  private readonly readFailed: RepeatedWarning

  constructor (
    private readonly reader: Redis,
    private readonly key: string,
    private readonly consumer: string,
    private readonly leader: Pick<IngressLeader, 'isLeader'>,
    private readonly log: Log
  ) {
    this.readFailed = new RepeatedWarning(log, 'durable ingress read failed')
    this.loop = this.run()
  }

  onMessage (handler: DurableHandler): void {
    this.handler = handler
  }

  /** Called for an entry set aside after failing DURABLE_MAX_ATTEMPTS times. */
  onDropped (listener: (entryId: string) => void): void {
    this.droppedListener = listener
  }

  async stop (): Promise<void> {
    this.running = false
    this.reader.disconnect()
    await this.loop
  }

  private async run (): Promise<void> {
    let lastClaim = 0
    let leading = false
    let recheckAt = 0
    while (this.running) {
      try {
        if (this.reader.status !== 'ready' || !this.leader.isLeader) {
          leading = false
          await new Promise((resolve) => setTimeout(resolve, 500).unref())
          continue
        }
        // '0', not '$': only used when the group is made, and a publisher
        // that started first has already added entries.
        await this.reader.xgroup('CREATE', this.key, DURABLE_GROUP, '0', 'MKSTREAM').catch((error: Error) => {
          if (!error.message.includes('BUSYGROUP')) throw error
        })
        // Every claim or batch cut short by the lease's loss leaves entries
        // pending to this consumer: whoever holds the lease next (this
        // instance again, maybe at once) takes them over before new ones.
        let complete = true
        if (!leading) {
          // Taking over: what the last holder left unacknowledged comes first.
          leading = true
          lastClaim = Date.now()
          // Its last blocking read may still hand it entries for a while
          // after this claim: once more when that read is surely over.
          recheckAt = lastClaim + 2 * DURABLE_BLOCK_MS
          complete = await this.claimPending(0)
        } else if (recheckAt !== 0 && Date.now() >= recheckAt) {
          recheckAt = 0
          complete = await this.claimPending(0)
          // Every instance that ever held the lease joined the group under
          // its own name; with the last holder's entries all claimed, those
          // with nothing pending would only stay listed in Redis for good.
          if (complete) await this.reader.eval(DROP_IDLE_CONSUMERS, 0, this.key, DURABLE_GROUP, this.consumer)
        } else if (Date.now() - lastClaim > DURABLE_CLAIM_IDLE_MS) {
          lastClaim = Date.now()
          complete = await this.claimPending(DURABLE_CLAIM_IDLE_MS)
        }
        if (complete && this.leader.isLeader) {
          const batch = await this.reader.xreadgroup('GROUP', DURABLE_GROUP, this.consumer, 'COUNT', 100, 'BLOCK', DURABLE_BLOCK_MS, 'STREAMS', this.key, '>') as Array<[string, Array<[string, string[]]>]> | null
          if (batch !== null) for (const [, entries] of batch) if (complete) complete = await this.handle(entries)
        }
        if (!complete || !this.leader.isLeader) leading = false
        this.readFailed.clear()
      } catch (error) {
        if (!this.running) return
        // A take-over claim cut short starts again: the last holder's
        // entries still come before newer ones.
        leading = false
        this.readFailed.warn({ reason: reasonOf(error) })
        await new Promise((resolve) => setTimeout(resolve, 500).unref())
      }
    }
  }

  /** Claims and handles every entry pending for at least `minIdleMs`, oldest first; false if cut short by the lease's loss. */
  private async claimPending (minIdleMs: number): Promise<boolean> {
    let cursor = '0-0'
    do {
      if (!this.running || !this.leader.isLeader) return false
      // Redis 7 adds the ids of pending entries deleted from the stream
      // meanwhile (it drops them from the pending list itself).
      const [next, entries, deleted] = await this.reader.xautoclaim(this.key, DURABLE_GROUP, this.consumer, minIdleMs, cursor, 'COUNT', 100) as [string, Array<[string, string[] | null]>, string[] | undefined]
      if (deleted !== undefined && deleted.length > 0) this.lostEntries(deleted)
      if (!await this.handle(entries)) return false
      cursor = next
    } while (cursor !== '0-0')
    return true
  }

  /** Handles entries in order; false if the lease was lost before the last. */
  private async handle (entries: Array<[string, string[] | null]>): Promise<boolean> {
    for (const [entryId, fields] of entries) {
      // A holder that lost the lease mid-batch leaves the rest to the next
      // one, which claims them. (One stalled inside a publish for longer than
      // IDEMPOTENCY_WINDOW_S could still publish an entry twice: its key,
      // kept that long, is what stops it.)
      if (!this.running || !this.leader.isLeader) return false
      if (fields === null) {
        // Redis 6 lists a pending entry deleted from the stream with no
        // fields: nothing to deliver, and unacknowledged it would come back
        // at every claim.
        this.lostEntries([entryId])
        await this.reader.xack(this.key, DURABLE_GROUP, entryId)
        continue
      }
      const onceKey = `ingress:${entryId}`
      try {
        await this.handler(payloadOf(fields), onceKey)
        this.setAsideFor = null
      } catch (error) {
        if (!this.givesUp(entryId, error)) throw error
        await this.setAside(entryId, fields, error)
      }
      // Handled, the entry is deleted: the stream would otherwise keep every
      // message ever sent, and publishers need not trim it themselves.
      await this.reader.multi().xack(this.key, DURABLE_GROUP, entryId).xdel(this.key, entryId).exec()
    }
    return true
  }

  /**
   * Whether a failed entry is set aside rather than tried again. Entries go
   * out in order, so one that can never be handled would hold up every later
   * one for good; and a publish script that fails on one of its channels
   * has already published on the ones before it, again at every try.
   *
   * Waited out, however long, rather than emptying the stream: Redis being
   * away, and what it answers when it takes no such command at all (out of
   * memory, an ACL). An error of the gateway's own (a stack overflow, say)
   * or a Redis error of the entry's own (a key of the wrong type among its
   * channels, which an operator's write can leave) counts toward setting it
   * aside; but the same Redis error right after an entry was set aside for
   * it (nothing handled since) more likely comes from a key every entry
   * uses, and is waited out.
   */
  private givesUp (entryId: string, error: unknown): boolean {
    if (error instanceof StoreUnavailableError) return false
    const redisError = replyMessage(error)
    if (redisError !== null && (REDIS_WIDE_ERROR.test(redisError) || redisError === this.setAsideFor)) return false
    if (this.failing.entryId !== entryId) this.failing = { entryId, attempts: 0 }
    return ++this.failing.attempts >= DURABLE_MAX_ATTEMPTS
  }

  /** Moves an entry that kept failing to `<key>:dead`, with its id and the error, where it can be looked at and added again. */
  private async setAside (entryId: string, fields: string[], error: unknown): Promise<void> {
    const reason = error instanceof Error ? `${error.name}: ${error.message}` : String(error)
    await this.reader.xadd(`${this.key}:dead`, '*', ...fields, 'entry', entryId, 'error', reason.slice(0, 500))
    this.setAsideFor = replyMessage(error)
    this.log.error({ err: error, entry: entryId, attempts: this.failing.attempts, deadLetter: `${this.key}:dead` }, 'durable ingress entry set aside: its handling kept failing')
    this.droppedListener(entryId)
  }

  private lostEntries (entryIds: string[]): void {
    this.log.warn({ entries: entryIds.slice(0, 10), count: entryIds.length }, 'durable ingress entries deleted from the stream before they were handled')
  }
}

export interface RedisEngine {
  bus: RedisBus
  state: RedisState
  ingress: IngressLeader
  durable: DurableIngress
  requests: RedisRequestCounter
  close: () => Promise<void>
}

/**
 * Logs a connection's errors (while `logging()` says so) once an outage and
 * once a minute while it lasts, not at every reconnect attempt.
 */
function warnOfErrors (client: Redis, name: string, log: Log, logging = (): boolean => true): void {
  const warning = new RepeatedWarning(log, 'redis error', { connection: name })
  client.on('error', (error: Error) => { if (logging()) warning.warn({ reason: error.message }) })
  client.on('ready', () => warning.clear())
}

/** How long a start waits on a Redis that neither answers nor fails before saying so. */
const UNANSWERED_LOG_MS = 2000

/**
 * Connects `client` and resolves once it is ready. A refused or dropped first
 * attempt does not end start-up: ioredis keeps reconnecting, and Redis
 * started beside the gateway (compose, a pod) is waited for until `deadline`.
 * The wait is logged once, not at every retry.
 */
async function untilReady (client: Redis, name: string, deadline: number, log: Log, signal?: AbortSignal): Promise<void> {
  let lastError = ''
  let waitLogged: 'not yet' | 'without a reason' | 'with a reason' = 'not yet'
  let giveUp = (): void => {}
  let refused: string | null = null
  const noteError = (error: Error): void => {
    const reason = reasonOf(error)
    // A command Redis took and never answered (REDIS_COMMAND_TIMEOUT_MS): the
    // silence the 'no answer' line tells of, not a change to say.
    const silence = reason === 'Command timed out'
    // ioredis's words for a command sent on a connection that has just closed
    // (its ready check, when Redis hung up without answering), or cut off by it.
    if (!silence) lastError = reason.startsWith("Stream isn't writeable") || reason === CUT_OFF ? 'the connection closed before Redis answered' : reason
    // ioredis reports a failed SELECT (no such database, or an ACL user denied
    // it) and then turns ready on database 0, another deployment's keys maybe:
    // waiting cannot fix it, so start-up ends.
    if (/DB index|SELECT is not allowed|NOPERM.*\bselect\b/i.test(error.message)) {
      refused = `REDIS_URL: its database cannot be selected (${error.message})`
      giveUp()
      return
    }
    // Credentials Redis refuses (or none where it wants some) stay refused: waiting only hides why.
    if (/^(WRONGPASS|NOAUTH)\b/.test(error.message)) {
      refused = `REDIS_URL: Redis refused its credentials (${error.message})`
      giveUp()
      return
    }
    // Past the deadline (at once with REDIS_STARTUP_TIMEOUT_MS=0), the first
    // error decides; through sentinels the connect call itself only settles
    // after ioredis has gone round all of them.
    if (deadline <= Date.now()) giveUp()
    // Once, or once more after a wait said with no reason: the first error
    // then tells what changed (a frozen Redis gone, refusing now).
    if (silence || waitLogged === 'with a reason' || deadline <= Date.now()) return
    waitLogged = 'with a reason'
    log.warn({ connection: name, reason: lastError, waitMs: Math.max(0, deadline - Date.now()) }, 'waiting for redis')
  }
  client.on('error', noteError)
  let timer: NodeJS.Timeout | undefined
  // A Redis that takes the connection and then says nothing (frozen, its
  // host paused, a proxy with no backend) gives no error to log: the wait
  // is said after a while all the same.
  const unanswered = setTimeout(() => {
    if (waitLogged !== 'not yet' || deadline <= Date.now()) return
    waitLogged = lastError === '' ? 'without a reason' : 'with a reason'
    log.warn({ connection: name, reason: lastError || 'no answer', waitMs: Math.max(0, deadline - Date.now()) }, 'waiting for redis')
  }, UNANSWERED_LOG_MS)
  try {
    const ready = await new Promise<boolean>((resolve) => {
      giveUp = () => resolve(false)
      // With no time to wait (REDIS_STARTUP_TIMEOUT_MS=0), the first attempt decides.
      if (deadline > Date.now()) timer = setTimeout(() => resolve(false), deadline - Date.now())
      client.once('ready', () => resolve(true))
      if (signal?.aborted === true) resolve(false)
      signal?.addEventListener('abort', () => resolve(false), { once: true })
      // A first attempt that fails is retried by ioredis; only the deadline ends the wait.
      client.connect().catch((error: unknown) => {
        // (ioredis's connect() rejects with this at any close, a silent
        // Redis's too: it says nothing the wait's own lines do not.)
        const reason = reasonOf(error)
        if (lastError === '' && reason !== 'Connection is closed.') lastError = reason
        if (deadline <= Date.now()) resolve(false)
      })
    })
    signal?.throwIfAborted()
    if (refused !== null) throw new Error(refused)
    if (!ready) throw new Error(`redis did not become ready in time (REDIS_STARTUP_TIMEOUT_MS): ${lastError || 'no answer'}`)
  } finally {
    clearTimeout(timer)
    clearTimeout(unanswered)
    client.off('error', noteError)
  }
}

/** Options for one of the engine's connections: to `url`, or to the master the sentinels name. */
function connectionOptions (options: RedisEngineOptions, connectionName: string): RedisOptions {
  const base = { ...redisOptions(), connectionName }
  if (options.sentinels === undefined || options.sentinels.length === 0) return base
  return {
    ...base,
    sentinels: options.sentinels,
    name: new URL(options.url).hostname,
    ...(options.sentinelPassword != null ? { sentinelPassword: options.sentinelPassword } : {}),
    // A sentinel that hangs (its host frozen, or gone without a reset) would
    // hold each reconnect for the whole connect timeout: ask the next one.
    sentinelCommandTimeout: 2000
    // Not ioredis's failoverDetector: it reacts to every master group's
    // switch (a failover of another group the sentinels watch dropped every
    // connection), and a switch announced while a query to a hung sentinel
    // was in flight ended the client for good. SentinelSwitchWatch moves the
    // connections instead.
  }
}

/**
 * History keys all carry a TTL, which is what a volatile-* policy evicts
 * first; allkeys-* may take ids and shared state too. Replay notices an
 * event body gone (reset), not a channel's whole history gone. Best effort:
 * managed Redis services often refuse CONFIG.
 */
async function warnIfEvicting (commands: ScriptedRedis, log: Log): Promise<void> {
  try {
    const [, policy] = await commands.call(async (redis) => await redis.config('GET', 'maxmemory-policy') as string[])
    if (policy !== undefined && policy !== 'noeviction') {
      log.warn({ maxmemoryPolicy: policy }, 'Redis may evict keys when full (maxmemory-policy is not noeviction): evicted history makes replay miss events; use noeviction')
    }
  } catch {}
}

export async function connectRedis (options: RedisEngineOptions, registry: Registry, log: Log): Promise<RedisEngine> {
  // A Redis that stops answering without dropping the connection (frozen,
  // its host paused) would hold every publish and admission until it came
  // back: they fail after commandTimeoutMs instead, and answer 503. Not on
  // the subscriber, whose silence the bus detects with its own PINGs, nor on
  // the durable ingress's blocking reads.
  const commands = new ScriptedRedis(options.url, {
    ...connectionOptions(options, 'sse-gateway'),
    ...(options.commandTimeoutMs !== undefined ? { commandTimeout: options.commandTimeoutMs } : {})
  })
  // A subscriber connection cannot run commands, so publishing and reading use the other one.
  const subscriber = new Redis(options.url, connectionOptions(options, 'sse-gateway-sub'))
  let everReady = false
  for (const [name, client] of [['commands', commands.redis], ['subscriber', subscriber]] as const) {
    // Until start-up is over, untilReady says why it waits, once.
    warnOfErrors(client, name, log, () => everReady)
  }
  const bus = new RedisBus(commands, subscriber, options, log)
  const state = new RedisState(commands, subscriber, registry, options, log)
  const ingress = new IngressLeader(commands, subscriber, state, options.prefix, Math.max(1000, Math.floor(options.instanceTtlMs / 2)), log)

  // A Redis that restarted may have come back with older data (a snapshot, an
  // AOF behind) or none: before anything is published or replayed there, INIT
  // starts a new id epoch if so, and cursors from before get 'reset'.
  commands.runFirstOnConnect('INIT', [options.prefix])
  commands.redis.on('ready', () => {
    if (!everReady) return
    log.info({}, 'redis is back')
    // Redis may have restarted empty: record our streams again.
    state.resync().catch((error: unknown) => log.warn({ err: error }, 'resync after reconnect failed'))
  })

  const startupDeadline = Date.now() + (options.startupTimeoutMs ?? 0)
  const signal = options.startupSignal
  let reader: Redis | null = null
  // What a stop, or a failed start, must end: nothing left reconnecting or ticking.
  const closeEngine = async (): Promise<void> => {
    await ingress.stop()
    await state.close()
    await bus.close()
    for (const client of [commands.redis, subscriber, reader]) client?.disconnect()
  }
  try {
    await Promise.all([untilReady(commands.redis, 'commands', startupDeadline, log, signal), untilReady(subscriber, 'subscriber', startupDeadline, log, signal)])
    await bus.start()
    await state.start()
    everReady = true
    await warnIfEvicting(commands, log)
    signal?.throwIfAborted()
    await ingress.start()
    // Blocking reads need a connection of their own.
    reader = new Redis(options.url, connectionOptions(options, 'sse-gateway-ingress'))
    await untilReady(reader, 'ingress', startupDeadline, log, signal)
    signal?.throwIfAborted()
    warnOfErrors(reader, 'ingress', log)
  } catch (error) {
    await closeEngine()
    throw error
  }
  const durable = new DurableIngress(reader, `${options.prefix}ingress`, state.instanceId, ingress, log)
  const switchWatch = options.sentinels !== undefined && options.sentinels.length > 0
    ? new SentinelSwitchWatch(options.sentinels, options.sentinelPassword ?? null, new URL(options.url).hostname, [commands.redis, subscriber, reader], log)
    : null

  return {
    bus,
    state,
    ingress,
    durable,
    requests: new RedisRequestCounter(commands, options.prefix),
    close: async () => {
      switchWatch?.close()
      await durable.stop()
      await closeEngine()
    }
  }
}
