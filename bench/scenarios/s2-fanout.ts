/** S2 fan-out burst: N subscribers of one topic, E events published back to back. */
import { sleep } from '../lib/clock'
import { cpuSeconds } from '../lib/proc'
import { Publisher, type PublishSummary } from '../lib/publisher'
import type { ServerProcess, ServerSnapshot, TargetKind } from '../lib/server'
import {
  addCoreValues, awaitDeliveries, clientLoopMetrics, coreMetrics, CpuMeter, deliveryValues, fdNote, measureWriteFloor, ms, plan, serverCpuPct, TOPIC,
  writeFloorMetrics, defineScenario, type Context, type MetricDef, type TargetRun
} from './common'

export const fanOutMetrics: MetricDef[] = [
  { key: 'established', label: 'subscribers', unit: '', better: null },
  { key: 'deliveries_per_s', label: 'deliveries/s', unit: '/s', better: 'higher', target: '≥ 200 k/s' },
  { key: 'completeness_pct', label: 'completeness', unit: '%', better: 'higher', target: '100 %' },
  { key: 'out_of_order', label: 'out of order', unit: '', better: 'lower', target: '0' },
  { key: 'gaps', label: 'gaps (missing seq)', unit: '', better: 'lower', target: '0' },
  { key: 'latency_p50_ms', label: 'publish→receive p50', unit: 'ms', better: 'lower' },
  { key: 'latency_p99_ms', label: 'publish→receive p99', unit: 'ms', better: 'lower', target: '≤ 150 ms' },
  { key: 'publish_rate', label: 'publish rate', unit: 'ev/s', better: 'higher' },
  { key: 'publish_rtt_p50_ms', label: 'publish answer p50', unit: 'ms', better: 'lower' },
  { key: 'publish_rtt_p99_ms', label: 'publish answer p99', unit: 'ms', better: 'lower' },
  { key: 'server_cpu_pct', label: 'server CPU', unit: '% core', better: null },
  { key: 'server_cpu_us_per_delivery', label: 'server CPU per delivery', unit: 'µs', better: 'lower' },
  { key: 'client_cpu_pct', label: 'client CPU (all threads)', unit: '% core', better: null },
  ...clientLoopMetrics,
  ...coreMetrics,
  writeFloorMetrics.perWrite,
  writeFloorMetrics.pass
]

export interface BurstResult {
  values: Record<string, number | null>
  details: Record<string, unknown>
  notes: string[]
}

/**
 * Opens `subscribers` streams spread over `servers`, publishes `events` back to
 * back (or at --burst-rate; round robin over the servers), waits for the
 * deliveries and measures.
 */
export async function fanOutBurst (ctx: Context, servers: ServerProcess[], subscribers: number, events: number, redisPid: number | null = null): Promise<BurstResult> {
  const notes: string[] = []
  const { count, note } = fdNote(ctx, subscribers)
  if (note !== null) notes.push(note)
  const opened = await ctx.pool.open(plan(ctx, servers, ctx.streamTokens(count)), count, ctx.options.inFlight)
  if (opened.failed > 0) notes.push(`failed opens: ${JSON.stringify(opened.errors)}`)
  await sleep(ctx.options.quick ? 300 : 1000)
  await ctx.pool.reset()
  const publisher = new Publisher(servers.map((server) => server.endpoint), ctx.publisherToken, TOPIC, ctx.clock)
  const before: ServerSnapshot[] = await Promise.all(servers.map((server) => server.snapshot(ctx.adminToken)))
  const redisBefore = redisPid === null ? null : cpuSeconds(redisPid)
  const meter = new CpuMeter()
  const expected = opened.established * events
  let publishing = true
  const rate = ctx.options.burstRate
  // Bounded: generous for a slow server, never endless.
  const deadline = Date.now() + 60_000 + (expected / 5000) * 1000 + (rate === null ? 0 : (events / rate) * 1000)
  const sending = rate === null ? publisher.burst(events, deadline) : publisher.pacedBurst(events, rate, deadline)
  const publishDone = sending.then((summary) => {
    publishing = false
    return summary
  })
  const outcome = await awaitDeliveries(ctx, expected, () => publishing, 5000, deadline)
  const cpu = meter.read()
  const redisAfter = redisPid === null ? null : cpuSeconds(redisPid)
  const redisCpuS = redisBefore === null || redisAfter === null ? null : redisAfter - redisBefore
  const after: ServerSnapshot[] = await Promise.all(servers.map((server) => server.snapshot(ctx.adminToken)))
  const published: PublishSummary = await publishDone
  publisher.close()
  const report = await ctx.pool.report(events)
  if (outcome !== 'complete') notes.push(`stopped waiting (${outcome}) at ${report.events} of ${expected} deliveries`)
  if (published.accepted !== events) notes.push(`publisher: ${published.accepted}/${events} accepted ${JSON.stringify(published.statuses)} ${JSON.stringify(published.errors)}`)
  const serverCpuS = before.reduce((sum, snapshot, index) => sum + ((after[index].cpuS ?? 0) - (snapshot.cpuS ?? 0)), 0)
  const values: Record<string, number | null> = {
    established: opened.established,
    ...deliveryValues(report, events, opened.established),
    publish_rate: published.elapsedMs > 0 ? published.accepted / (published.elapsedMs / 1000) : null,
    publish_rtt_p50_ms: ms(published.rtt.quantile(0.5)),
    publish_rtt_p99_ms: ms(published.rtt.quantile(0.99)),
    server_cpu_pct: servers.length === 1 ? serverCpuPct(before[0], after[0], cpu.wallS) : (serverCpuS / cpu.wallS) * 100,
    server_cpu_us_per_delivery: report.events > 0 ? (serverCpuS * 1e6) / report.events : null,
    client_cpu_pct: cpu.pct
  }
  if (servers.length === 1) {
    // One server on its core, the client on the other: per-core figures mean something.
    addCoreValues(ctx, cpu, values, values.server_cpu_pct, notes)
    // Measured after the burst, with the same streams open, so it disturbs nothing above.
    const floor = await measureWriteFloor(ctx, servers[0], notes)
    if (floor !== null) {
      values.floor_us_per_write = floor.usPerWrite
      values.floor_pass_ms = floor.passMs
    }
  }
  await ctx.pool.closeAll(true)
  return {
    values,
    details: {
      outcome,
      open: { ...opened, handshake: opened.handshake.toJSON() },
      publish: { ...published, rtt: published.rtt.toJSON() },
      report: { ...report, latency: report.latency.toJSON() },
      server_cpu_s: serverCpuS,
      redis_cpu_s: redisCpuS,
      client_cpu: cpu,
      before,
      after
    },
    notes
  }
}

export const s2 = defineScenario({
  id: 's2',
  title: 'S2 fan-out burst',
  metrics: fanOutMetrics,
  params (ctx: Context) {
    const { options } = ctx
    return { subscribers: options.subscribers ?? (options.quick ? 500 : 10_000), events: options.events ?? (options.quick ? 50 : 200), burstRate: options.burstRate }
  },
  async run (ctx: Context, kind: TargetKind, params: { subscribers: number, events: number }): Promise<TargetRun> {
    const server = await ctx.startServer(kind, { label: `s2-${kind}`, cpu: ctx.options.serverCpu })
    try {
      return await fanOutBurst(ctx, [server], params.subscribers, params.events)
    } finally {
      await ctx.pool.closeAll(true)
      await ctx.stopServer(server)
    }
  }
})
