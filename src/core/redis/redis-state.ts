import { ReplyError, type Redis } from 'ioredis'
import { randomBytes } from 'node:crypto'
import { setTimeout as sleep } from 'node:timers/promises'
import { channel } from '../channels'
import { isPlainObject } from '../publish'
import { transitionJob, type JobState, type JobUpdate } from '../jobs'
import { connectionInfo, type ConnectionInfo, type Registry } from '../registry'
import { StoreLostDataError, StoreUnavailableError, userWideChange, type ControlMissedListener, type Admission, type AdmitRequest, type ClusterStats, type ConnectionListing, type Contacts, type ControlAnswer, type ControlListener, type ControlMessage, type JobPutResult, type OpenTracker, type Presence, type SharedState } from '../state'
import { inTurns, TurnsPerKey } from '../in-turns'
import { within } from '../within'
import { infoFields, selectConnections, type ConnectionFilter } from '../listing'
import { mayHaveRun, reasonOf, RepeatedWarning, type Log, type ScriptedRedis } from './client'

export interface RedisStateOptions {
  prefix: string
  historySize: number
  historyTtlS: number
  presenceGraceMs: number
  instanceTtlMs: number
  /** How long an instance waits for the others to apply a control message. */
  controlTimeoutMs?: number
}

/**
 * Between instances only: the sender found Redis without its records (emptied
 * with the connections kept: FLUSHALL), and every instance records its streams
 * again before it admits another, or the user limits would count none of them.
 */
interface RecordAgainMessage { type: 'record-again' }
interface ControlEnvelope { requestId: string, from: string, message: ControlMessage | RecordAgainMessage }
interface ControlReply {
  requestId: string
  answer: ControlAnswer
  /** The instance replying; null from one that predates the field. */
  from: string | null
}

/** A control message sent, waiting for the instances' replies. */
interface PendingControl {
  answers: ControlAnswer[]
  repliedFrom: Set<string>
  /** How many instances received it (PUBLISH's answer), once known: Infinity until it is sent. */
  receivers: number
  /**
   * Instances with a recent heartbeat, once known. A frozen or cut-off
   * process keeps its subscription, and so counts as a receiver, long after
   * the cluster has taken it for dead: all of these replying is enough.
   */
  live: string[] | null
  done: (answer: ControlAnswer) => void
}

function allReplied (entry: PendingControl): boolean {
  // Not before it is sent: an empty list of live instances would end the
  // wait of a message still on its way, and of a change not made yet.
  if (entry.receivers === Infinity) return false
  return entry.answers.length >= entry.receivers || (entry.live !== null && entry.live.every((instance) => entry.repliedFrom.has(instance)))
}

/**
 * A job update reads the state, then writes it if nobody wrote meanwhile.
 * Updates of one job are taken in turns on each instance, so only other
 * instances' updates can come between; each loss waits a random part of a
 * doubling delay (up to a cap), so that racing instances spread out, and
 * tries again until 3 s after the update arrived (its wait for its turn
 * included). Past JOB_UPDATES_WAITING updates of one job held on an
 * instance, more are answered 503 at once. An instance whose updates of a hot job
 * keep coming loses about one round in two against another such instance.
 */
const JOB_CAS_DEADLINE_MS = 3000
/** Updates of one job an instance holds, applying or waiting their turn. */
const JOB_UPDATES_WAITING = 64
const JOB_CAS_BACKOFF_MS = 2
const JOB_CAS_MAX_BACKOFF_MS = 50
/** Overdue graces ended per script run: a mass drain's users are settled in slices, not one long script. */
const GRACE_BATCH = 500
/**
 * Writes per transaction, and scripts in flight, while a resync records the
 * streams again: enough to keep Redis busy, few enough that none waits behind
 * the rest past REDIS_COMMAND_TIMEOUT_MS.
 */
const RESYNC_BATCH = 1000
/** Stands for the topics USER_TOPICS_AGAIN adds, in the envelope it publishes them in. */
const ADDED = '@added'
/** The request id of what USER_TOPICS_AGAIN publishes: nobody waits for its answers, so none is sent. */
const WRITTEN_BACK = 'written-back'
/** Stream records per HSCAN when listing: under a millisecond of Redis each. */
const RECORDS_PER_SCAN = 1000

/** How long a silent instance's list of streams waits for a reap (see heartbeat). */
const LIST_TTL_S = 86_400

/**
 * Shared state in Redis. Instances announce themselves with a heartbeat
 * (`<prefix>instances`, a sorted set scored by last beat, in Redis's clock) and keep their
 * streams in `<prefix>i:<instance>:conns`; anything of an instance whose beat
 * is older than INSTANCE_TTL_MS is ignored, so a killed instance drops out of
 * counts and limits by itself.
 */
export class RedisState implements SharedState {
  readonly instanceId: string
  private controlListener: ControlListener = async () => null
  /** Null until the streams plugin registers: a grace ended before that would go unannounced. */
  private offlineListener: ((userId: string) => void) | null = null
  private onlineListener: ((userId: string) => void) | null = null
  private readonly graceTimers = new Map<string, NodeJS.Timeout>()
  private readonly jobTurns = new TurnsPerKey()
  private readonly waiting = new Map<string, PendingControl>()
  /** Set by start(): a beat before Redis first answered could only fail, and be logged as if Redis had been lost. */
  private heartbeatTimer: NodeJS.Timeout | undefined
  private readonly prefix: string
  /** start() has subscribed (or tried to): from then on every reconnect subscribes again. */
  private started = false
  /** close() has run: a release answered after it starts no timer, the lease holder ends that grace. */
  private closed = false
  /**
   * Streams closed while Redis could not be told: released once it is back,
   * or their ids would stay reopenable, the user-wide topics kept and the
   * user online for ever.
   */
  private readonly unreleased = new Map<string, { userId: string, ttlS: number }>()
  private tracker: OpenTracker | null = null
  /**
   * The resync running since Redis came back, settled either way. Admissions
   * wait for it: Redis may have come back empty, and until the users' streams
   * are recorded again an admission would count none of them against the limit.
   */
  private resyncing: Promise<void> | null = null
  /** When the last beat that passed was sent (Date.now()). */
  private lastBeatAt = Date.now()
  private readonly heartbeatFailed: RepeatedWarning
  /** Since when this instance's beats have passed without a gap (see judgesSilence). */
  private beatingSince = Date.now()
  /** The last resync failed: the next beat that passes runs one. */
  private resyncOwed = false

  /**
   * Redis's id epoch when this instance last recorded its streams. A new one
   * means Redis lost its data (emptied, restarted, or back from an older
   * snapshot), and only then are the users' user-wide topics written back:
   * with Redis intact, a user's set can be missing because it expired while
   * this instance was cut off and its streams reaped, after the user removed
   * the topics those streams still hold.
   */
  private epochSeen: string | null = null

  /** The subscriber connection came back: streams are brought back in line after the next resync. */
  private controlMissed = false
  /** Control messages may have been missed since the last realignment began: the next one reads every user. */
  private controlMissedAgain = false
  private controlMissedListener: ControlMissedListener = async () => {}
  /** The realignment running, which takes up controlMissed again until it stays false. */
  private realigning: Promise<void> | null = null

  constructor (
    private readonly commands: ScriptedRedis,
    private readonly subscriber: Redis,
    private readonly registry: Registry,
    private readonly options: RedisStateOptions,
    private readonly log: Pick<Log, 'warn' | 'info'>
  ) {
    this.instanceId = registry.instanceId
    this.prefix = options.prefix
    this.heartbeatFailed = new RepeatedWarning(log, 'heartbeat failed')
    // As Buffers: a 'message' listener would make ioredis decode every
    // event the bus receives on this connection too, only to be ignored here.
    const controlChannel = Buffer.from(`${this.prefix}ctl`)
    const replyChannel = Buffer.from(`${this.prefix}reply:${this.instanceId}`)
    subscriber.on('messageBuffer', (name: Buffer, message: Buffer) => {
      // Anyone who can PUBLISH reaches every instance here, and a throw would
      // surface through ioredis's parser as an uncaught exception: nothing
      // may escape, whatever arrives.
      try {
        if (name.equals(controlChannel)) this.onControlMessage(message.toString())
        else if (name.equals(replyChannel)) this.onReply(message.toString())
      } catch (error: unknown) {
        this.log.warn({ err: error, channel: name.toString() }, 'control traffic not handled')
      }
    })
    // Without these subscriptions this instance neither applies nor answers
    // control messages. ioredis's own resubscription is lost if the connection
    // drops again before Redis answers it; a failure here waits for the next 'ready'.
    subscriber.on('ready', () => {
      if (!this.started) return
      this.subscribeControl().then(async () => {
        // What was published on the control channel while it was down is
        // lost. Brought back in line within a resync, after its write-back:
        // a set read before that, after Redis lost its data, would be empty.
        this.controlMissed = true
        this.controlMissedAgain = true
        // A failed resync is owed: the next beat runs it, and this with it.
        await this.resync().catch((error: unknown) => {
          this.log.warn({ reason: reasonOf(error) }, 'streams not brought back in line after the control channel came back')
        })
      }, (error: unknown) => {
        this.log.warn({ reason: reasonOf(error) }, 'could not subscribe again to the control channels')
      })
    })
  }

  /** Subscribes to control traffic and announces this instance. */
  async start (): Promise<void> {
    this.started = true
    await this.subscribeControl()
    await this.heartbeat()
    this.epochSeen = await this.currentEpoch()
    if (this.closed) return
    this.beatPeriodically()
  }

  private beatPeriodically (): void {
    this.heartbeatTimer = setInterval(() => {
      const lastBeatAt = this.lastBeatAt
      this.heartbeat().then(async (unlisted) => {
        // A beat in flight when close() began must not list the instance again.
        if (this.closed) return
        this.heartbeatFailed.clear()
        // Until this beat arrived, not until it was sent: a slow Redis may
        // have taken its time to take it, while reapers looked on.
        const silentMs = Date.now() - lastBeatAt
        // Beats refused without the connection dropping (Redis out of memory,
        // say) for close to INSTANCE_TTL_MS may have had this instance taken
        // for dead and its streams reaped, and no reconnect will resync: they
        // are recorded again. So are they when this instance was no longer
        // listed (Redis emptied by FLUSHALL, with the connection kept: its
        // streams, counts and presence were gone), and after a failed resync.
        if (this.resyncOwed || unlisted || silentMs >= (this.options.instanceTtlMs * 3) / 4) {
          await this.resync()
          if (unlisted) await this.askOthersToRecordAgain()
        }
        // Closes refused while Redis took no writes (NOREPLICAS, READONLY…),
        // however briefly, go now: no reconnect may ever come to send them.
        else if (this.unreleased.size > 0 && this.resyncing === null) await this.releaseUnreleased()
        // A realignment that failed is tried again.
        else if (this.resyncing === null) this.startRealigning()
      }, (error: unknown) => {
        this.heartbeatFailed.warn({ reason: reasonOf(error) })
      }).catch((error: unknown) => {
        this.log.warn({ reason: reasonOf(error) }, 'streams not recorded again after beats were refused')
      })
    }, Math.max(200, Math.floor(this.options.instanceTtlMs / 3))).unref()
  }

  /** INIT starts a new epoch if Redis lost the one it had, so that a loss is seen by the first resync after it. */
  private async currentEpoch (): Promise<string | null> {
    await this.commands.run('INIT', [this.prefix])
    return await this.commands.call(async (redis) => await redis.get(`${this.prefix}epoch`))
  }

  /** After Redis comes back (maybe empty), this instance's streams are recorded again. */
  async resync (): Promise<void> {
    this.resyncOwed = false
    const run = this.recordAgain()
    const settled = run.then(() => {}, () => { this.resyncOwed = true })
    this.resyncing = settled
    void settled.then(() => { if (this.resyncing === settled) this.resyncing = null })
    await run
    this.startRealigning()
  }

  /**
   * After a resync (so after its write-back, which a read of the sets after
   * a loss would undo), and waited for by nobody: admissions here, and
   * another instance's asking this one to record its streams again, wait for
   * a resync, not for this. One that fails is started again by the next beat.
   */
  private startRealigning (): void {
    if (!this.controlMissed || this.realigning !== null || this.closed) return
    const realigning = this.realign().catch((error: unknown) => {
      this.log.warn({ reason: reasonOf(error) }, 'streams not brought back in line with their users\' topics')
    }).finally(() => {
      if (this.realigning === realigning) this.realigning = null
    })
    this.realigning = realigning
  }

  /**
   * Brings this instance's streams back in line with their users' user-wide
   * topics, for as long as the control channel keeps dropping meanwhile. A
   * read that finds the id epoch moved (Redis lost its data since the resync)
   * ends it, owed: the next resync writes the topics back first.
   */
  private async realign (): Promise<void> {
    const epoch = this.epochSeen
    let lost = false
    const read = async (userId: string): Promise<string[] | null> => {
      const [current, kept, ...topics] = await this.commands.run('USER_TOPICS_CHECKED', [this.prefix, userId]) as [string, number, ...string[]]
      if (current !== epoch) {
        lost = true
        throw new StoreLostDataError('Redis lost its data while streams were being brought back in line')
      }
      // Neither the set nor a removal on record: nothing to go by.
      return kept === 1 ? topics : null
    }
    while (this.controlMissed && !this.closed) {
      this.controlMissed = false
      const retrying = !this.controlMissedAgain
      this.controlMissedAgain = false
      await this.controlMissedListener(read, retrying).catch((error: unknown) => {
        this.controlMissed = true
        // The topics are written back first, by a resync, unless one did since this began.
        if (lost && this.epochSeen === epoch) this.resyncOwed = true
        throw error
      })
    }
  }

  /**
   * Waits out the resyncs running or queued, for as long as a control answer
   * may take: past that, the open is refused (503) rather than left hanging
   * behind a slow Redis.
   */
  private async resyncDone (): Promise<void> {
    const deadline = Date.now() + (this.options.controlTimeoutMs ?? 3000)
    while (this.resyncing !== null) {
      if (await within(this.resyncing.then(() => false), deadline - Date.now(), () => true)) {
        throw new StoreUnavailableError(new Error('streams are still being recorded again after Redis came back'))
      }
    }
  }

  private async recordAgain (): Promise<void> {
    // One after another: two at once would each rebuild the list from a different moment.
    await this.resyncing
    // A stopped instance has left the list for good (an admission still in
    // flight when close() began finds it unlisted).
    if (this.closed) return
    await this.heartbeat()
    const epoch = await this.currentEpoch()
    // First, while the instance's list still names them (so they count as
    // live, and nobody has pruned them from their users' sets), the streams
    // that closed unrecorded are released.
    await this.releaseUnreleased()
    // The instance's list is rebuilt from what it really holds: streams whose
    // release was lost during the outage stop counting against their users.
    // Opens not registered yet keep their entries: an admitted one's is
    // written again, and one whose admission is still running keeps what the
    // admission writes (the list is read first: any entry listed then is a
    // stream's, an open's, or stale).
    const listed = await this.commands.call(async (redis) => await redis.hkeys(this.connsKey(this.instanceId)))
    let latestAdmission = 0
    const opening = new Set<string>()
    // Of the streams and opens of one id here, the one admitted last holds its entry.
    const holders = new Map<string, { seq: number, userId: string, topics: Iterable<string>, openedAt: number }>()
    for (const { id, admissionSeq, userId, topics, openedAt } of this.registry.all()) holders.set(id, { seq: admissionSeq, userId, topics, openedAt })
    for (const open of this.tracker?.opening() ?? []) {
      opening.add(open.connectionId)
      if (open.seq === null) continue
      latestAdmission = Math.max(latestAdmission, open.seq)
      const held = holders.get(open.connectionId)
      if (open.admitted === null || (held !== undefined && held.seq > open.seq)) continue
      holders.set(open.connectionId, { seq: open.seq, ...open.admitted })
    }
    const stale = listed.filter((connectionId) => this.registry.get(connectionId) === undefined && !opening.has(connectionId))
    const byUser = new Map<string, Array<string | number>>()
    const entries: Array<[string, string]> = []
    for (const [connectionId, { seq, userId, topics, openedAt }] of holders) {
      latestAdmission = Math.max(latestAdmission, seq)
      entries.push([connectionId, JSON.stringify(connectionInfo(connectionId, userId, topics, openedAt, this.instanceId))])
      const streams = byUser.get(userId)
      if (streams === undefined) byUser.set(userId, [connectionId, seq])
      else streams.push(connectionId, seq)
    }
    // In batches, one after another: one transaction of 100k writes, or 100k
    // scripts queued at once, can outlast REDIS_COMMAND_TIMEOUT_MS when
    // every instance resyncs together after Redis restarted, and a resync
    // that times out is redone in full.
    for (let start = 0; start < Math.max(stale.length, entries.length); start += RESYNC_BATCH) {
      // close() deletes the list: written after it, it would stay for ever.
      if (this.closed) return
      const pipeline = this.commands.redis.multi()
      const staleBatch = stale.slice(start, start + RESYNC_BATCH)
      if (staleBatch.length > 0) pipeline.hdel(this.connsKey(this.instanceId), ...staleBatch)
      for (const [connectionId, info] of entries.slice(start, start + RESYNC_BATCH)) pipeline.hset(this.connsKey(this.instanceId), connectionId, info)
      await pipeline.exec()
    }
    if (this.closed) return
    if (latestAdmission > 0) await this.commands.run('ADMISSIONS_AT_LEAST', [this.prefix, String(latestAdmission)])
    // Listed first, so the users' streams count as live when each is rejoined.
    // A user the cluster took for gone with this instance (user:offline was
    // sent when it was reaped) is announced again.
    await inTurns([...byUser], RESYNC_BATCH, async ([userId, streams]) => {
      const cameBack = await this.commands.run('REJOIN', [this.prefix, userId, this.instanceId, this.options.instanceTtlMs, ...streams])
      if (cameBack === 1) this.onlineListener?.(userId)
    })
    if (epoch === null || epoch !== this.epochSeen) await this.writeUserTopicsAgain()
    // A stream or open that ended meanwhile may have been given back before
    // its user was rejoined, which recorded it again (its id kept for ever):
    // it is given back again, which is harmless if its release came last. An
    // open of the id still under way here is left to give it back if it ends
    // without a stream (see OpenTracker.releaseLate).
    // Several at once: after a mass disconnect there can be thousands, each a round trip.
    await inTurns([...holders], RESYNC_BATCH, async ([connectionId, { userId }]) => {
      if (this.registry.get(connectionId) === undefined) await this.releaseLate(connectionId, userId, this.options.historyTtlS)
    })
    this.epochSeen = epoch
  }

  /**
   * The user-wide topics Redis lost with its data: the open streams still
   * hold them, and streams the user opens later must join them too. Each
   * instance adds what its streams hold (USER_TOPICS_AGAIN), but not a topic
   * the user left since the loss, and sends what it added to the user's
   * streams everywhere, which may lack it (opened since the loss, or holding
   * other topics). Nobody waits for their answers. A topic a stream also
   * took by `?topics=` is not told apart from its own, and is not written
   * back from it.
   */
  private async writeUserTopicsAgain (): Promise<void> {
    const byUser = new Map<string, Set<string>>()
    for (const connection of this.registry.all()) {
      const held = connection.userWideTopics
      if (held.length === 0) continue
      const topics = byUser.get(connection.userId) ?? new Set<string>()
      for (const topic of held) topics.add(topic)
      byUser.set(connection.userId, topics)
    }
    // The envelope of a user-wide add, around the list the script fills in.
    const around = (userId: string): [string, string] => {
      const envelope = JSON.stringify({ requestId: WRITTEN_BACK, from: this.instanceId, message: { type: 'topics', userId, connectionId: null, remove: [], restored: true, add: ADDED } })
      const at = envelope.lastIndexOf(`"${ADDED}"`)
      return [envelope.slice(0, at), envelope.slice(at + ADDED.length + 2)]
    }
    await inTurns([...byUser], RESYNC_BATCH, async ([userId, topics]) => {
      if (this.closed) return
      await this.commands.run('USER_TOPICS_AGAIN', [this.prefix, userId, this.options.historyTtlS, `${this.prefix}ctl`, ...around(userId), ...topics])
    })
  }

  /**
   * Gives back the entry of an id that closed unrecorded, unless a stream or
   * open of the id here holds it now (the tracker's rule; without one, the
   * registry's). A failure puts it back for later.
   */
  private async releaseLate (connectionId: string, userId: string, ttlS: number): Promise<void> {
    if (this.tracker !== null) {
      await this.tracker.releaseLate(connectionId, userId).catch(() => {})
      return
    }
    // A stream of this instance reopened the id meanwhile: the id is its now.
    if (this.registry.get(connectionId) !== undefined) return
    await this.release(connectionId, userId, ttlS).catch(() => {})
  }

  private async releaseUnreleased (): Promise<void> {
    const pending = [...this.unreleased]
    this.unreleased.clear()
    // Several at once, as in recordAgain.
    await inTurns(pending, RESYNC_BATCH, async ([connectionId, { userId, ttlS }]) => await this.releaseLate(connectionId, userId, ttlS))
  }

  trackOpens (tracker: OpenTracker): void {
    this.tracker = tracker
  }

  /** Returns whether this instance was not listed until this beat (new, or lost or reaped since the last). */
  async heartbeat (): Promise<boolean> {
    const now = Date.now()
    // The list outlives the instance until a lease holder reaps it: it is how
    // the reap finds the users to announce offline, and if it expired first
    // (the whole cluster down for that long) their entries would be dropped
    // unannounced. The expiry only clears a list nobody will ever reap.
    const ttlS = Math.max(LIST_TTL_S, Math.ceil((this.options.instanceTtlMs * 10) / 1000))
    const added = await this.commands.run('BEAT', [this.prefix, this.instanceId, ttlS])
    if (now - this.lastBeatAt >= this.options.instanceTtlMs / 2) this.beatingSince = now
    this.lastBeatAt = now
    return added === 1
  }

  async createConnection (connectionId: string, userId: string, ttlS: number): Promise<void> {
    await this.commands.call(async (redis) => await redis.set(`${this.prefix}conn:${connectionId}`, userId, 'EX', ttlS))
  }

  async connectionOwner (connectionId: string): Promise<string | null> {
    return await this.commands.call(async (redis) => await redis.get(`${this.prefix}conn:${connectionId}`))
  }

  async admit (request: AdmitRequest): Promise<Admission> {
    await this.recorded()
    let answer = await this.runAdmit(request)
    if (answer[0] === -1) {
      // Not listed: Redis was emptied (FLUSHALL) or this instance reaped
      // since its last beat, and its streams count for nothing until they
      // are recorded again. Admitting now would let a user past the limit;
      // so would admitting before the other instances, emptied alike,
      // recorded theirs (at their next beat, unless asked now).
      await this.recorded(true)
      await this.askOthersToRecordAgain()
      answer = await this.runAdmit(request)
      if (answer[0] === -1) throw new StoreUnavailableError(new Error('this instance is not listed in Redis'))
    }
    const [admitted, cameOnline, evicted, seq, issued, ...replacedOn] = answer
    if (admitted !== 1) return { admitted: false }
    this.cancelGrace(request.userId)
    const bar = evicted.indexOf('|')
    const evict = evicted === '' ? null : { connectionId: evicted.slice(bar + 1), instance: evicted.slice(0, bar) }
    return { admitted: true, cameOnline: cameOnline === 1, evict, replacedOn, seq, issuedBefore: Number(issued) }
  }

  /**
   * Before an admission: starts a resync if one is `needed` or owed (the
   * last failed) and none runs, and waits out the one under way. One that
   * failed leaves the streams unrecorded (the instance listed again first),
   * and an admission then would count against records without them.
   */
  private async recorded (needed = false): Promise<void> {
    if ((needed || this.resyncOwed) && this.resyncing === null) this.resync().catch(() => {})
    if (this.resyncing === null) return
    await this.resyncDone()
    if (this.resyncOwed) throw new StoreUnavailableError(new Error('streams could not be recorded again after Redis came back'))
  }

  /**
   * Settles once every instance connected to Redis has recorded its streams
   * again, or after the control timeout. Every receiver is waited for: an
   * emptied Redis lists only the instances that recorded themselves again.
   */
  private async askOthersToRecordAgain (): Promise<void> {
    await this.broadcast({ type: 'record-again' }, true).catch((error: unknown) => {
      this.log.warn({ reason: reasonOf(error) }, 'could not ask the other instances to record their streams again')
    })
  }

  private async runAdmit (request: AdmitRequest): Promise<[number, number, string, number, ...string[]]> {
    const info = connectionInfo(request.connectionId, request.userId, request.topics, request.openedAt, this.instanceId)
    return await this.commands.run('ADMIT', [
      this.prefix, request.userId, this.instanceId, request.connectionId,
      request.limit, request.policy, this.options.instanceTtlMs, JSON.stringify(info), this.options.historyTtlS
    ]).catch((error: unknown) => {
      // Unanswered in time, the admission may still run when Redis wakes (or
      // it ran, and its answer was lost with the connection), and its entry
      // would count against the user with no stream behind it, its id and
      // the user's topics kept without expiry: it is given back at the first
      // beat that passes (after it, on the same connection), unless a stream
      // of the id here holds it by then.
      if (mayHaveRun(error)) this.unreleased.set(request.connectionId, { userId: request.userId, ttlS: this.options.historyTtlS })
      throw error
    }) as [number, number, string, number, string, ...string[]]
  }

  async release (connectionId: string, userId: string, ttlS: number, graceMs = this.options.presenceGraceMs): Promise<void> {
    const token = randomBytes(8).toString('hex')
    let last: unknown
    try {
      last = await this.commands.run('RELEASE', [
        this.prefix, userId, this.instanceId, connectionId, ttlS, this.options.instanceTtlMs, graceMs, token
      ])
    } catch (error) {
      this.unreleased.set(connectionId, { userId, ttlS })
      throw error
    }
    if (last !== 1 || this.closed) return
    this.cancelGrace(userId)
    // The fast path; if this instance stops or dies first, the lease holder's
    // sweep (endDueGraces) ends the grace instead, and only one of them can.
    const timer = setTimeout(() => {
      this.graceTimers.delete(userId)
      this.endGrace(userId, token).catch((error: unknown) => this.log.warn({ err: error, userId }, 'presence grace not settled'))
    }, graceMs).unref()
    this.graceTimers.set(userId, timer)
  }

  async updateTopics (connectionId: string, userId: string): Promise<void> {
    await this.commands.call(async (redis) => {
      const connection = this.registry.get(connectionId)
      if (connection === undefined || connection.userId !== userId) return
      await redis.hset(this.connsKey(this.instanceId), connectionId, JSON.stringify(this.registry.info(connection)))
    })
  }

  onControl (listener: ControlListener): void {
    this.controlListener = listener
  }

  async broadcastControl (message: ControlMessage): Promise<ControlAnswer> {
    return await this.broadcast(message, false)
  }

  /**
   * Sends `message` to every instance, this one included; settles once each
   * has answered, or after the control timeout. Each, unless
   * `everyReceiver`: those listed live (heartbeats), so that one frozen or
   * cut off stops holding requests up; else every instance that received it.
   */
  private async broadcast (
    message: ControlEnvelope['message'],
    everyReceiver: boolean,
    send: (envelope: string) => Promise<number | null> = async (envelope) => await this.commands.redis.publish(`${this.prefix}ctl`, envelope)
  ): Promise<ControlAnswer> {
    const requestId = randomBytes(8).toString('hex')
    const envelope: ControlEnvelope = { requestId, from: this.instanceId, message }
    return await new Promise<ControlAnswer>((resolve, reject) => {
      let timer: NodeJS.Timeout | undefined
      const entry: PendingControl = {
        answers: [],
        repliedFrom: new Set(),
        receivers: Infinity,
        live: null,
        done: (answer: ControlAnswer) => { clearTimeout(timer); resolve(answer) }
      }
      const finish = (): void => {
        if (this.waiting.get(requestId) !== entry) return
        this.waiting.delete(requestId)
        entry.done(entry.answers.find((answer) => answer !== null) ?? null)
      }
      this.waiting.set(requestId, entry)
      // Without the list, the receivers' count or the timeout ends the wait.
      if (!everyReceiver) {
        this.liveInstances().then((live) => {
          entry.live = live
          if (allReplied(entry)) finish()
        }, () => {})
      }
      send(JSON.stringify(envelope)).then((receivers) => {
        // PUBLISH answers how many instances received it: wait for at most
        // that many replies. Not sent (null): nothing to wait for.
        entry.receivers = receivers ?? 0
        if (allReplied(entry)) {
          finish()
          return
        }
        // Timed from here: until Redis has taken the message (and made the
        // change it carries), a slow Redis is the command's to time out, with
        // a 503; a wait ended before would answer as if nobody held the
        // stream, or as if the change was refused, and it would still be made.
        timer = setTimeout(() => finish(), this.options.controlTimeoutMs ?? 3000).unref()
      }, (error: unknown) => {
        clearTimeout(timer)
        this.waiting.delete(requestId)
        reject(this.commands.translate(error))
      })
    })
  }

  onOnline (listener: (userId: string) => void): void {
    this.onlineListener = listener
  }

  onOffline (listener: (userId: string) => void): void {
    this.offlineListener = listener
  }

  onControlMissed (listener: ControlMissedListener): void {
    this.controlMissedListener = listener
  }

  async presence (userId: string): Promise<Presence> {
    const [connections, grace] = await this.commands.run('PRESENCE', [this.prefix, userId, this.options.instanceTtlMs]) as [number, number]
    return { userId, online: connections > 0 || grace === 1, connections }
  }

  async stats (): Promise<ClusterStats> {
    const { instances, connections } = await this.liveConnections()
    const users = new Set<string>()
    // A Map, not a `{}`: topic names are user input, and `constructor` or
    // `__proto__` would read or hit Object.prototype instead of a count.
    const topics = new Map<string, number>()
    for (const info of connections) {
      users.add(info.userId)
      for (const topic of info.topics) topics.set(topic, (topics.get(topic) ?? 0) + 1)
    }
    // fromEntries defines own properties, so `__proto__` stays an ordinary key.
    return { connections: connections.length, users: users.size, topics: Object.fromEntries(topics), instances }
  }

  async connections (filter: ConnectionFilter = {}): Promise<ConnectionListing> {
    const { items, total } = selectConnections((await this.liveConnections()).connections, (info) => info.instance, infoFields, filter)
    return { connections: items, total }
  }

  async userTopics (userId: string): Promise<string[]> {
    return await this.commands.call(async (redis) => await redis.smembers(`${this.prefix}ut:${userId}`))
  }

  async changeUserTopics (userId: string, op: 'add' | 'remove', topics: string[], ttlS: number, max: number): Promise<string[] | null> {
    let after: string[] | null = null
    // The control message goes out from the script that changes the set:
    // published after the change, before any later one, so that every
    // instance hears the changes in the order Redis made them.
    await this.broadcast(userWideChange(userId, op, topics), false, async (envelope) => {
      const answer = await this.commands.run('USER_TOPICS', [this.prefix, userId, ttlS, op, max, `${this.prefix}ctl`, envelope, ...topics]) as number | [number, ...string[]]
      if (typeof answer === 'number') return null
      const [receivers, ...members] = answer
      after = members
      return receivers
    })
    return after
  }

  async updateMembers (conversationId: string, op: 'set' | 'add' | 'remove', members: string[]): Promise<string[]> {
    return await this.commands.run('MEMBERS', [this.prefix, conversationId, op, ...members]) as string[]
  }

  async members (conversationId: string): Promise<string[]> {
    return await this.commands.call(async (redis) => await redis.smembers(`${this.prefix}cv:${conversationId}`))
  }

  async contacts (userId: string, max: number): Promise<Contacts> {
    const [skipped, ...members] = await this.commands.run('CONTACTS', [this.prefix, userId, max]) as [number, ...string[]]
    return { members, skipped }
  }

  async getJob (jobId: string): Promise<JobState | null> {
    const [json, eventId] = await this.commands.call(async (redis) => await redis.hmget(`${this.prefix}job:${jobId}`, 'json', 'eventId'))
    if (json === null || eventId === null) return null
    return storedJob(json, eventId)
  }

  async putJob (jobId: string, update: JobUpdate, ttlS: number, maxEventBytes: number): Promise<JobPutResult> {
    // Bounded, as is the time an update may take from its arrival: updates
    // coming faster than the job's writes settle answer 503 rather than wait on.
    if (this.jobTurns.pending(jobId) >= JOB_UPDATES_WAITING) return jobBusy(jobId)
    const deadline = Date.now() + JOB_CAS_DEADLINE_MS
    return await this.jobTurns.run(jobId, async () => await this.putJobNow(jobId, update, ttlS, maxEventBytes, deadline))
  }

  private async putJobNow (jobId: string, update: JobUpdate, ttlS: number, maxEventBytes: number, deadline: number): Promise<JobPutResult> {
    const key = `${this.prefix}job:${jobId}`
    // Optimistic: the script applies the update only if nobody changed the job since we read it.
    for (let attempt = 0; attempt === 0 || Date.now() < deadline; attempt++) {
      if (attempt > 0) await sleep(Math.random() * Math.min(JOB_CAS_MAX_BACKOFF_MS, JOB_CAS_BACKOFF_MS * 2 ** attempt))
      const [json, eventId, version] = await this.commands.call(async (redis) => await redis.hmget(key, 'json', 'eventId', 'version'))
      const previous = json !== null && eventId !== null ? storedJob(json, eventId) : null
      const transition = transitionJob(jobId, previous, update, new Date(), maxEventBytes)
      if (!transition.ok) return transition
      const channels = [channel.job(jobId, update.userId), channel.userJobs(update.userId)]
      const result = await this.commands.run('PUT_JOB', [
        this.prefix, this.options.historySize, this.options.historyTtlS, jobId, version ?? '0',
        transition.stateJson, ttlS, channels.length, ...channels, transition.body
      ]) as [string, string?]
      if (result[0] === 'ok') return { ok: true, state: { ...transition.state, eventId: result[1] as string } }
    }
    return jobBusy(jobId)
  }

  async close (): Promise<void> {
    this.closed = true
    clearInterval(this.heartbeatTimer)
    for (const timer of this.graceTimers.values()) clearTimeout(timer)
    this.graceTimers.clear()
    for (const entry of this.waiting.values()) entry.done(null)
    this.waiting.clear()
    // (Not to a Redis frozen since a command timed out: see IngressLeader.stop.)
    if (this.commands.redis.status === 'ready' && this.commands.isAnswering()) {
      // A clean stop leaves the instance list at once instead of after its TTL.
      await this.commands.redis.multi()
        .zrem(`${this.prefix}instances`, this.instanceId)
        .unlink(this.connsKey(this.instanceId))
        .exec()
        .catch(() => {})
    }
  }

  /** Instances whose heartbeat is recent enough to count. */
  async liveInstances (): Promise<string[]> {
    return await this.commands.run('INSTANCES', [this.prefix, this.options.instanceTtlMs, 'live']) as string[]
  }

  /**
   * Whether this instance may take others' silence for death: its own beats
   * have passed for INSTANCE_TTL_MS without a gap. After a gap (Redis
   * restarted, unreachable, frozen, refusing writes) every instance's beats
   * stopped alike, and the first one back would otherwise reap the others,
   * streams open, before their own beats come: their users announced offline,
   * then online again.
   */
  judgesSilence (): boolean {
    return Date.now() - this.beatingSince >= this.options.instanceTtlMs
  }

  /** Instances that stopped beating: their streams are gone. */
  async deadInstances (): Promise<string[]> {
    return await this.commands.run('INSTANCES', [this.prefix, this.options.instanceTtlMs, 'dead']) as string[]
  }

  /**
   * Clears what a dead instance left (run by the lease holder): its streams
   * leave the per-user sets, and users left with no stream go offline.
   */
  async reap (instance: string): Promise<void> {
    // Right after start the lease may be taken before anyone listens: a user
    // taken offline now would never be announced. The next tick reaps.
    if (this.offlineListener === null) return
    const byUser = new Map<string, string[]>()
    for (const [connectionId, json] of await this.instanceRecords(instance)) {
      const userId = (parseJson(json) as Partial<ConnectionInfo> | undefined)?.userId
      if (typeof userId !== 'string') continue
      const ids = byUser.get(userId)
      if (ids === undefined) byUser.set(userId, [connectionId])
      else ids.push(connectionId)
    }
    // One script per user: the check that the user is offline and the removal
    // that made it so are one step, so a concurrent release cannot announce
    // the same going-offline again. Each checks that the instance is still
    // silent: one that comes back mid-reap keeps the streams it rejoined.
    for (const [userId, ids] of byUser) {
      const tookOffline = await this.commands.run('REAP', [
        this.prefix, userId, instance, this.options.instanceTtlMs, this.options.historyTtlS, ...ids
      ])
      if (tookOffline === 1) this.offlineListener?.(userId)
    }
    // Reaping takes a round trip per user: an instance that was only cut off
    // may beat again meanwhile, and its list, rebuilt, must stay.
    await this.commands.run('FORGET', [this.prefix, instance, this.options.instanceTtlMs])
  }

  /**
   * Ends every grace period past its deadline, whichever instance started it
   * (run by the lease holder): the one that did may have stopped or died, and
   * its timer with it. Returns the milliseconds until the next one is due, or
   * null when none runs.
   */
  async endDueGraces (): Promise<number | null> {
    const listener = this.offlineListener
    // Right after start the lease may be taken before anyone listens.
    if (listener === null) return null
    for (;;) {
      const [ended, ...offline] = await this.commands.run('END_GRACE', [this.prefix, this.options.instanceTtlMs, 'due', GRACE_BATCH]) as [number, ...string[]]
      for (const userId of offline) listener(userId)
      if (this.closed) return null
      if (ended < GRACE_BATCH) break
    }
    const dueInMs = Number(await this.commands.run('NEXT_GRACE', [this.prefix]))
    return dueInMs < 0 ? null : dueInMs
  }

  private async liveConnections (): Promise<{ instances: number, connections: ConnectionInfo[] }> {
    const instances = await this.liveInstances()
    const connections: ConnectionInfo[] = []
    const lists = await Promise.all(instances.map(async (instance) => await this.instanceRecords(instance).catch((error: unknown) => {
      // A key of another type under the name skips one instance; a lost connection fails the read.
      if (error instanceof ReplyError) return new Map<string, string>()
      throw error
    })))
    for (const records of lists) {
      // One unreadable record (a key written by something else) leaves the listing and stats whole.
      for (const json of records.values()) {
        const info = parseJson(json)
        if (isConnectionInfo(info)) connections.push(info)
      }
    }
    return { instances: instances.length, connections }
  }

  /**
   * An instance's stream records by connection id, read a page at a time: one HVALS of
   * 50 000 records held Redis for 15–34 ms, and every publish and delivery
   * of the cluster waited behind each poll of /v1/stats or the admin page
   * (a page of 1000 takes under 1 ms; the whole read, about twice the
   * HVALS's Redis time, in slices).
   * HSCAN may return a record twice (the hash grown meanwhile): keyed by id.
   */
  private async instanceRecords (instance: string): Promise<Map<string, string>> {
    const key = this.connsKey(instance)
    const records = new Map<string, string>()
    let cursor = '0'
    do {
      const [next, fields] = await this.commands.call(async (redis) => await redis.hscan(key, cursor, 'COUNT', RECORDS_PER_SCAN))
      for (let index = 0; index + 1 < fields.length; index += 2) records.set(fields[index], fields[index + 1])
      cursor = next
    } while (cursor !== '0')
    return records
  }

  private async subscribeControl (): Promise<void> {
    await this.subscriber.subscribe(`${this.prefix}ctl`, `${this.prefix}reply:${this.instanceId}`)
  }

  private connsKey (instance: string): string {
    return `${this.prefix}i:${instance}:conns`
  }

  private cancelGrace (userId: string): void {
    const timer = this.graceTimers.get(userId)
    if (timer !== undefined) {
      clearTimeout(timer)
      this.graceTimers.delete(userId)
    }
  }

  private async endGrace (userId: string, token: string): Promise<void> {
    const [, ...offline] = await this.commands.run('END_GRACE', [this.prefix, this.options.instanceTtlMs, 'user', userId, token]) as [number, ...string[]]
    if (offline.length > 0) this.offlineListener?.(userId)
  }

  private onControlMessage (raw: string): void {
    const envelope = parseControlEnvelope(raw)
    if (envelope === null) {
      // The payload is not logged: it is whatever a stranger chose to publish.
      this.log.warn({ channel: `${this.prefix}ctl`, bytes: Buffer.byteLength(raw) }, 'malformed control message dropped')
      return
    }
    const reply = (answer: ControlAnswer): void => {
      if (envelope.requestId === WRITTEN_BACK) return
      const body: ControlReply = { requestId: envelope.requestId, answer, from: this.instanceId }
      this.commands.redis.publish(`${this.prefix}reply:${envelope.from}`, JSON.stringify(body)).catch(() => {})
    }
    const message = envelope.message
    // Answered once recorded: the sender admits its next stream then. Its own
    // streams it recorded before asking.
    const handled = message.type !== 'record-again'
      ? this.controlListener(message)
      : envelope.from === this.instanceId ? Promise.resolve(null) : this.resync().then(() => null)
    // The last catch: a throw in either handler would be an unhandled rejection, which ends the process.
    handled.then(reply, (error: unknown) => {
      this.log.warn({ err: error, type: envelope.message.type }, 'control message failed')
      reply(null)
    }).catch((error: unknown) => this.log.warn({ err: error }, 'control reply not sent'))
  }

  private onReply (raw: string): void {
    const reply = parseControlReply(raw)
    if (reply === null) {
      this.log.warn({ channel: `${this.prefix}reply:${this.instanceId}`, bytes: Buffer.byteLength(raw) }, 'malformed control reply dropped')
      return
    }
    const entry = this.waiting.get(reply.requestId)
    if (entry === undefined) return
    entry.answers.push(reply.answer)
    if (reply.from !== null) entry.repliedFrom.add(reply.from)
    if (allReplied(entry)) {
      this.waiting.delete(reply.requestId)
      entry.done(entry.answers.find((answer) => answer !== null) ?? null)
    }
  }
}

/*
 * Control traffic crosses Redis as JSON, and any Redis client may PUBLISH on
 * these channels: a message is used only once it has the exact shape this
 * code sends, rebuilt field by field so nothing unexpected rides along.
 */

function isStringArray (value: unknown): value is string[] {
  return Array.isArray(value) && value.every((item) => typeof item === 'string')
}

function jobBusy (jobId: string): JobPutResult {
  return { ok: false, message: `job ${jobId} is being updated by too many at once; retry`, busy: true }
}

/** A job's state as PUT_JOB stored it: its JSON, and the id of the update that made it. */
function storedJob (json: string, eventId: string): JobState {
  return { ...JSON.parse(json) as Omit<JobState, 'eventId'>, eventId }
}

function isConnectionInfo (value: unknown): value is ConnectionInfo {
  return isPlainObject(value) && typeof value.connectionId === 'string' && typeof value.userId === 'string' &&
    isStringArray(value.topics) && typeof value.openedAt === 'string' && typeof value.instance === 'string'
}

function parseJson (raw: string): unknown {
  try {
    return JSON.parse(raw)
  } catch {
    return undefined
  }
}

function toControlMessage (value: unknown): ControlEnvelope['message'] | null {
  if (!isPlainObject(value)) return null
  if (value.type === 'record-again') return { type: 'record-again' }
  if (value.type === 'evict') {
    const { connectionId, reason } = value
    // Absent from an instance that predates them: whichever holds the id.
    const instance = value.instance ?? null
    const decidedAt = value.decidedAt ?? null
    if (typeof connectionId !== 'string' || typeof reason !== 'string' || (instance !== null && typeof instance !== 'string')) return null
    if (decidedAt !== null && !Number.isSafeInteger(decidedAt)) return null
    return { type: 'evict', connectionId, reason, instance, decidedAt: decidedAt as number | null }
  }
  if (value.type === 'topics') {
    const { userId, connectionId, add, remove } = value
    if (typeof userId !== 'string' || (connectionId !== null && typeof connectionId !== 'string')) return null
    if (!isStringArray(add) || !isStringArray(remove)) return null
    return value.restored === true ? { type: 'topics', userId, connectionId, add, remove, restored: true } : { type: 'topics', userId, connectionId, add, remove }
  }
  return null
}

function parseControlEnvelope (raw: string): ControlEnvelope | null {
  const value = parseJson(raw)
  if (!isPlainObject(value)) return null
  const { requestId, from } = value
  if (typeof requestId !== 'string' || typeof from !== 'string') return null
  const message = toControlMessage(value.message)
  return message === null ? null : { requestId, from, message }
}

function parseControlReply (raw: string): ControlReply | null {
  const value = parseJson(raw)
  if (!isPlainObject(value)) return null
  const { requestId, answer } = value
  const from = value.from ?? null
  if (typeof requestId !== 'string' || (from !== null && typeof from !== 'string')) return null
  if (answer === null || isStringArray(answer)) return { requestId, answer, from }
  if (isPlainObject(answer) && typeof answer.refused === 'string') return { requestId, answer: { refused: answer.refused, forbidden: answer.forbidden === true }, from }
  return null
}
