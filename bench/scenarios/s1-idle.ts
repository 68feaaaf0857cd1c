/**
 * S1 idle: open N streams, 32 handshakes in flight; memory per stream, time to
 * open. Then close them all and open N again, twice, in the same process: the
 * first round is a reconnect storm right after a deploy (the JIT still
 * compiling the open path). The second follows the process's first closes,
 * which deoptimise code the opens share with them (Node's sockets and streams
 * see their first errors and ends): it recompiles tens of functions, ≈ 10 %
 * of its time on the gateway. The third is normal operation.
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

type Round = { opened: Awaited<ReturnType<Context['pool']['open']>>, cpuPerOpenUs: number | null } | null

function roundDetails (rounds: Record<string, Round>): Record<string, unknown> {
  return Object.fromEntries(Object.entries(rounds).map(([name, round]) =>
    [name, round === null ? null : { ...round.opened, handshake: round.opened.handshake.toJSON(), cpuPerOpenUs: round.cpuPerOpenUs }]))
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
    { key: 'open_all_second_s', label: 'time to open all a second time, after the first closes', unit: 's', better: 'lower' },
    { key: 'open_all_warm_s', label: 'time to open all a third time, warm process', unit: 's', better: 'lower' },
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

      /** Opens all again once the previous round's streams are gone; null when they are not. */
      const reopen = async (round: string): Promise<Round> => {
        const closed = await waitForZero(ctx, server, 15_000)
        if (closed.connections !== 0 && closed.connections !== null) {
          notes.push(`${round} round not run: ${closed.connections} streams still open 15 s after the client closed them`)
          return null
        }
        await sleep(ctx.options.quick ? 300 : 1000)
        const beforeRound = await server.snapshot(ctx.adminToken)
        const reopened = await ctx.pool.open(plan(ctx, [server], ctx.streamTokens(count)), count, params.inFlight)
        const afterRound = await server.snapshot(ctx.adminToken)
        if (reopened.failed > 0) notes.push(`failed opens in the ${round} round: ${JSON.stringify(reopened.errors)}`)
        await ctx.pool.closeAll(true)
        return { opened: reopened, cpuPerOpenUs: cpuPerOpenUs(beforeRound, afterRound, reopened.established) }
      }
      const second = await reopen('second')
      const warm = second === null ? null : await reopen('third')
      values.open_all_second_s = second === null ? null : second.opened.elapsedMs / 1000
      values.open_all_warm_s = warm === null ? null : warm.opened.elapsedMs / 1000
      values.server_cpu_per_open_warm_us = warm === null ? null : warm.cpuPerOpenUs
      return {
        values,
        details: { before, after, beforeGc, afterGc, open: { ...opened, handshake: opened.handshake.toJSON() }, ...roundDetails({ second, warm }) },
        notes
      }
    } finally {
      await ctx.pool.closeAll(true)
      await ctx.stopServer(server)
    }
  }
})
