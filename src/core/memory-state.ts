import { channel } from './channels'
import { transitionJob, type JobState, type JobUpdate } from './jobs'
import { selectConnections, streamFields, type ConnectionFilter } from './listing'
import type { MemoryBus } from './memory-bus'
import type { Registry } from './registry'
import { userWideChange, type Admission, type AdmitRequest, type ClusterStats, type ConnectionListing, type Contacts, type ControlAnswer, type ControlListener, type ControlMessage, type JobPutResult, type Presence, type SharedState } from './state'

interface Expiring<T> { value: T, expiresAt: number | null }

/** Shared state for embedded mode: the process is the whole cluster. */
export class MemoryState implements SharedState {
  readonly instanceId: string
  /** Owners of the ids of live streams. */
  private readonly liveOwners = new Map<string, string>()
  /**
   * Owners of pre-created and closed stream ids, until they expire. Every id
   * gets the same window (HISTORY_TTL_S) and is re-inserted when it gets a
   * new expiry, so insertion order is expiry order: the sweep stops at the
   * first id not expired instead of reading every id closed in the window
   * (a million at ≈ 300 closes/s for an hour: 75–120 ms of blocked event loop).
   */
  private readonly closedOwners = new Map<string, Expiring<string>>()
  private readonly liveByUser = new Map<string, Map<string, number>>()
  private readonly graceTimers = new Map<string, NodeJS.Timeout>()
  private readonly userTopicSets = new Map<string, Expiring<Set<string>>>()
  private readonly conversations = new Map<string, Set<string>>()
  private readonly conversationsOfUser = new Map<string, Set<string>>()
  private readonly jobs = new Map<string, Expiring<JobState>>()
  private offlineListener: (userId: string) => void = () => {}
  private controlListener: ControlListener = async () => null
  private readonly sweepTimer: NodeJS.Timeout

  constructor (
    private readonly bus: MemoryBus,
    private readonly registry: Registry,
    private readonly presenceGraceMs: number
  ) {
    this.instanceId = registry.instanceId
    this.sweepTimer = setInterval(() => this.sweep(), 30_000).unref()
  }

  async createConnection (connectionId: string, userId: string, ttlS: number): Promise<void> {
    this.liveOwners.delete(connectionId)
    this.expireOwnerAt(connectionId, userId, Date.now() + ttlS * 1000)
  }

  async connectionOwner (connectionId: string): Promise<string | null> {
    return this.liveOwners.get(connectionId) ?? this.current(this.closedOwners, connectionId)
  }

  private expireOwnerAt (connectionId: string, userId: string, expiresAt: number): void {
    this.closedOwners.delete(connectionId)
    this.closedOwners.set(connectionId, { value: userId, expiresAt })
  }

  /** Admissions so far: each one's seq. */
  private admissions = 0

  async admit (request: AdmitRequest): Promise<Admission> {
    let live = this.liveByUser.get(request.userId)
    let evict: string | null = null
    // A reopened id takes its live holder's place: the holder does not count against the limit.
    const others = live === undefined ? 0 : live.size - (live.has(request.connectionId) ? 1 : 0)
    if (live !== undefined && others >= request.limit) {
      if (request.policy === 'reject') return { admitted: false }
      evict = oldest(live, request.connectionId)
      if (evict !== null) live.delete(evict)
    }
    const wasOnline = (live !== undefined && live.size > 0) || evict !== null || this.graceTimers.has(request.userId)
    const grace = this.graceTimers.get(request.userId)
    if (grace !== undefined) {
      clearTimeout(grace)
      this.graceTimers.delete(request.userId)
    }
    if (live === undefined) {
      live = new Map()
      this.liveByUser.set(request.userId, live)
    }
    live.set(request.connectionId, request.openedAt)
    this.liveOwners.set(request.connectionId, request.userId)
    this.closedOwners.delete(request.connectionId)
    // A live stream holds the user-wide topics; ones that lapsed stay gone.
    const topics = this.userTopicSets.get(request.userId)
    if (topics !== undefined) {
      if (this.isExpired(topics)) this.userTopicSets.delete(request.userId)
      else topics.expiresAt = null
    }
    // One process: a reopen racing another is settled in the registry.
    return { admitted: true, cameOnline: !wasOnline, evict: evict === null ? null : { connectionId: evict, instance: this.instanceId }, replacedOn: [], seq: ++this.admissions, issuedBefore: 0 }
  }

  async release (connectionId: string, userId: string, ttlS: number, graceMs = this.presenceGraceMs): Promise<void> {
    const expiresAt = Date.now() + ttlS * 1000
    if ((this.liveOwners.get(connectionId) ?? this.closedOwners.get(connectionId)?.value) === userId) {
      this.liveOwners.delete(connectionId)
      this.expireOwnerAt(connectionId, userId, expiresAt)
    }
    const live = this.liveByUser.get(userId)
    if (live === undefined || !live.delete(connectionId) || live.size > 0) return
    this.liveByUser.delete(userId)
    const topics = this.userTopicSets.get(userId)
    if (topics !== undefined) topics.expiresAt = expiresAt
    const timer = setTimeout(() => {
      this.graceTimers.delete(userId)
      this.offlineListener(userId)
    }, graceMs).unref()
    this.graceTimers.set(userId, timer)
  }

  async updateTopics (): Promise<void> {}

  trackOpens (): void {
    // This process is the store: nothing is recorded late or lost with it.
  }

  onControl (listener: ControlListener): void {
    this.controlListener = listener
  }

  async broadcastControl (message: ControlMessage): Promise<ControlAnswer> {
    return await this.controlListener(message)
  }

  // One process: a user comes online only by opening a stream.
  onOnline (): void {}

  onOffline (listener: (userId: string) => void): void {
    this.offlineListener = listener
  }

  onControlMissed (): void {
    // One process: control messages are calls, and none can be missed.
  }

  async presence (userId: string): Promise<Presence> {
    const connections = this.liveByUser.get(userId)?.size ?? 0
    return { userId, online: connections > 0 || this.graceTimers.has(userId), connections }
  }

  async stats (): Promise<ClusterStats> {
    return {
      connections: this.registry.size,
      users: this.registry.userCount,
      topics: this.registry.topics(),
      instances: 1
    }
  }

  async connections (filter: ConnectionFilter = {}): Promise<ConnectionListing> {
    const { registry } = this
    const candidates = filter.userId !== undefined ? registry.ofUser(filter.userId) : registry.all()
    const { items, total } = selectConnections(candidates, () => registry.instanceId, streamFields, filter)
    return { connections: items.map((connection) => registry.info(connection)), total }
  }

  async userTopics (userId: string): Promise<string[]> {
    return [...(this.current(this.userTopicSets, userId) ?? [])]
  }

  async changeUserTopics (userId: string, op: 'add' | 'remove', topics: string[], ttlS: number, max: number): Promise<string[] | null> {
    const after = op === 'add' ? this.subscribeUser(userId, topics, ttlS, max) : this.unsubscribeUser(userId, topics)
    if (after === null) return null
    await this.broadcastControl(userWideChange(userId, op, topics))
    return after
  }

  private subscribeUser (userId: string, topics: string[], ttlS: number, max: number): string[] | null {
    let record = this.userTopicSets.get(userId)
    if (record !== undefined && this.isExpired(record)) record = undefined
    const current = record?.value ?? new Set<string>()
    if (current.size + topics.filter((topic) => !current.has(topic)).length > max) return null
    if (record === undefined) {
      record = { value: current, expiresAt: null }
      this.userTopicSets.set(userId, record)
    }
    for (const topic of topics) record.value.add(topic)
    record.expiresAt = this.liveByUser.has(userId) ? null : Date.now() + ttlS * 1000
    return [...record.value]
  }

  private unsubscribeUser (userId: string, topics: string[]): string[] {
    const record = this.userTopicSets.get(userId)
    if (record === undefined) return []
    if (this.isExpired(record)) {
      this.userTopicSets.delete(userId)
      return []
    }
    for (const topic of topics) record.value.delete(topic)
    if (record.value.size === 0) this.userTopicSets.delete(userId)
    return [...record.value]
  }

  async updateMembers (conversationId: string, op: 'set' | 'add' | 'remove', members: string[]): Promise<string[]> {
    const current = this.conversations.get(conversationId) ?? new Set<string>()
    const next = op === 'set' ? new Set(members) : new Set(current)
    if (op === 'add') for (const member of members) next.add(member)
    if (op === 'remove') for (const member of members) next.delete(member)
    for (const member of current) if (!next.has(member)) this.link(member, conversationId, false)
    for (const member of next) if (!current.has(member)) this.link(member, conversationId, true)
    if (next.size === 0) this.conversations.delete(conversationId)
    else this.conversations.set(conversationId, next)
    return [...next]
  }

  async members (conversationId: string): Promise<string[]> {
    return [...(this.conversations.get(conversationId) ?? [])]
  }

  async contacts (userId: string, max: number): Promise<Contacts> {
    const conversations = [...this.conversationsOfUser.get(userId) ?? []]
      .map((id) => ({ id, members: this.conversations.get(id) ?? new Set<string>() }))
      .sort((one, other) => one.members.size - other.members.size || (one.id < other.id ? -1 : 1))
    const members = new Set<string>()
    let skipped = 0
    for (const conversation of conversations) {
      // Its size counts the user: past max + 1 it cannot fit, and is not read.
      if (conversation.members.size > max + 1) {
        skipped++
        continue
      }
      const added = [...conversation.members].filter((member) => member !== userId && !members.has(member))
      if (members.size + added.length > max) skipped++
      else for (const member of added) members.add(member)
    }
    return { members: [...members], skipped }
  }

  async getJob (jobId: string): Promise<JobState | null> {
    return this.current(this.jobs, jobId)
  }

  async putJob (jobId: string, update: JobUpdate, ttlS: number, maxEventBytes: number): Promise<JobPutResult> {
    // No await between reading and publishing: the check and the update are one step.
    const previous = this.current(this.jobs, jobId)
    const transition = transitionJob(jobId, previous, update, new Date(), maxEventBytes)
    if (!transition.ok) return transition
    const [id] = this.bus.publishNow([{
      channels: [channel.job(jobId, update.userId), channel.userJobs(update.userId)],
      body: transition.body
    }])
    const state: JobState = { ...transition.state, eventId: String(id) }
    this.jobs.set(jobId, { value: state, expiresAt: Date.now() + ttlS * 1000 })
    return { ok: true, state }
  }

  async close (): Promise<void> {
    clearInterval(this.sweepTimer)
    for (const timer of this.graceTimers.values()) clearTimeout(timer)
    this.graceTimers.clear()
  }

  private link (userId: string, conversationId: string, member: boolean): void {
    let set = this.conversationsOfUser.get(userId)
    if (member) {
      if (set === undefined) {
        set = new Set()
        this.conversationsOfUser.set(userId, set)
      }
      set.add(conversationId)
    } else if (set !== undefined) {
      set.delete(conversationId)
      if (set.size === 0) this.conversationsOfUser.delete(userId)
    }
  }

  private isExpired (record: Expiring<unknown>): boolean {
    return record.expiresAt !== null && record.expiresAt <= Date.now()
  }

  private current<T> (map: Map<string, Expiring<T>>, key: string): T | null {
    const record = map.get(key)
    if (record === undefined) return null
    if (this.isExpired(record)) {
      map.delete(key)
      return null
    }
    return record.value
  }

  /** Forgets what has expired; returns how many stream ids it read, expired or not. */
  private sweep (): number {
    let idsRead = 0
    for (const [connectionId, record] of this.closedOwners) {
      idsRead++
      if (!this.isExpired(record)) break
      this.closedOwners.delete(connectionId)
    }
    // One per user and per job: not a stream's share of the window.
    for (const map of [this.userTopicSets, this.jobs] as Array<Map<string, Expiring<unknown>>>) {
      for (const [key, record] of map) if (this.isExpired(record)) map.delete(key)
    }
    return idsRead
  }
}

function oldest (live: Map<string, number>, except: string): string | null {
  let found: string | null = null
  let at = Infinity
  for (const [connectionId, openedAt] of live) {
    if (openedAt < at && connectionId !== except) {
      found = connectionId
      at = openedAt
    }
  }
  return found
}
