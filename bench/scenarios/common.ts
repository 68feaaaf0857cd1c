/** What every scenario gets from the runner, and helpers they share. */
import type { ClientPool, ReportSummary } from '../lib/client-pool'
import type { StreamPlan } from '../lib/client-protocol'
import type { Clock } from '../lib/clock'
import { sleep } from '../lib/clock'
import type { Histogram } from '../lib/histogram'
import { httpRequest } from '../lib/http'
import { cpuBusy, cpuTimes } from '../lib/proc'
import type { ServerProcess, ServerSnapshot, TargetKind } from '../lib/server'

export const TOPIC = 'bench'

export interface Options {
  scenarios: string[]
  targets: TargetKind[]
  quick: boolean
  subscribers: number | null
  events: number | null
  /** s2/s4: publish the burst at this many events/s instead of back to back. */
  burstRate: number | null
  rate: number | null
  duration: number | null
  inFlight: number
  users: number | null
  workers: number
  serverCpu: string | null
  clientCpu: string | null
  redisUrl: string
  logLevel: string
  cpuProf: boolean
  settleMs: number
  srcIps: number
  keepLogs: boolean
  /** Wait up to this long for an idle machine before each run. */
  quietWaitS: number
  /** Extra environment for the gateway (--gateway-env KEY=VALUE). */
  gatewayEnv: Record<string, string>
  out: string | null
}

export interface StartOptions {
  label: string
  cpu: string | null
  env?: Record<string, string>
}

export interface Context {
  options: Options
  clock: Clock
  pool: ClientPool
  /** The JWT secret the gateway is started with. */
  secret: string
  adminToken: string
  publisherToken: string
  /** Streams may open at most this many at once (file limit of this process, less a reserve). */
  maxStreams: number
  /** Every scenario's result in this invocation, by id: S4 compares itself with S2's (embedded mode). */
  results: Map<string, ScenarioResult>
  startServer (kind: TargetKind, start: StartOptions): Promise<ServerProcess>
  /** Stops a server started with startServer; logs are removed unless --keep-logs. */
  stopServer (server: ServerProcess): Promise<void>
  /** Tokens for `count` streams: one user per stream unless --users says otherwise. */
  streamTokens (count: number): string[]
  log (message: string): void
  /** Pins this process's threads (client and publisher) to a CPU list, or unpins with null. */
  pinClient (cpuList: string | null): void
}

export type Better = 'higher' | 'lower' | null

export interface MetricDef {
  key: string
  label: string
  unit: string
  better: Better
  /** The target for the gateway, as text, when it has one. */
  target?: string
}

export interface TargetRun {
  values: Record<string, number | null>
  details: Record<string, unknown>
  notes: string[]
}

export interface ScenarioResult {
  id: string
  title: string
  params: Record<string, unknown>
  metrics: MetricDef[]
  runs: Partial<Record<TargetKind, TargetRun | { error: string }>>
  notes: string[]
}

/** A scenario as written: `params` derives its sizes from the options, `run` measures one target. */
export interface ScenarioDef<P extends Record<string, unknown>> {
  id: string
  title: string
  metrics: MetricDef[]
  params (ctx: Context): P
  run (ctx: Context, target: TargetKind, params: P): Promise<TargetRun>
  /** Runs after every target, to add cross-target or cross-scenario notes. */
  finish?: (ctx: Context, result: ScenarioResult) => void
  /** The targets this scenario can measure, when not all of them. */
  supports?: readonly TargetKind[]
}

/** A scenario as the runner sees it, its parameter type hidden. */
export interface Scenario {
  id: string
  title: string
  metrics: MetricDef[]
  params (ctx: Context): Record<string, unknown>
  run (ctx: Context, target: TargetKind): Promise<TargetRun>
  finish?: (ctx: Context, result: ScenarioResult) => void
  supports?: readonly TargetKind[]
}

export function defineScenario<P extends Record<string, unknown>> (def: ScenarioDef<P>): Scenario {
  return {
    id: def.id,
    title: def.title,
    metrics: def.metrics,
    params: (ctx) => def.params(ctx),
    // Parameters depend only on the options, so they are derived again rather than passed through untyped.
    run: async (ctx, target) => await def.run(ctx, target, def.params(ctx)),
    finish: def.finish,
    supports: def.supports
  }
}

export function plan (ctx: Context, servers: ServerProcess[], tokens: string[], topic = TOPIC): StreamPlan {
  // Every stream of a plan waits for the same ready marker.
  if (servers.some((server) => server.options.kind !== servers[0].options.kind)) throw new Error('a stream plan spans servers of different kinds')
  const localAddresses = ctx.options.srcIps > 1 ? Array.from({ length: ctx.options.srcIps }, (_, index) => `127.0.0.${index + 1}`) : []
  return {
    endpoints: servers.map((server) => server.endpoint),
    pathPrefix: `/v1/stream?topics=${topic}&token=`,
    readyMarker: servers[0].readyMarker,
    tokens,
    localAddresses,
    handshakeTimeoutMs: 15_000
  }
}

/** CPU used by this process (all threads: client workers and publisher) over a span. */
export class CpuMeter {
  private readonly cpu = process.cpuUsage()
  private readonly wall = process.hrtime.bigint()
  private readonly cores = cpuTimes()

  /**
   * { seconds of CPU, seconds of wall time, CPU as % of one core, and each
   * core's busy and interrupt % from /proc/stat over the same span }.
   */
  read (): CpuReading {
    const used = process.cpuUsage(this.cpu)
    const cpuS = (used.user + used.system) / 1e6
    const wallS = Number(process.hrtime.bigint() - this.wall) / 1e9
    return { cpuS, wallS, pct: wallS > 0 ? (cpuS / wallS) * 100 : 0, cores: cpuBusy(this.cores, cpuTimes()) }
  }
}

export interface CpuReading {
  cpuS: number
  wallS: number
  pct: number
  cores: Record<string, { busyPct: number, irqPct: number }>
}

/** How busy the client's workers were: how much client lag the latency figures may hold. */
export const clientLoopMetrics: MetricDef[] = [
  { key: 'client_loop_busy_pct', label: 'client worker loop busy (max)', unit: '%', better: null },
  { key: 'client_lag_p99_ms', label: 'client event-loop delay p99', unit: 'ms', better: null }
]

export const coreMetrics: MetricDef[] = [
  { key: 'server_core_busy_pct', label: 'server core busy (/proc/stat)', unit: '%', better: null },
  { key: 'server_core_irq_pct', label: '  of which softirq+irq', unit: '%', better: null },
  { key: 'server_core_other_pct', label: '  of which other processes', unit: '%', better: null },
  { key: 'client_core_busy_pct', label: 'client core busy (/proc/stat)', unit: '%', better: null },
  { key: 'client_core_other_pct', label: '  of which other processes', unit: '%', better: null }
]

/**
 * How busy the server's and the client's cores were. Loopback TCP work done in
 * softirq is charged to no process, so "busy" is the honest "was the core full"
 * figure; busy less the process's own CPU and the softirq share is other
 * processes intruding (this machine may be shared).
 */
function coreValues (ctx: Context, reading: CpuReading, serverProcessPct: number | null): Record<string, number | null> {
  const server = ctx.options.serverCpu === null ? undefined : reading.cores[ctx.options.serverCpu]
  const client = ctx.options.clientCpu === null ? undefined : reading.cores[ctx.options.clientCpu]
  const other = (core: { busyPct: number, irqPct: number } | undefined, own: number | null): number | null =>
    core === undefined || own === null ? null : Math.max(0, core.busyPct - core.irqPct - own)
  return {
    server_core_busy_pct: server?.busyPct ?? null,
    server_core_irq_pct: server?.irqPct ?? null,
    server_core_other_pct: other(server, serverProcessPct),
    client_core_busy_pct: client?.busyPct ?? null,
    client_core_other_pct: other(client, reading.pct)
  }
}

/** Adds the core figures to `values`, and a note to `notes` when the run was disturbed. */
export function addCoreValues (ctx: Context, reading: CpuReading, values: Record<string, number | null>, serverProcessPct: number | null, notes: string[]): void {
  Object.assign(values, coreValues(ctx, reading, serverProcessPct))
  const disturbed = disturbance(values)
  if (disturbed !== null) notes.push(disturbed)
}

/** A note when other processes took a noticeable share of a measured core. */
function disturbance (values: Record<string, number | null>): string | null {
  const server = values.server_core_other_pct ?? 0
  const client = values.client_core_other_pct ?? 0
  if (server < 10 && client < 10) return null
  return `DISTURBED: other processes used ${server.toFixed(0)} % of the server core and ${client.toFixed(0)} % of the client core during the measurement`
}

/**
 * Waits (bounded) until the machine is nearly idle, so a run does not start
 * while something else is busy. Returns the busy % last seen and the wait.
 */
export async function awaitQuiet (maxWaitMs: number, thresholdPct = 15): Promise<{ busyPct: number, waitedMs: number }> {
  const start = Date.now()
  let busyPct = 100
  do {
    const before = cpuTimes()
    await sleep(1000)
    const cores = Object.values(cpuBusy(before, cpuTimes()))
    busyPct = cores.length === 0 ? 0 : cores.reduce((sum, core) => sum + core.busyPct, 0) / cores.length
    if (busyPct < thresholdPct) break
  } while (Date.now() - start < maxWaitMs)
  return { busyPct, waitedMs: Date.now() - start }
}

export function ms (us: number | null): number | null {
  return us === null ? null : us / 1000
}

export function pct (part: number, whole: number): number | null {
  return whole === 0 ? null : (part / whole) * 100
}

/** Server CPU % of one core between two snapshots. */
export function serverCpuPct (before: ServerSnapshot, after: ServerSnapshot, wallS: number): number | null {
  if (before.cpuS === null || after.cpuS === null || wallS <= 0) return null
  return ((after.cpuS - before.cpuS) / wallS) * 100
}

export function latencyValues (prefix: string, histogram: Histogram): Record<string, number | null> {
  return {
    [`${prefix}_p50_ms`]: ms(histogram.quantile(0.5)),
    [`${prefix}_p99_ms`]: ms(histogram.quantile(0.99)),
    [`${prefix}_max_ms`]: ms(histogram.count === 0 ? null : histogram.max)
  }
}

/**
 * Waits until `expected` events have arrived, or nothing has arrived for
 * `quietMs` once `publishing()` is false, or `deadline` passes.
 */
export async function awaitDeliveries (ctx: Context, expected: number, publishing: () => boolean, quietMs: number, deadline: number): Promise<'complete' | 'quiet' | 'deadline'> {
  let lastEvents = -1
  let lastChange = Date.now()
  while (Date.now() < deadline) {
    const progress = await ctx.pool.progress()
    if (progress.events >= expected) return 'complete'
    if (progress.events !== lastEvents) {
      lastEvents = progress.events
      lastChange = Date.now()
    } else if (!publishing() && Date.now() - lastChange >= quietMs) {
      return 'quiet'
    }
    await sleep(100)
  }
  return 'deadline'
}

/** Delivery figures of a measured phase, from the client's merged report. */
export function deliveryValues (report: ReportSummary, expectedPerStream: number, streams: number): Record<string, number | null> {
  const spanS = (report.lastRxUs - report.firstRxUs) / 1e6
  return {
    deliveries_per_s: spanS > 0 ? report.events / spanS : null,
    delivered: report.events,
    completeness_pct: pct(report.events, expectedPerStream * streams),
    complete_streams: report.exact,
    out_of_order: report.outOfOrder,
    gaps: report.gaps,
    closed_by_server: report.closedByServer,
    ...latencyValues('latency', report.latency),
    client_loop_busy_pct: Math.max(...report.elu) * 100,
    client_lag_p99_ms: report.lagP99Us / 1000
  }
}

export function fdNote (ctx: Context, requested: number): { count: number, note: string | null } {
  if (requested <= ctx.maxStreams) return { count: requested, note: null }
  return {
    count: ctx.maxStreams,
    note: `asked for ${requested} streams but this process may open only ${ctx.maxStreams} (ulimit -n, less a reserve): ran with ${ctx.maxStreams}`
  }
}

/** Polls the server (bounded) until it reports no stream open. */
export async function waitForZero (ctx: Context, server: ServerProcess, timeoutMs: number): Promise<ServerSnapshot> {
  const deadline = Date.now() + timeoutMs
  let snapshot = await server.snapshot(ctx.adminToken)
  while (snapshot.connections !== 0 && Date.now() < deadline) {
    await sleep(250)
    snapshot = await server.snapshot(ctx.adminToken)
  }
  return snapshot
}

export const writeFloorMetrics: { perWrite: MetricDef, pass: MetricDef, coreShare: MetricDef } = {
  perWrite: { key: 'floor_us_per_write', label: 'write floor: bare socket.write', unit: 'µs', better: null },
  pass: { key: 'floor_pass_ms', label: 'write floor: one write to each', unit: 'ms', better: null },
  coreShare: { key: 'floor_core_pct', label: 'write floor: 1 write/event/stream', unit: '% core', better: null }
}

export interface WriteFloor {
  /** Server CPU (user + kernel) per write, median of the passes. */
  usPerWrite: number
  /** Wall time of one write to every open stream, median of the passes. */
  passMs: number
}

function median (values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b)
  const middle = sorted.length >> 1
  return sorted.length % 2 === 1 ? sorted[middle] : (sorted[middle - 1] + sorted[middle]) / 2
}

/**
 * What one bare `socket.write` per open stream costs on this machine, measured
 * by the baseline server (`POST /bench/floor`) with its streams still open.
 * Null for the gateway, which does not answer it; a failure is a note, not a
 * lost scenario.
 */
export async function measureWriteFloor (ctx: Context, server: ServerProcess, notes: string[]): Promise<WriteFloor | null> {
  if (server.options.kind !== 'baseline') return null
  const passes = ctx.options.quick ? 3 : 7
  try {
    const answer = await httpRequest(`${server.url}/bench/floor?passes=${passes}`, { method: 'POST', timeoutMs: 60_000 })
    if (answer.status !== 200) throw new Error(`status ${answer.status}`)
    const body = JSON.parse(answer.body) as { writes: number, passes: Array<{ cpuUsPerWrite: number, wallMs: number }> }
    if (body.writes === 0 || body.passes.length === 0) throw new Error('no stream to write to')
    return {
      usPerWrite: median(body.passes.map((pass) => pass.cpuUsPerWrite)),
      passMs: median(body.passes.map((pass) => pass.wallMs))
    }
  } catch (error) {
    notes.push(`write floor not measured: ${error instanceof Error ? error.message : String(error)}`)
    return null
  }
}
