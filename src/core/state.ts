import type { ConnectionFilter } from './listing'
import type { ConnectionInfo } from './registry'
import type { JobRefusal, JobState, JobUpdate } from './jobs'

/**
 * Raised when the shared store (Redis) cannot be reached or refuses work for
 * its own condition: routes answer 503, not 500. Declared here, not beside
 * the Redis client, so embedded mode can recognise it without loading ioredis.
 */
export class StoreUnavailableError extends Error {
  readonly statusCode = 503
  /** Why, for the log: the store's own words, first line only (never a command's arguments). */
  readonly reason: string
  constructor (cause: unknown) {
    super('the event store (Redis) is unavailable')
    this.cause = cause
    this.reason = (cause instanceof Error ? cause.message : String(cause)).split('\n', 1)[0].slice(0, 300)
  }
}

/** The store lost its data (a new id epoch) while a task read from it: what it read may be gone. */
export class StoreLostDataError extends Error {}

export type LimitPolicy = 'reject' | 'evict-oldest'

export interface AdmitRequest {
  connectionId: string
  userId: string
  topics: string[]
  openedAt: number
  limit: number
  policy: LimitPolicy
}

export type Admission =
  | { admitted: false }
  | {
    admitted: true
    cameOnline: boolean
    /** The stream the limit evicted, and the instance whose it is. */
    evict: { connectionId: string, instance: string } | null
    /**
     * Instances whose stream of this id the admission took the id from: a
     * reopen racing another on another instance, which neither saw when it
     * asked the holder to let go. They must close theirs.
     */
    replacedOn: string[]
    /**
     * Where this admission stands among all admissions of the cluster: an
     * eviction decided by an earlier one (still in flight as it is
     * admitted) is not this stream's.
     */
    seq: number
    /**
     * The last event id issued when it was admitted: events up to it are
     * older than the stream, which joins its channels after. 0 where the bus
     * cannot lose deliveries (embedded mode), which is what it bounds.
     */
    issuedBefore: number
  }

export interface ConnectionListing {
  connections: ConnectionInfo[]
  total: number
}

export interface ClusterStats {
  connections: number
  users: number
  topics: Record<string, number>
  instances: number
}

export interface Presence {
  userId: string
  online: boolean
  connections: number
}

/**
 * Brings streams back in line with their users' user-wide topics, read with
 * `read`: null when the store has nothing to go by for the user (no set and
 * no removal on record); it rejects when the store lost its data meanwhile.
 * `retrying`: the last run failed, and no control message can have been
 * missed since, so only what failed then is owed (every user, if that run
 * ended early: the store lost its data).
 */
export type ControlMissedListener = (read: (userId: string) => Promise<string[] | null>, retrying: boolean) => Promise<void>

/** Something every instance must apply to its own streams. */
export type ControlMessage =
  /**
   * `instance`: only that instance's stream of the id (null: whichever holds
   * it). `decidedAt`: the seq of the admission that decided it; it ends only
   * streams of the id admitted before (null, from an instance that predates
   * it: whichever).
   */
  | { type: 'evict', connectionId: string, reason: string, instance: string | null, decidedAt: number | null }
  /**
   * `restored`: the user's topics as the shared state holds them (written
   * back after the store lost its data, or a stream brought back in line),
   * not a change the user asked for: a stream that left one on its own stays without.
   */
  | { type: 'topics', userId: string, connectionId: string | null, add: string[], remove: string[], restored?: true }

/** The control message of a user-wide subscribe ('add') or unsubscribe ('remove') of `topics`. */
export function userWideChange (userId: string, op: 'add' | 'remove', topics: string[]): Extract<ControlMessage, { type: 'topics' }> {
  return { type: 'topics', userId, connectionId: null, add: op === 'add' ? topics : [], remove: op === 'remove' ? topics : [] }
}

/**
 * An instance's answer to a control message: the targeted stream's topics if
 * it holds that stream, or why it refused the change.
 */
export type ControlAnswer = string[] | ControlRefusal | null
/** Why a stream refused a change: its own token forbids a topic (403), or a bound (409). */
export interface ControlRefusal { refused: string, forbidden: boolean }
export type ControlListener = (message: ControlMessage) => Promise<ControlAnswer>

export type JobPutResult = { ok: true, state: JobState } | JobRefusal

/** Who hears of a user's presence (SharedState.contacts). */
export interface Contacts {
  members: string[]
  /** Conversations left out: telling their members too would pass the bound. */
  skipped: number
}

/** What an admission records of an open in the shared record. */
export interface AdmittedEntry { userId: string, topics: string[], openedAt: number }

/** An open past its admission check and not registered yet; `admitted` once its admission has run (and not been evicted since). */
export interface OpeningStream {
  connectionId: string
  seq: number | null
  admitted: AdmittedEntry | null
}

/**
 * Opens between their admission and the registry, as the instance that runs
 * them knows them. When Redis comes back (maybe empty), the state records the
 * instance's streams again, these with them: their entries are written again
 * as their admissions wrote them.
 */
export interface OpenTracker {
  /** Opens of this instance past their admission check and not registered yet. */
  opening (): Iterable<OpeningStream>
  /**
   * Gives back the entry of a stream whose close could not be recorded
   * while Redis was unreachable, unless a stream or open of the id here
   * holds it now (its admission wrote the same entry).
   */
  releaseLate (connectionId: string, userId: string): Promise<void>
}

/** A key's requests within its window, and the milliseconds the window has left. */
export interface RequestCount { current: number, ttl: number }

/** Requests counted per key for rate limits, alike on every instance. */
export interface RequestCounter {
  /** Counts one request under `key`, in a window of `windowMs` that starts at its first request. */
  count: (key: string, windowMs: number) => Promise<RequestCount>
}

/**
 * State every instance must see alike: stream ids, user-wide topics,
 * conversation members, jobs, and who is connected where. In embedded mode it
 * lives in this process; in Redis mode, in Redis with its TTLs.
 */
export interface SharedState {
  readonly instanceId: string

  /** Pre-creates a stream id a backend can publish into before the browser joins. */
  createConnection (connectionId: string, userId: string, ttlS: number): Promise<void>
  /** Owner of a pre-created, live or recently closed stream id; null when unknown or expired. */
  connectionOwner (connectionId: string): Promise<string | null>

  /** Admits a stream under the per-user limit and records it; says whether the user just came online. */
  admit (request: AdmitRequest): Promise<Admission>
  /**
   * Forgets a closed stream; its id stays reopenable for `ttlS`. If it was
   * the user's last, the user counts as online for `graceMs` more
   * (`PRESENCE_GRACE_MS` unless given).
   */
  release (connectionId: string, userId: string, ttlS: number, graceMs?: number): Promise<void>
  /**
   * A live stream's topics changed (for cluster-wide counts and listings):
   * records the topics of the stream registered under the id when the
   * write goes out, which may be a reopen that replaced the one that changed.
   */
  updateTopics (connectionId: string, userId: string): Promise<void>
  /** Registers how this instance applies control messages to its own streams. */
  onControl (listener: ControlListener): void
  /** Applies a control message on every instance; resolves with the first non-null answer once all have. */
  broadcastControl (message: ControlMessage): Promise<ControlAnswer>
  /**
   * Registers the callback fired when a user comes online other than by
   * opening a stream (an instance taken for dead comes back with its streams).
   */
  onOnline (listener: (userId: string) => void): void
  /** Registers the callback fired when a user's grace period ends with no stream. */
  onOffline (listener: (userId: string) => void): void
  /**
   * Registers what brings this instance's streams back in line with the
   * shared state after control messages may have been missed (the
   * connection that carries them dropped).
   */
  onControlMissed (listener: ControlMissedListener): void
  /** Registers what this instance knows of its streams beyond the registry (see OpenTracker). */
  trackOpens (tracker: OpenTracker): void
  presence (userId: string): Promise<Presence>
  stats (): Promise<ClusterStats>
  /** The cluster's streams an admin asked for (see selectConnections), and how many matched. */
  connections (filter?: ConnectionFilter): Promise<ConnectionListing>

  userTopics (userId: string): Promise<string[]>
  /**
   * Adds or removes user-wide topics, and has every instance apply the change
   * to the user's live streams in the order the changes were made (two
   * changes racing on two instances leave the streams as the topics); settles
   * once they have, like broadcastControl. Resolves with the user's topics
   * after it; null, and nothing added, when they would be more than `max`.
   */
  changeUserTopics (userId: string, op: 'add' | 'remove', topics: string[], ttlS: number, max: number): Promise<string[] | null>

  updateMembers (conversationId: string, op: 'set' | 'add' | 'remove', members: string[]): Promise<string[]>
  members (conversationId: string): Promise<string[]>
  /**
   * The other members of the user's conversations, taken smallest
   * conversation first while they stay within `max` in all: a conversation
   * that would take them past it is left out, and counted in `skipped`.
   */
  contacts (userId: string, max: number): Promise<Contacts>

  getJob (jobId: string): Promise<JobState | null>
  /** Applies a job update and publishes its `job_update` event in one step; `maxEventBytes` bounds the job's whole state (see transitionJob). */
  putJob (jobId: string, update: JobUpdate, ttlS: number, maxEventBytes: number): Promise<JobPutResult>

  close (): Promise<void>
}
