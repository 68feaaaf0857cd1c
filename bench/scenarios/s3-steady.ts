/** S3 steady latency: 1k subscribers, 100 events/s for 10 s. */
import { sleep } from '../lib/clock'
import { Publisher } from '../lib/publisher'
import type { TargetKind } from '../lib/server'
import {
  addCoreValues, awaitDeliveries, clientLoopMetrics, coreMetrics, CpuMeter, deliveryValues, fdNote, measureWriteFloor, ms, plan, serverCpuPct, TOPIC,
  writeFloorMetrics, defineScenario, type Context, type TargetRun
} from './common'

export const s3 = defineScenario({
  id: 's3',
  title: 'S3 steady latency',
  metrics: [
    { key: 'established', label: 'subscribers', unit: '', better: null },
    { key: 'publish_rate', label: 'publish rate', unit: 'ev/s', better: null },
    { key: 'completeness_pct', label: 'completeness', unit: '%', better: 'higher', target: '100 %' },
    { key: 'out_of_order', label: 'out of order', unit: '', better: 'lower', target: '0' },
    { key: 'gaps', label: 'gaps (missing seq)', unit: '', better: 'lower', target: '0' },
    { key: 'latency_p50_ms', label: 'publish→receive p50', unit: 'ms', better: 'lower', target: '≤ 5 ms' },
    { key: 'latency_p99_ms', label: 'publish→receive p99', unit: 'ms', better: 'lower', target: '≤ 20 ms' },
    { key: 'latency_max_ms', label: 'publish→receive max', unit: 'ms', better: 'lower' },
    { key: 'publish_rtt_p50_ms', label: 'publish answer p50', unit: 'ms', better: 'lower' },
    { key: 'publish_rtt_p99_ms', label: 'publish answer p99', unit: 'ms', better: 'lower' },
    { key: 'server_cpu_pct', label: 'server CPU', unit: '% core', better: 'lower' },
    { key: 'client_cpu_pct', label: 'client CPU (all threads)', unit: '% core', better: null },
    ...clientLoopMetrics,
    ...coreMetrics,
    writeFloorMetrics.perWrite,
    writeFloorMetrics.coreShare
  ],
  params (ctx) {
    const { options } = ctx
    return {
      subscribers: options.subscribers ?? (options.quick ? 200 : 1000),
      rate: options.rate ?? 100,
      durationS: options.duration ?? (options.quick ? 3 : 10)
    }
  },
  async run (ctx: Context, kind: TargetKind, params: { subscribers: number, rate: number, durationS: number }): Promise<TargetRun> {
    const notes: string[] = []
    const { count, note } = fdNote(ctx, params.subscribers)
    if (note !== null) notes.push(note)
    const rate = params.rate
    const durationMs = params.durationS * 1000
    const server = await ctx.startServer(kind, { label: `s3-${kind}`, cpu: ctx.options.serverCpu })
    try {
      const opened = await ctx.pool.open(plan(ctx, [server], ctx.streamTokens(count)), count, ctx.options.inFlight)
      if (opened.failed > 0) notes.push(`failed opens: ${JSON.stringify(opened.errors)}`)
      await sleep(ctx.options.quick ? 300 : 1000)
      await ctx.pool.reset()
      const publisher = new Publisher([server.endpoint], ctx.publisherToken, TOPIC, ctx.clock)
      const before = await server.snapshot(ctx.adminToken)
      const meter = new CpuMeter()
      const published = await publisher.paced(rate, durationMs)
      publisher.close()
      const events = published.accepted
      const outcome = await awaitDeliveries(ctx, opened.established * events, () => false, 3000, Date.now() + 30_000)
      const cpu = meter.read()
      const after = await server.snapshot(ctx.adminToken)
      const report = await ctx.pool.report(events)
      if (outcome !== 'complete') notes.push(`stopped waiting (${outcome}) at ${report.events} of ${opened.established * events} deliveries`)
      const values: Record<string, number | null> = {
        established: opened.established,
        ...deliveryValues(report, events, opened.established),
        publish_rate: published.accepted / (published.elapsedMs / 1000),
        publish_rtt_p50_ms: ms(published.rtt.quantile(0.5)),
        publish_rtt_p99_ms: ms(published.rtt.quantile(0.99)),
        server_cpu_pct: serverCpuPct(before, after, cpu.wallS),
        client_cpu_pct: cpu.pct
      }
      const accepted = values.publish_rate ?? 0
      if (accepted < 0.95 * rate) {
        // Latency counts from when each event was sent: events a server held back were never late, so say so.
        notes.push(`the publisher was held back: ${accepted.toFixed(1)} of ${rate} events/s went out (each waits for the previous answer), so latency leaves out the backlog`)
      }
      addCoreValues(ctx, cpu, values, values.server_cpu_pct, notes)
      const floor = await measureWriteFloor(ctx, server, notes)
      if (floor !== null) {
        values.floor_us_per_write = floor.usPerWrite
        // The share of a core that one write per event per subscriber takes at this rate, before any other work.
        values.floor_core_pct = (rate * opened.established * floor.usPerWrite) / 1e4
      }
      return {
        values,
        details: { outcome, publish: { ...published, rtt: published.rtt.toJSON() }, report: { ...report, latency: report.latency.toJSON() }, client_cpu: cpu },
        notes
      }
    } finally {
      await ctx.pool.closeAll(true)
      await ctx.stopServer(server)
    }
  }
})
