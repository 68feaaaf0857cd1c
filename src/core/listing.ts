import type { StreamConnection } from './connection'
import type { ConnectionInfo } from './registry'

/** What `GET /v1/connections` may narrow its listing to; every field optional. */
export interface ConnectionFilter {
  userId?: string
  topic?: string
  /** Case-insensitive substring of the user id, connection id, instance or a topic. */
  search?: string
  /** The newest this many of those that match. */
  limit?: number
}

export interface Selection<T> {
  items: T[]
  /** How many matched, before the limit. */
  total: number
}

/** A stream as the listing sees it, whichever record it is read from. */
export interface ListedFields<T> {
  connectionId: (item: T) => string
  userId: (item: T) => string
  topics: (item: T) => readonly string[]
  /** Comparable: ms since the epoch, or ISO 8601 in UTC (which sorts as text). */
  openedAt: (item: T) => number | string
}

export const infoFields: ListedFields<ConnectionInfo> = {
  connectionId: (info) => info.connectionId,
  userId: (info) => info.userId,
  topics: (info) => info.topics,
  openedAt: (info) => info.openedAt
}

export const streamFields: ListedFields<StreamConnection> = {
  connectionId: (connection) => connection.id,
  userId: (connection) => connection.userId,
  topics: (connection) => connection.topics,
  openedAt: (connection) => connection.openedAt
}

/**
 * The listing an admin asked for, chosen before anything is built for it: at
 * 100k streams, making every record and sorting them took ~250 ms of the
 * event loop, which every stream of the instance would have waited on. With a
 * limit it is the newest first; without one, every match in no set order.
 */
export function selectConnections<T> (all: Iterable<T>, instance: (item: T) => string, fields: ListedFields<T>, filter: ConnectionFilter): Selection<T> {
  const needle = filter.search?.toLowerCase()
  const matching: T[] = []
  for (const item of all) {
    if (filter.userId !== undefined && fields.userId(item) !== filter.userId) continue
    if (filter.topic !== undefined && !fields.topics(item).includes(filter.topic)) continue
    if (needle !== undefined && !fields.userId(item).toLowerCase().includes(needle) &&
      !fields.connectionId(item).toLowerCase().includes(needle) && !instance(item).toLowerCase().includes(needle) &&
      !fields.topics(item).some((topic) => topic.toLowerCase().includes(needle))) continue
    matching.push(item)
  }
  if (filter.limit === undefined) return { items: matching, total: matching.length }
  return { items: newest(matching, filter.limit, fields), total: matching.length }
}

/** The `limit` newest, newest first (ties by id), in O(n log limit) rather than a sort of all. */
function newest<T> (items: T[], limit: number, fields: ListedFields<T>): T[] {
  const newerFirst = (a: T, b: T): number => {
    const openedA = fields.openedAt(a)
    const openedB = fields.openedAt(b)
    if (openedA !== openedB) return openedA < openedB ? 1 : -1
    const idA = fields.connectionId(a)
    const idB = fields.connectionId(b)
    return idA < idB ? -1 : idA > idB ? 1 : 0
  }
  if (items.length <= limit) return items.sort(newerFirst)
  // Kept sorted; most items are older than the last kept one and cost one comparison.
  const kept: T[] = []
  for (const item of items) {
    if (kept.length === limit && newerFirst(item, kept[limit - 1]) >= 0) continue
    let low = 0
    let high = kept.length
    while (low < high) {
      const middle = (low + high) >>> 1
      if (newerFirst(kept[middle], item) <= 0) low = middle + 1
      else high = middle
    }
    kept.splice(low, 0, item)
    if (kept.length > limit) kept.pop()
  }
  return kept
}
