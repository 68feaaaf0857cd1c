/**
 * Helpers for the channel tests (topics, conversations, jobs, pre-created
 * streams): one or two gateways per mode, stream opening by user, the JSON
 * routes those tests drive, and a marker to prove that something did NOT
 * arrive without sleeping.
 */
import { randomBytes } from 'node:crypto'
import type { Test } from 'tap'
import type { Gateway } from './gateway'
import { publishOk, request, type JsonResponse } from './http'
import { startCluster, type Mode } from './modes'
import { openConnected, openStream, type ConnectedData, type OpenStreamOptions, type SseClient, type SseEvent } from './sse'
import { adminToken, publisherToken, userToken } from './tokens'
import type { JobState } from '../../src/core/jobs'

export const PUBLISHER = publisherToken()
export const ADMIN = adminToken()

/**
 * Two gateways of one cluster in Redis mode (a stream on one, a publisher on
 * the other proves the fan-out); the same single gateway twice in embedded mode.
 */
export async function pair (t: Test, mode: Mode, env: Record<string, string> = {}): Promise<[Gateway, Gateway]> {
  const gateways = await startCluster(t, mode, mode === 'redis' ? 2 : 1, env)
  return [gateways[0], gateways[gateways.length - 1]]
}

export interface ConnectOptions {
  /** Path after the origin (default `/v1/stream`). */
  path?: string
  /** `?topics=` value. */
  topics?: string
  /** A token other than `userToken(user)`. */
  token?: string
  lastEventId?: string
  headers?: Record<string, string>
}

export interface Connected {
  stream: SseClient
  connected: ConnectedData
  connectionId: string
}

function streamUrl (gateway: Gateway, user: string, options: ConnectOptions): string {
  const query = new URLSearchParams({ token: options.token ?? userToken(user) })
  if (options.topics !== undefined) query.set('topics', options.topics)
  return `${gateway.url}${options.path ?? '/v1/stream'}?${query.toString()}`
}

/** Opens a stream for `user` (query-string token, as EventSource does) and waits for `connected`. */
export async function connect (t: Test, gateway: Gateway, user: string, options: ConnectOptions = {}): Promise<Connected> {
  const headers: Record<string, string> = { ...options.headers }
  if (options.lastEventId !== undefined) headers['last-event-id'] = options.lastEventId
  const { stream, connected } = await openConnected(streamUrl(gateway, user, options), { t, headers })
  return { stream, connected, connectionId: connected.connectionId }
}

/** Opens a stream for `user` and returns it whatever the status (for 4xx and 204 answers). */
export async function tryOpen (t: Test, gateway: Gateway, user: string, options: ConnectOptions = {}): Promise<SseClient> {
  const headers: Record<string, string> = { ...options.headers }
  if (options.lastEventId !== undefined) headers['last-event-id'] = options.lastEventId
  const streamOptions: OpenStreamOptions = { t, headers }
  return await openStream(streamUrl(gateway, user, options), streamOptions)
}

/** A fresh value no other marker has. */
export function nonce (): string {
  return randomBytes(6).toString('hex')
}

/**
 * Publishes a `marker` event to one connection and waits for it: everything
 * published before it that was going to reach the stream has arrived by then
 * (ids are delivered in order). Returns the events not yet consumed by
 * `next`/`take` up to and including the marker, and consumes them.
 */
export async function settle (gateway: Gateway, stream: SseClient, connectionId: string): Promise<SseEvent[]> {
  const from = stream.events.length - stream.unread().length
  const value = nonce()
  await publishOk(gateway.url, PUBLISHER, { to: { connection: connectionId }, event: 'marker', data: value })
  const marker = await stream.next((event) => event.event === 'marker' && event.data === value, 5000, `marker ${value}`)
  return stream.events.slice(from, stream.events.indexOf(marker) + 1)
}

/** Names of the published (id-carrying) events, marker excluded. */
export function namesOf (events: SseEvent[]): string[] {
  return events.filter((event) => event.id !== undefined && event.event !== 'marker').map((event) => event.event)
}

/** The parsed `data` of an event. */
export function dataOf<T = Record<string, unknown>> (event: SseEvent): T {
  return JSON.parse(event.data) as T
}

export async function publishTo (gateway: Gateway, body: unknown): Promise<string> {
  const ids = await publishOk(gateway.url, PUBLISHER, body)
  return ids[0]
}

export type MembersOp = 'PUT' | 'POST' | 'DELETE'

export async function members (gateway: Gateway, conversationId: string, op: MembersOp, list: string[], token = PUBLISHER): Promise<JsonResponse<{ members: string[] }>> {
  return await request<{ members: string[] }>(`${gateway.url}/v1/conversations/${encodeURIComponent(conversationId)}/members`, {
    method: op,
    token,
    body: { members: list }
  })
}

export async function setMembers (gateway: Gateway, conversationId: string, list: string[]): Promise<void> {
  const answer = await members(gateway, conversationId, 'PUT', list)
  if (answer.status !== 200) throw new Error(`PUT members answered ${answer.status}: ${answer.text}`)
}

export interface JobBody {
  userId: string
  status: 'queued' | 'active' | 'completed' | 'failed'
  progress?: number
  result?: unknown
  error?: string
  meta?: unknown
}

/** What the job routes answer: the stored state (PUT adds the id of its event). */
export type JobStateReply = Omit<JobState, 'eventId'> & { eventId?: string }

export async function putJob (gateway: Gateway, jobId: string, body: JobBody | Record<string, unknown>, token = PUBLISHER): Promise<JsonResponse<JobStateReply>> {
  return await request<JobStateReply>(`${gateway.url}/v1/jobs/${encodeURIComponent(jobId)}`, { method: 'PUT', token, body })
}

export async function putJobOk (gateway: Gateway, jobId: string, body: JobBody): Promise<JobStateReply> {
  const answer = await putJob(gateway, jobId, body)
  if (answer.status !== 200) throw new Error(`PUT /v1/jobs/${jobId} answered ${answer.status}: ${answer.text}`)
  return answer.json
}

export interface SubscriptionBody {
  topics: unknown
  connectionId?: string
}

export async function subscriptions (gateway: Gateway, token: string, method: 'POST' | 'DELETE', body: SubscriptionBody | Record<string, unknown>): Promise<JsonResponse<{ topics: string[] }>> {
  // The header seed 004 uses (x-auth-token), so that path is exercised too.
  return await request<{ topics: string[] }>(`${gateway.url}/v1/subscriptions`, { method, headers: { 'x-auth-token': token }, body })
}

export interface StatsReply {
  connections: number
  users: number
  averageConnectionsPerUser: number
  topics: Record<string, number>
  instances: number
}

export async function stats (gateway: Pick<Gateway, 'url'>): Promise<StatsReply> {
  const answer = await request<StatsReply>(`${gateway.url}/v1/stats`, { token: ADMIN })
  if (answer.status !== 200) throw new Error(`GET /v1/stats answered ${answer.status}: ${answer.text}`)
  return answer.json
}

export interface PresenceReply {
  userId: string
  online: boolean
  connections: number
}

export async function presence (gateway: Gateway, userId: string): Promise<PresenceReply> {
  const answer = await request<PresenceReply>(`${gateway.url}/v1/presence/${encodeURIComponent(userId)}`, { token: PUBLISHER })
  if (answer.status !== 200) throw new Error(`GET /v1/presence answered ${answer.status}: ${answer.text}`)
  return answer.json
}

/** True when every id is a decimal integer above the one before it. */
export function increasing (ids: Array<string | undefined>): boolean {
  return ids.every((id, index) => id !== undefined && /^\d+$/.test(id) && (index === 0 || BigInt(id) > BigInt(ids[index - 1] ?? '0')))
}
