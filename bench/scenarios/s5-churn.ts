/**
 * S5 churn (and the soak): N streams kept open while each lives a
 * random few seconds and is replaced, events flowing all along; RSS, descriptors
 * and handles sampled over time; afterwards every stream is closed and the
 * server must hold none (registry back to zero) and give its memory back.
 */
import { sleep } from '../lib/clock'
import { Publisher } from '../lib/publisher'
import type { ServerSnapshot, TargetKind } from '../lib/server'
import { addCoreValues, coreMetrics, CpuMeter, fdNote, ms, plan, serverCpuPct, TOPIC, defineScenario, waitForZero, type Context, type TargetRun } from './common'

interface ChurnParams extends Record<string, unknown> {
  streams: number
  durationS: number
  rate: number
  lifeMinS: number
  lifeMaxS: number
  rstEvery: number
  sampleS: number
}

interface Sample {
  tS: number
  rssMb: number | null
  fds: number | null
  connections: number | null
  handles: number | null
  heapMb: number | null
}

function sampleOf (tS: number, snapshot: ServerSnapshot): Sample {
  return {
    tS: Math.round(tS * 10) / 10,
    rssMb: snapshot.rssKb === null ? null : Math.round(snapshot.rssKb / 102.4) / 10,
    fds: snapshot.fds,
    connections: snapshot.connections,
    handles: snapshot.handles,
    heapMb: snapshot.heapUsedBytes === null ? null : Math.round(snapshot.heapUsedBytes / 104857.6) / 10
  }
}

/** Least-squares slope of RSS (MB per minute) over the samples given. */
function slopeMbPerMin (samples: Sample[]): number | null {
  const points = samples.filter((sample) => sample.rssMb !== null)
  if (points.length < 3) return null
  const n = points.length
  const meanT = points.reduce((sum, point) => sum + point.tS, 0) / n
  const meanR = points.reduce((sum, point) => sum + (point.rssMb ?? 0), 0) / n
  let num = 0
  let den = 0
  for (const point of points) {
    num += (point.tS - meanT) * ((point.rssMb ?? 0) - meanR)
    den += (point.tS - meanT) ** 2
  }
  return den === 0 ? null : (num / den) * 60
}

function average (values: Array<number | null>): number | null {
  const known = values.filter((value): value is number => value !== null)
  return known.length === 0 ? null : known.reduce((sum, value) => sum + value, 0) / known.length
}

export const s5 = defineScenario({
  id: 's5',
  title: 'S5 churn / soak',
  // S5 checks a Node server's descriptors, handles and heap come back; nginx reports none of those.
  supports: ['baseline', 'gateway'],
  metrics: [
    { key: 'streams', label: 'streams kept open', unit: '', better: null },
    { key: 'opened', label: 'streams opened in total', unit: '', better: null },
    { key: 'open_rate', label: 'opens (and closes) per s', unit: '/s', better: null },
    { key: 'failed', label: 'failed opens', unit: '', better: 'lower', target: '0' },
    { key: 'closed_by_server', label: 'closed by server', unit: '', better: 'lower', target: '0' },
    { key: 'delivered', label: 'events delivered', unit: '', better: null },
    { key: 'out_of_order', label: 'out of order', unit: '', better: 'lower', target: '0' },
    { key: 'gaps', label: 'gaps (missing seq)', unit: '', better: 'lower', target: '0' },
    { key: 'latency_p50_ms', label: 'publish→receive p50', unit: 'ms', better: 'lower' },
    { key: 'latency_p99_ms', label: 'publish→receive p99', unit: 'ms', better: 'lower' },
    { key: 'live_avg', label: 'streams open (average of samples)', unit: '', better: null },
    { key: 'rss_start_mb', label: 'RSS before', unit: 'MB', better: 'lower' },
    { key: 'rss_peak_mb', label: 'RSS peak', unit: 'MB', better: 'lower' },
    { key: 'rss_slope_mb_per_min', label: 'RSS slope, 2nd half', unit: 'MB/min', better: 'lower', target: '≈ 0' },
    { key: 'rss_after_close_mb', label: 'RSS after all closed + full GC', unit: 'MB', better: 'lower' },
    { key: 'heap_start_mb', label: 'JS heap before (after full GC)', unit: 'MB', better: 'lower' },
    { key: 'heap_after_close_mb', label: 'JS heap after all closed + full GC', unit: 'MB', better: 'lower' },
    { key: 'fds_start', label: 'fds before', unit: '', better: null },
    { key: 'fds_after_close', label: 'fds after all closed', unit: '', better: 'lower' },
    { key: 'handles_start', label: 'handles before', unit: '', better: null },
    { key: 'handles_after_close', label: 'handles after all closed', unit: '', better: 'lower' },
    { key: 'connections_after_close', label: 'registry after all closed', unit: '', better: 'lower', target: '0' },
    { key: 'server_cpu_pct', label: 'server CPU', unit: '% core', better: 'lower' },
    { key: 'client_cpu_pct', label: 'client CPU (all threads)', unit: '% core', better: null },
    ...coreMetrics
  ],
  params (ctx) {
    const { options } = ctx
    const quick = options.quick
    return {
      streams: options.subscribers ?? (quick ? 300 : 5000),
      durationS: options.duration ?? (quick ? 6 : 120),
      rate: options.rate ?? (quick ? 10 : 5),
      lifeMinS: quick ? 1 : 5,
      lifeMaxS: quick ? 4 : 30,
      rstEvery: 5,
      sampleS: quick ? 1 : 5
    }
  },
  async run (ctx: Context, kind: TargetKind, params: ChurnParams): Promise<TargetRun> {
    const notes: string[] = []
    const { count, note } = fdNote(ctx, params.streams)
    if (note !== null) notes.push(note)
    const durationMs = params.durationS * 1000
    const server = await ctx.startServer(kind, { label: `s5-${kind}`, cpu: ctx.options.serverCpu })
    try {
      await sleep(ctx.options.quick ? 300 : 1000)
      await server.collectGarbage()
      const start = await server.snapshot(ctx.adminToken)
      const t0 = Date.now()
      const samples: Sample[] = [sampleOf(0, start)]
      let running = true
      const sampler = (async () => {
        while (running) {
          await sleep(params.sampleS * 1000)
          if (!running) break
          samples.push(sampleOf((Date.now() - t0) / 1000, await server.snapshot(ctx.adminToken)))
        }
      })()
      const meter = new CpuMeter()
      const publisher = new Publisher([server.endpoint], ctx.publisherToken, TOPIC, ctx.clock)
      const [churned, published] = await Promise.all([
        ctx.pool.churn(plan(ctx, [server], ctx.streamTokens(count)), {
          target: count,
          // Replacements must keep up with the closes whatever the handshake latency.
          inFlight: Math.max(ctx.options.inFlight, 256),
          durationMs,
          lifeMinMs: params.lifeMinS * 1000,
          lifeMaxMs: params.lifeMaxS * 1000,
          rstEvery: params.rstEvery
        }),
        publisher.paced(params.rate, durationMs)
      ])
      publisher.close()
      const cpu = meter.read()
      const end = await server.snapshot(ctx.adminToken)
      running = false
      await sampler
      samples.push(sampleOf((Date.now() - t0) / 1000, end))
      // Everything still open closes with FIN, as browsers leaving do.
      await ctx.pool.closeAll(false)
      await waitForZero(ctx, server, 15_000)
      // Past the presence grace and timers; then the figures that must be back to where they started.
      await sleep(Math.max(ctx.options.quick ? 2500 : 3000, ctx.options.settleMs))
      const closedNoGc = await server.snapshot(ctx.adminToken)
      await server.collectGarbage(1000)
      const closed = await server.snapshot(ctx.adminToken)
      samples.push(sampleOf((Date.now() - t0) / 1000, closed))
      if (churned.failed > 0) notes.push(`failed opens: ${JSON.stringify(churned.errors)}`)
      if (closed.connections !== 0) notes.push(`server still reports ${String(closed.connections)} streams after the client closed all`)
      if (closed.statsConnections !== null && closed.statsConnections !== 0) notes.push(`GET /v1/stats still counts ${closed.statsConnections} connections after all closed`)
      if (published.accepted !== published.sent) notes.push(`publisher: ${published.accepted}/${published.sent} accepted ${JSON.stringify(published.statuses)}`)
      const during = samples.filter((sample) => sample.tS <= durationMs / 1000)
      const rss = samples.map((sample) => sample.rssMb).filter((value): value is number => value !== null)
      const values: Record<string, number | null> = {
        streams: count,
        opened: churned.opened,
        open_rate: churned.opened / (durationMs / 1000),
        failed: churned.failed,
        closed_by_server: churned.closedByServer,
        delivered: churned.events,
        out_of_order: churned.outOfOrder,
        gaps: churned.gaps,
        latency_p50_ms: ms(churned.latency.quantile(0.5)),
        latency_p99_ms: ms(churned.latency.quantile(0.99)),
        live_avg: average(during.slice(1).map((sample) => sample.connections)),
        rss_start_mb: samples[0].rssMb,
        heap_start_mb: start.heapUsedBytes === null ? null : start.heapUsedBytes / 1048576,
        rss_peak_mb: rss.length === 0 ? null : Math.max(...rss),
        rss_slope_mb_per_min: slopeMbPerMin(during.slice(Math.floor(during.length / 2))),
        rss_after_close_mb: closed.rssKb === null ? null : closed.rssKb / 1024,
        heap_after_close_mb: closed.heapUsedBytes === null ? null : closed.heapUsedBytes / 1048576,
        fds_start: start.fds,
        fds_after_close: closed.fds,
        handles_start: start.handles,
        handles_after_close: closed.handles,
        connections_after_close: closed.connections,
        server_cpu_pct: serverCpuPct(start, end, cpu.wallS),
        client_cpu_pct: cpu.pct
      }
      addCoreValues(ctx, cpu, values, values.server_cpu_pct, notes)
      return {
        values,
        details: {
          samples,
          churn: { ...churned, latency: churned.latency.toJSON() },
          publish: { ...published, rtt: published.rtt.toJSON() },
          start,
          end,
          closedNoGc,
          closed
        },
        notes
      }
    } finally {
      await ctx.pool.closeAll(true)
      await ctx.stopServer(server)
    }
  }
})
