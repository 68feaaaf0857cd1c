import type { StreamConnection } from './connection'
import { Groups } from './groups'

export interface ConnectionInfo {
  connectionId: string
  userId: string
  topics: string[]
  openedAt: string
  instance: string
}

/** A stream as `GET /v1/connections` lists it; `openedAt` in ms since the epoch. */
export function connectionInfo (connectionId: string, userId: string, topics: Iterable<string>, openedAt: number, instance: string): ConnectionInfo {
  return { connectionId, userId, topics: [...topics], openedAt: new Date(openedAt).toISOString(), instance }
}

/** This process's open streams, by id and by user, and how many streams hold each topic. */
export class Registry {
  private readonly byId = new Map<string, StreamConnection>()
  private readonly byUser = new Groups<StreamConnection>()
  private readonly topicCounts = new Map<string, number>()

  constructor (readonly instanceId: string) {}

  get size (): number {
    return this.byId.size
  }

  get userCount (): number {
    return this.byUser.size
  }

  add (connection: StreamConnection): void {
    this.byId.set(connection.id, connection)
    this.byUser.add(connection.userId, connection)
    this.countTopics(connection.topics, 1)
  }

  /** Returns false when the connection was not (or no longer) registered. */
  remove (connection: StreamConnection): boolean {
    if (this.byId.get(connection.id) !== connection) return false
    this.byId.delete(connection.id)
    this.byUser.delete(connection.userId, connection)
    this.countTopics(connection.topics, -1)
    return true
  }

  get (connectionId: string): StreamConnection | undefined {
    return this.byId.get(connectionId)
  }

  ofUser (userId: string): StreamConnection[] {
    return this.byUser.members(userId)
  }

  /** Adds topics to a registered stream; returns those that were new to it. */
  addTopics (connection: StreamConnection, topics: Iterable<string>): string[] {
    const added = [...topics].filter((topic) => connection.addTopic(topic))
    if (this.byId.get(connection.id) === connection) this.countTopics(added, 1)
    return added
  }

  removeTopics (connection: StreamConnection, topics: Iterable<string>): string[] {
    const removed = [...topics].filter((topic) => connection.removeTopic(topic))
    if (this.byId.get(connection.id) === connection) this.countTopics(removed, -1)
    return removed
  }

  topics (): Record<string, number> {
    return Object.fromEntries(this.topicCounts)
  }

  all (): IterableIterator<StreamConnection> {
    return this.byId.values()
  }

  info (connection: StreamConnection): ConnectionInfo {
    return connectionInfo(connection.id, connection.userId, connection.topics, connection.openedAt, this.instanceId)
  }

  private countTopics (topics: Iterable<string>, delta: number): void {
    for (const topic of topics) {
      const count = (this.topicCounts.get(topic) ?? 0) + delta
      if (count <= 0) this.topicCounts.delete(topic)
      else this.topicCounts.set(topic, count)
    }
  }
}
