/** Messages between the bench's main thread and its load-client workers. */
import type { SerializedHistogram } from './histogram'

export interface Endpoint {
  host: string
  port: number
  /**
   * What a publish request's body is: the gateway's envelope
   * (`{"to":…,"event":…,"data":…}`), or only the event's data (Nchan, which
   * publishes a request's body as is).
   */
  publishBody?: 'envelope' | 'data'
}

export interface StreamPlan {
  /** Servers; connection i goes to endpoints[i % endpoints.length]. */
  endpoints: Endpoint[]
  /** Request path up to the token, e.g. `/v1/stream?topics=bench&token=`. */
  pathPrefix: string
  /** Bytes that tell the stream is open end to end (`event: connected\n` from the gateway). */
  readyMarker: string
  /** Connection i uses tokens[i % tokens.length] (one token per user). */
  tokens: string[]
  /** Source addresses to spread connections over (empty: let the kernel choose). */
  localAddresses: string[]
  handshakeTimeoutMs: number
}

export interface WorkerInit {
  workerIndex: number
  clockOffsetUs: number
}

export type Command =
  | { type: 'open', id: number, plan: StreamPlan, first: number, count: number, inFlight: number }
  | { type: 'reset', id: number }
  | { type: 'progress', id: number }
  | { type: 'report', id: number, expected: number }
  | { type: 'churn', id: number, plan: StreamPlan, first: number, target: number, inFlight: number, durationMs: number, lifeMinMs: number, lifeMaxMs: number, rstEvery: number }
  | { type: 'close', id: number, rst: boolean }

export interface OpenResult {
  established: number
  failed: number
  errors: Record<string, number>
  startUs: number
  endUs: number
  handshake: SerializedHistogram
}

export interface Progress {
  events: number
  lastRxUs: number
  live: number
}

export interface Report {
  connections: number
  live: number
  events: number
  firstRxUs: number
  lastRxUs: number
  outOfOrder: number
  gaps: number
  /** Streams with exactly / more than / fewer than the expected events. */
  exact: number
  over: number
  under: number
  minEvents: number
  maxEvents: number
  /** Streams the server ended while the client still wanted them. */
  closedByServer: number
  latency: SerializedHistogram
  /** Event-loop utilisation of this worker since its last reset (0..1). */
  elu: number
  /** This worker's event-loop delay since its last reset, µs: how late it could read a ready socket. */
  lagP99Us: number
  lagMaxUs: number
}

export interface ChurnResult {
  opened: number
  failed: number
  closedByClient: number
  closedByServer: number
  errors: Record<string, number>
  events: number
  outOfOrder: number
  gaps: number
  latency: SerializedHistogram
  maxLive: number
  elu: number
}

export type Reply =
  | { type: 'opened', id: number, result: OpenResult }
  | { type: 'reset', id: number }
  | { type: 'progress', id: number, progress: Progress }
  | { type: 'report', id: number, report: Report }
  | { type: 'churned', id: number, result: ChurnResult }
  | { type: 'closed', id: number, closed: number }
  | { type: 'failed', id: number, message: string }
