import { channel } from './channels'
import type { StreamConnection } from './connection'
import { topicAllowed } from './framing'
import type { Registry } from './registry'
import { inTurns } from './in-turns'
import type { ControlAnswer, ControlMessage, SharedState } from './state'
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
  const targets = message.connectionId !== null
    ? [registry.get(message.connectionId)].filter((found): found is StreamConnection => found !== undefined && found.userId === message.userId)
    : registry.ofUser(message.userId)
  let answer: ControlAnswer = null
  for (const connection of targets) {
    if (connection.kind !== 'stream' || connection.closed) continue
    // A user-wide subscription reaches only the streams whose token allows the topic.
    const adding = message.add.filter((topic) => topicAllowed(topic, connection.allowedTopics))
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
    const added = registry.addTopics(connection, adding)
    if (userWide) for (const topic of added) connection.holdForUser(topic)
    else for (const topic of adding) connection.keepTopic(topic)
    const removed = registry.removeTopics(connection, userWide ? message.remove.filter((topic) => connection.heldForUser(topic)) : message.remove)
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

/**
 * Brings this instance's streams back in line with their users' user-wide
 * topics as the shared state holds them, after control messages may have
 * been missed: a user-wide subscribe or unsubscribe answered while this
 * instance did not hear it left its streams without the topic, or with one
 * the user left. A user whose change arrives while the set is read is left
 * to that change, which is at least as new.
 */
export class UserWideRealignment {
  private changedWhileReading: Set<string> | null = null

  constructor (
    private readonly registry: Registry,
    private readonly state: Pick<SharedState, 'userTopics'>,
    private readonly apply: (message: TopicsMessage) => Promise<ControlAnswer>
  ) {}

  /** A user-wide change of `userId` was applied from a control message. */
  noteApplied (userId: string): void {
    this.changedWhileReading?.add(userId)
  }

  async run (): Promise<void> {
    const users = new Set<string>()
    for (const connection of this.registry.all()) if (connection.kind === 'stream') users.add(connection.userId)
    const changed = new Set<string>()
    this.changedWhileReading = changed
    try {
      await inTurns([...users], USERS_READ_AT_ONCE, async (userId) => {
        const topics = await this.state.userTopics(userId)
        if (changed.has(userId)) return
        const streams = this.registry.ofUser(userId).filter((connection) => connection.kind === 'stream' && !connection.closed)
        const remove = new Set<string>()
        for (const connection of streams) for (const topic of connection.userWideTopics) if (!topics.includes(topic)) remove.add(topic)
        const lacking = streams.some((connection) => topics.some((topic) => !connection.topics.includes(topic) && topicAllowed(topic, connection.allowedTopics)))
        if (remove.size === 0 && !lacking) return
        await this.apply({ type: 'topics', userId, connectionId: null, add: topics, remove: [...remove] })
      })
    } finally {
      this.changedWhileReading = null
    }
  }
}
