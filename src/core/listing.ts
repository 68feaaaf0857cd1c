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

export interface ConnectionSelection {
  connections: ConnectionInfo[]
  /** How many matched, before the limit. */
  total: number
}

const newestFirst = (a: ConnectionInfo, b: ConnectionInfo): number =>
  a.openedAt < b.openedAt ? 1 : a.openedAt > b.openedAt ? -1 : a.connectionId < b.connectionId ? -1 : a.connectionId > b.connectionId ? 1 : 0

function matches (info: ConnectionInfo, filter: ConnectionFilter, needle: string | undefined): boolean {
  if (filter.userId !== undefined && info.userId !== filter.userId) return false
  if (filter.topic !== undefined && !info.topics.includes(filter.topic)) return false
  if (needle === undefined) return true
  return info.userId.toLowerCase().includes(needle) || info.connectionId.toLowerCase().includes(needle) ||
    info.instance.toLowerCase().includes(needle) || info.topics.some((topic) => topic.toLowerCase().includes(needle))
}

/**
 * The listing an admin asked for. With a limit it is the newest streams first
 * (`openedAt` is ISO 8601 in UTC, so it sorts as text), which is what a
 * dashboard over 100k streams shows; without one, every match in no set order,
 * and nothing is sorted.
 */
export function selectConnections (all: ConnectionInfo[], filter: ConnectionFilter): ConnectionSelection {
  const needle = filter.search?.toLowerCase()
  const narrowed = filter.userId !== undefined || filter.topic !== undefined || needle !== undefined
  const matching = narrowed ? all.filter((info) => matches(info, filter, needle)) : all
  if (filter.limit === undefined) return { connections: matching, total: matching.length }
  const sorted = (narrowed ? matching : [...matching]).sort(newestFirst)
  return { connections: sorted.slice(0, filter.limit), total: matching.length }
}
