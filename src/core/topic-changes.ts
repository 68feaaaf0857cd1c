import { channel } from './channels'
import type { StreamConnection } from './connection'
import { topicAllowed } from './framing'
import type { Registry } from './registry'
import { inTurns, type TurnsPerKey } from './in-turns'
import { StoreLostDataError, type ControlAnswer, type ControlMessage } from './state'
import type { StreamService } from './streams'

export type TopicsMessage = Extract<ControlMessage, { type: 'topics' }>

/**
 * Adds and removes topics on this instance's live streams: one stream's
 * (`connectionId` set), or every stream of the user (a user-wide
 * subscription). Answers the targeted stream's topics if this instance holds
 * it, or why the change is refused.
 */
export async function applyTopicChange (
  message: TopicsMessage, registry: Registry, streams: StreamService, maxTopics: number
): Promise<ControlAnswer> {
  const restored = message.restored === true
  const targets = message.connectionId !== null
    ? [registry.get(message.connectionId)].filter((found): found is StreamConnection => found !== undefined && found.userId === message.userId)
    : registry.ofUser(message.userId)
  let answer: ControlAnswer = null
  for (const connection of targets) {
    if (connection.kind !== 'stream' || connection.closed) continue
    // A user-wide subscription reaches only the streams whose token allows the
    // topic; bringing streams back in line, not those that left it themselves.
    const adding = message.add.filter((topic) => topicAllowed(topic, connection.allowedTopics) && !(restored && connection.hasLeftOnItsOwn(topic)))
    // One stream's own subscriptions are held to its own token's topics and
    // to MAX_TOPICS, all or nothing: the request's token may be broader than
    // the one the stream was opened with. User-wide topics (held to
    // MAX_TOPICS per user) join regardless.
    if (message.connectionId !== null) {
      const forbidden = message.add.find((topic) => !adding.includes(topic))
      if (forbidden !== undefined) return { refused: `the stream's token does not allow topic ${forbidden}`, forbidden: true }
      const held = connection.topics
      const removing = message.remove.filter((topic) => held.includes(topic)).length
      const after = held.length - removing + adding.filter((topic) => !held.includes(topic)).length
      if (after > maxTopics) return { refused: `a stream holds at most ${maxTopics} topics`, forbidden: false }
    }
    // A user-wide unsubscribe takes away only what the user-wide
    // subscription brought: not a topic the stream asked for itself.
    const userWide = message.connectionId === null
    // The open's read may still return a topic removed now, the stream's own
    // removal of a user-wide topic included: it is not joined from the read.
    const reading = connection.userTopicsLeftWhileReading
    if (reading !== null) {
      for (const topic of message.remove) reading.add(topic)
      if (userWide) for (const topic of adding) reading.delete(topic)
    }
    // What the stream or its user asks now stands over a topic the stream left on its own.
    if (!restored) for (const topic of [...adding, ...(userWide ? message.remove : [])]) connection.leftOnItsOwn(topic, false)
    // Its own removal of a topic its user's subscription covers: the stream stays without it.
    const leftOfUsers = userWide ? [] : message.remove.filter((topic) => connection.isForUser(topic))
    const added = registry.addTopics(connection, adding)
    if (userWide) {
      connection.joinedForUser(adding, added)
      for (const topic of message.remove) connection.coveredForUser(topic, false)
    } else {
      for (const topic of adding) {
        if (connection.heldForUser(topic)) connection.coveredForUser(topic, true)
        connection.keepTopic(topic)
      }
    }
    const removed = registry.removeTopics(connection, userWide ? message.remove.filter((topic) => connection.heldForUser(topic)) : message.remove)
    for (const topic of leftOfUsers) {
      connection.leftOnItsOwn(topic, true)
      connection.coveredForUser(topic, false)
    }
    streams.leave(connection, removed.map(channel.topic))
    // The topics as this change left them: a change applied while the join
    // or the record below waits is the other request's to answer.
    const after = [...connection.topics]
    await streams.join(connection, added.map(channel.topic))
    // Best effort, as at open: the change is made, and a failed record
    // (Redis refusing writes) must not answer it as refused.
    if (added.length > 0 || removed.length > 0) await streams.recordTopics(connection)
    if (message.connectionId !== null) answer = after
  }
  return answer
}

/** Users whose user-wide topics are read at once while streams are brought back in line. */
const USERS_READ_AT_ONCE = 100
/** Reads of one user's topics in one run, each overtaken by a change of theirs, before the user is left to the next run. */
const READS_PER_USER = 5

/**
 * Brings this instance's streams back in line with their users' user-wide
 * topics as the shared state holds them, after control messages may have
 * been missed: a user-wide subscribe or unsubscribe answered while this
 * instance did not hear it left its streams without the topic, or with one
 * the user left. A user's set is applied in the user's turn (see
 * `turns`), unless a change of theirs arrived since it was read: a change
 * is a delta, and the set is read again after it.
 */
export class UserWideRealignment {
  private changedWhileReading: Set<string> | null = null
  /** The users the last run failed to bring in line; null: every user (it never ran, or it ended early). */
  private failedLastRun: Set<string> | null = null

  constructor (
    private readonly registry: Registry,
    /** One user's topic changes are applied one after another, in arrival order. */
    private readonly turns: TurnsPerKey,
    /** Applies a change at once, outside the user's turn. */
    private readonly apply: (message: TopicsMessage) => Promise<ControlAnswer>
  ) {}

  /** A user-wide change of `userId` arrived from a control message. */
  noteArrived (userId: string): void {
    this.changedWhileReading?.add(userId)
  }

  /**
   * Fails with the first user's failure once every other user has been
   * brought in line: one user whose read or join fails (a command timed out)
   * holds up nobody else, and a retry (`retrying`) reads only the users that
   * failed. A `StoreLostDataError` ends it at once (the sets read may all be
   * gone), and every user is owed again.
   */
  async run (read: (userId: string) => Promise<string[] | null>, retrying = false): Promise<void> {
    const users = new Set<string>()
    for (const connection of this.registry.all()) if (connection.kind === 'stream') users.add(connection.userId)
    const owed = this.failedLastRun
    const reading = retrying && owed !== null ? [...owed].filter((userId) => users.has(userId)) : [...users]
    const changed = new Set<string>()
    const failures: unknown[] = []
    const failed = new Set<string>()
    this.changedWhileReading = changed
    this.failedLastRun = null
    try {
      await inTurns(reading, USERS_READ_AT_ONCE, async (userId) => {
        try {
          // Overtaken at every read: still owed what was missed, which a change (a delta) does not carry.
          if (!(await this.realignReading(userId, read, changed))) {
            failures.push(new Error(`a user's topics changed during each of ${READS_PER_USER} reads`))
            failed.add(userId)
          }
        } catch (error) {
          if (error instanceof StoreLostDataError) throw error
          failures.push(error)
          failed.add(userId)
        }
      })
    } finally {
      this.changedWhileReading = null
    }
    this.failedLastRun = failed
    if (failures.length > 0) throw failures[0]
  }

  /** Whether the user was brought in line: false when a change of theirs overtook each read. */
  private async realignReading (userId: string, read: (userId: string) => Promise<string[] | null>, changed: Set<string>): Promise<boolean> {
    for (let attempt = 0; attempt < READS_PER_USER; attempt++) {
      changed.delete(userId)
      const topics = await read(userId)
      const done = await this.turns.run(userId, async () => {
        if (changed.has(userId)) return false
        if (topics !== null) await this.realignUser(userId, topics)
        return true
      })
      if (done) return true
    }
    return false
  }

  private async realignUser (userId: string, topics: string[]): Promise<void> {
    const streams = this.registry.ofUser(userId).filter((connection) => connection.kind === 'stream' && !connection.closed)
    const remove = new Set<string>()
    for (const connection of streams) for (const topic of connection.userWideTopics) if (!topics.includes(topic)) remove.add(topic)
    const lacking = streams.some((connection) => topics.some((topic) =>
      !connection.topics.includes(topic) && topicAllowed(topic, connection.allowedTopics) && !connection.hasLeftOnItsOwn(topic)))
    if (remove.size === 0 && !lacking) return
    await this.apply({ type: 'topics', userId, connectionId: null, add: topics, remove: [...remove], restored: true })
  }
}
