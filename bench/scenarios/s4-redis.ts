/** S4 Redis mode: 2 instances, subscribers split across them, a burst published to a topic. */
import { randomBytes } from 'node:crypto'
import Redis from 'ioredis'
import { cpuSeconds } from '../lib/proc'
import type { ServerProcess, TargetKind } from '../lib/server'
import { fanOutBurst, fanOutMetrics } from './s2-fanout'
import { defineScenario, type Context, type CpuReading, type MetricDef, type ScenarioResult, type TargetRun } from './common'

/** Deletes every key under `prefix` (this run's keys only). */
export async function dropPrefix (url: string, prefix: string): Promise<number> {
  const redis = new Redis(url, { lazyConnect: true, maxRetriesPerRequest: 1, retryStrategy: () => null })
  redis.on('error', () => {})
  let dropped = 0
  try {
    await redis.connect()
    let cursor = '0'
    let rounds = 0
    do {
      const [next, keys] = await redis.scan(cursor, 'MATCH', `${prefix}*`, 'COUNT', 1000)
      cursor = next
      if (keys.length > 0) dropped += await redis.unlink(...keys)
    } while (cursor !== '0' && ++rounds < 100_000)
  } finally {
    redis.disconnect()
  }
  return dropped
}

/** The pid of the redis-server behind `url` when it runs on this machine (for its CPU time), else null. */
export async function redisPid (url: string): Promise<number | null> {
  const redis = new Redis(url, { lazyConnect: true, maxRetriesPerRequest: 0, retryStrategy: () => null, enableOfflineQueue: false, connectTimeout: 2000 })
  redis.on('error', () => {})
  try {
    await redis.connect()
    const info = await redis.info('server')
    const pid = Number(/^process_id:(\d+)/m.exec(info)?.[1])
    return Number.isInteger(pid) && cpuSeconds(pid) !== null ? pid : null
  } catch {
    return null
  } finally {
    redis.disconnect()
  }
}

export async function redisAnswers (url: string): Promise<boolean> {
  const redis = new Redis(url, { lazyConnect: true, maxRetriesPerRequest: 0, retryStrategy: () => null, enableOfflineQueue: false, connectTimeout: 2000 })
  redis.on('error', () => {})
  try {
    await redis.connect()
    return await redis.ping() === 'PONG'
  } catch {
    return false
  } finally {
    redis.disconnect()
  }
}

export const s4 = defineScenario({
  id: 's4',
  title: 'S4 Redis mode, 2 instances',
  // Nchan's own Redis mode is not set up here: S4 compares the gateway's Redis mode with the baseline's.
  supports: ['baseline', 'gateway'],
  metrics: ([
    ...fanOutMetrics.map((metric) => metric.key === 'deliveries_per_s' || metric.key === 'latency_p99_ms' ? { ...metric, target: undefined } : metric),
    { key: 'deliveries_per_server_cpu_s', label: 'deliveries per server CPU-second', unit: '/cpu-s', better: 'higher' },
    { key: 'cpu0_busy_pct', label: 'CPU 0 busy (/proc/stat)', unit: '%', better: null },
    { key: 'cpu1_busy_pct', label: 'CPU 1 busy (/proc/stat)', unit: '%', better: null },
    { key: 'redis_cpu_pct', label: 'redis-server CPU', unit: '% core', better: null },
    { key: 'other_processes_pct', label: 'other processes (both cores)', unit: '% core', better: null }
  ] as MetricDef[]).filter((metric) => !metric.key.startsWith('server_core') && !metric.key.startsWith('client_core')),
  params (ctx) {
    const { options } = ctx
    return {
      instances: 2,
      subscribers: options.subscribers ?? (options.quick ? 500 : 10_000),
      events: options.events ?? (options.quick ? 50 : 200),
      burstRate: options.burstRate,
      redisUrl: options.redisUrl
    }
  },
  async run (ctx: Context, kind: TargetKind, params: { instances: number, subscribers: number, events: number, burstRate: number | null, redisUrl: string }): Promise<TargetRun> {
    const url = params.redisUrl
    if (!await redisAnswers(url)) throw new Error(`not run: no Redis answers at ${url} (set --redis-url or REDIS_URL)`)
    const prefix = `bench-${Date.now().toString(36)}-${randomBytes(3).toString('hex')}:`
    const env = { REDIS_URL: url, REDIS_PREFIX: prefix }
    // One instance per core; the client and Redis float between them.
    const cpus = ctx.options.serverCpu === null ? [null, null] : [ctx.options.serverCpu, ctx.options.clientCpu]
    const servers: ServerProcess[] = []
    ctx.pinClient(null)
    try {
      for (let index = 0; index < 2; index++) {
        servers.push(await ctx.startServer(kind, { label: `s4-${kind}-${index}`, cpu: cpus[index], env }))
      }
      const burst = await fanOutBurst(ctx, servers, params.subscribers, params.events, await redisPid(url))
      const cpuS = burst.details.server_cpu_s as number
      const delivered = burst.values.delivered ?? 0
      burst.values.deliveries_per_server_cpu_s = cpuS > 0 ? delivered / cpuS : null
      const cores = (burst.details.client_cpu as CpuReading).cores
      burst.values.cpu0_busy_pct = cores['0']?.busyPct ?? null
      burst.values.cpu1_busy_pct = cores['1']?.busyPct ?? null
      // Both cores hold a server and share the client and Redis: what is left is other processes.
      const reading = burst.details.client_cpu as CpuReading
      const busy = Object.values(cores).reduce((sum, core) => sum + core.busyPct - core.irqPct, 0)
      const redisCpuS = burst.details.redis_cpu_s as number | null
      const redisPct = redisCpuS === null ? 0 : (redisCpuS / reading.wallS) * 100
      burst.values.redis_cpu_pct = redisCpuS === null ? null : redisPct
      const others = busy - (cpuS / reading.wallS) * 100 - reading.pct - redisPct
      burst.values.other_processes_pct = Math.max(0, others)
      if (others >= 20) burst.notes.push(`DISTURBED: other processes used about ${others.toFixed(0)} % of a core during the measurement`)
      burst.notes.push(`instances pinned to CPUs ${cpus.map(String).join(' and ')}; load client and redis-server unpinned`)
      return { ...burst, details: { ...burst.details, prefix } }
    } finally {
      await ctx.pool.closeAll(true)
      for (const server of servers) await ctx.stopServer(server)
      ctx.pinClient(ctx.options.clientCpu)
      await dropPrefix(url, prefix).catch(() => 0)
    }
  },
  finish (ctx: Context, result: ScenarioResult) {
    const embedded = ctx.results.get('s2')
    const run = result.runs.gateway
    const reference = embedded?.runs.gateway
    if (run === undefined || 'error' in run || reference === undefined || 'error' in reference) {
      result.notes.push('no embedded-mode S2 gateway run in this invocation to compare with')
      return
    }
    const same = embedded?.params.subscribers === result.params.subscribers && embedded?.params.events === result.params.events && embedded?.params.burstRate === result.params.burstRate
    const redisRate = run.values.deliveries_per_s
    const embeddedRate = reference.values.deliveries_per_s
    const redisP99 = run.values.latency_p99_ms
    const embeddedP99 = reference.values.latency_p99_ms
    const redisPerCpu = run.values.deliveries_per_server_cpu_s
    const embeddedCpuUs = reference.values.server_cpu_us_per_delivery
    const perCore = redisRate !== null && embeddedRate !== null ? redisRate / 2 / embeddedRate : null
    const perCpuS = redisPerCpu !== null && embeddedCpuUs !== null && embeddedCpuUs > 0 ? redisPerCpu / (1e6 / embeddedCpuUs) : null
    const p99 = redisP99 !== null && embeddedP99 !== null && embeddedP99 > 0 ? redisP99 / embeddedP99 : null
    const format = (value: number | null, digits = 2): string => value === null ? 'n/a' : value.toFixed(digits)
    result.notes.push(
      `vs embedded S2 (${same ? 'same size' : 'DIFFERENT size: indicative only'}): deliveries/s per instance ÷ embedded = ${format(perCore)} ` +
      `(target ≥ 0.70); deliveries per server CPU-second ÷ embedded = ${format(perCpuS)}; p99 ÷ embedded p99 = ${format(p99)} (target ≤ 1.5)`
    )
    run.details.vsEmbedded = { sameSize: same, perInstanceRateRatio: perCore, perCpuSecondRatio: perCpuS, p99Ratio: p99 }
  }
})
