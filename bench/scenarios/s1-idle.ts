/**
 * S1 idle: open N streams, 32 handshakes in flight; memory per stream, time to
 * open. Then close them all and open N again in the same process: the first
 * round is a reconnect storm right after a deploy (the JIT still compiling the
 * open path), the second one during normal operation.
 */
import { readFileSync } from 'node:fs'
import { sleep } from '../lib/clock'
import type { ServerSnapshot, TargetKind } from '../lib/server'
import { addCoreValues, coreMetrics, CpuMeter, fdNote, ms, plan, serverCpuPct, defineScenario, waitForZero, type Context, type TargetRun } from './common'

/** Linux's connect() takes even ports of ip_local_port_range first; how many there are. */
function evenEphemeralPorts (): number | null {
  try {
    const [low, high] = readFileSync('/proc/sys/net/ipv4/ip_local_port_range', 'utf8').trim().split(/\s+/).map(Number)
    return Math.floor((high - low + 1) / 2)
  } catch {
    return null
  }
}

/** Server CPU between two snapshots per stream opened, in µs (the snapshots' own requests included). */
function cpuPerOpenUs (before: ServerSnapshot, after: ServerSnapshot, opened: number): number | null {
  if (before.cpuS === null || after.cpuS === null || opened === 0) return null
  return ((after.cpuS - before.cpuS) * 1e6) / opened
}

export const s1 = defineScenario({
  id: 's1',
  title: 'S1 idle streams',
  metrics: [
    { key: 'established', label: 'streams open', unit: '', better: null },
    { key: 'failed', label: 'failed opens', unit: '', better: 'lower' },
    { key: 'open_all_s', label: 'time to open all', unit: 's', better: 'lower', target: '≤ 1 s at 10k' },
    { key: 'handshake_p50_ms', label: 'handshake p50', unit: 'ms', better: 'lower' },
    { key: 'handshake_p99_ms', label: 'handshake p99', unit: 'ms', better: 'lower' },
    { key: 'rss_per_stream_kb', label: 'RSS per stream', unit: 'KB', better: 'lower', target: '≤ 8 KB' },
    { key: 'rss_before_mb', label: 'RSS before', unit: 'MB', better: 'lower' },
    { key: 'rss_after_mb', label: 'RSS with streams', unit: 'MB', better: 'lower' },
    { key: 'rss_per_stream_gc_kb', label: 'RSS per stream, after full GC', unit: 'KB', better: 'lower' },
    { key: 'heap_per_stream_kb', label: 'JS heap per stream, after full GC', unit: 'KB', better: 'lower' },
    { key: 'server_cpu_open_pct', label: 'server CPU while opening', unit: '% core', better: null },
    { key: 'server_cpu_per_open_us', label: 'server CPU per stream opened', unit: 'µs', better: 'lower' },
    { key: 'open_all_warm_s', label: 'time to open all again, warm process', unit: 's', better: 'lower' },
    { key: 'server_cpu_per_open_warm_us', label: 'server CPU per stream opened, warm', unit: 'µs', better: 'lower' },
    { key: 'client_cpu_open_pct', label: 'client CPU while opening', unit: '% core', better: null },
    ...coreMetrics
  ],
  params (ctx) {
    const { options } = ctx
    return { subscribers: options.subscribers ?? (options.quick ? 500 : 10_000), inFlight: options.inFlight }
  },
  async run (ctx: Context, kind: TargetKind, params: { subscribers: number, inFlight: number }): Promise<TargetRun> {
    const notes: string[] = []
    const { count, note } = fdNote(ctx, params.subscribers)
    if (note !== null) notes.push(note)
    const server = await ctx.startServer(kind, { label: `s1-${kind}`, cpu: ctx.options.serverCpu })
    try {
      await sleep(ctx.options.quick ? 300 : 1000)
      const before = await server.snapshot(ctx.adminToken)
      const collects = await server.collectGarbage()
      const beforeGc = await server.snapshot(ctx.adminToken)
      const meter = new CpuMeter()
      const opened = await ctx.pool.open(plan(ctx, [server], ctx.streamTokens(count)), count, params.inFlight)
      const cpu = meter.read()
      const duringOpen = await server.snapshot(ctx.adminToken)
      await sleep(ctx.options.settleMs)
      const after = await server.snapshot(ctx.adminToken)
      await server.collectGarbage()
      const afterGc = await server.snapshot(ctx.adminToken)
      if (opened.failed > 0) notes.push(`failed opens: ${JSON.stringify(opened.errors)}`)
      const evenPorts = evenEphemeralPorts()
      if (evenPorts !== null && opened.established > evenPorts * 0.9) {
        notes.push(`${opened.established} streams from one address exceed the ~${evenPorts} even ephemeral ports connect() prefers: ` +
          'past them the client kernel searches for a port on every connect, so time to open measures the client, not the server')
      }
      if (after.connections !== null && after.connections !== opened.established) {
        notes.push(`server reports ${after.connections} streams, client holds ${opened.established}`)
      }
      const perStream = (a: number | null, b: number | null, unit: number): number | null =>
        a === null || b === null || opened.established === 0 ? null : ((b - a) / unit) / opened.established
      const values: Record<string, number | null> = {
        established: opened.established,
        failed: opened.failed,
        open_all_s: opened.elapsedMs / 1000,
        handshake_p50_ms: ms(opened.handshake.quantile(0.5)),
        handshake_p99_ms: ms(opened.handshake.quantile(0.99)),
        rss_per_stream_kb: perStream(before.rssKb, after.rssKb, 1),
        rss_per_stream_gc_kb: collects ? perStream(beforeGc.rssKb, afterGc.rssKb, 1) : null,
        rss_before_mb: before.rssKb === null ? null : before.rssKb / 1024,
        rss_after_mb: after.rssKb === null ? null : after.rssKb / 1024,
        heap_per_stream_kb: perStream(beforeGc.heapUsedBytes, afterGc.heapUsedBytes, 1024),
        server_cpu_open_pct: serverCpuPct(before, duringOpen, opened.elapsedMs / 1000),
        server_cpu_per_open_us: cpuPerOpenUs(before, duringOpen, opened.established),
        client_cpu_open_pct: cpu.pct
      }
      addCoreValues(ctx, cpu, values, values.server_cpu_open_pct, notes)
      await ctx.pool.closeAll(true)

      const closed = await waitForZero(ctx, server, 15_000)
      let warm: Awaited<ReturnType<typeof ctx.pool.open>> | null = null
      if (closed.connections === 0 || closed.connections === null) {
        await sleep(ctx.options.quick ? 300 : 1000)
        const beforeWarm = await server.snapshot(ctx.adminToken)
        warm = await ctx.pool.open(plan(ctx, [server], ctx.streamTokens(count)), count, params.inFlight)
        const afterWarm = await server.snapshot(ctx.adminToken)
        values.open_all_warm_s = warm.elapsedMs / 1000
        values.server_cpu_per_open_warm_us = cpuPerOpenUs(beforeWarm, afterWarm, warm.established)
        if (warm.failed > 0) notes.push(`failed opens in the warm round: ${JSON.stringify(warm.errors)}`)
      } else {
        notes.push(`warm round not run: ${closed.connections} streams still open 15 s after the client closed them`)
      }
      return {
        values,
        details: { before, after, beforeGc, afterGc, open: { ...opened, handshake: opened.handshake.toJSON() }, warm: warm === null ? null : { ...warm, handshake: warm.handshake.toJSON() } },
        notes
      }
    } finally {
      await ctx.pool.closeAll(true)
      await ctx.stopServer(server)
    }
  }
})
