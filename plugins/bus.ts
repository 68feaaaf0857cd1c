import fp from 'fastify-plugin'
import { stopByMs } from '../src/config'
import type { EventBus } from '../src/core/bus'
import { MemoryBus } from '../src/core/memory-bus'
import { MemoryState } from '../src/core/memory-state'
import type { DurableIngress, IngressLeader } from '../src/core/redis/engine'
import type { RequestCounter, SharedState } from '../src/core/state'

declare module 'fastify' {
  interface FastifyInstance {
    /** Assigns ids, keeps history and fans events out: in memory, or through Redis. */
    bus: EventBus
    /** State every instance sees alike. */
    state: SharedState
    /** Redis mode only: the lease that makes one instance handle each ingress message. */
    ingress: IngressLeader | null
    /** Redis mode only: the consumer-group reader of `<prefix>ingress`. */
    durableIngress: DurableIngress | null
    /** Redis mode only: rate-limit counters every instance shares. */
    requestCounter: RequestCounter | null
  }
}

export default fp<{ startupSignal?: AbortSignal }>(async (app, options) => {
  const { config, registry } = app
  if (config.redisUrl !== null) {
    // Loaded only in Redis mode, so embedded mode never opens a Redis client.
    const { connectRedis } = await import('../src/core/redis/engine')
    const engine = await connectRedis({
      url: config.redisUrl,
      sentinels: config.redisSentinels,
      sentinelPassword: config.redisSentinelPassword,
      prefix: config.redisPrefix,
      historySize: config.historySize,
      historyTtlS: config.historyTtlS,
      presenceGraceMs: config.presenceGraceMs,
      instanceTtlMs: config.instanceTtlMs,
      startupTimeoutMs: config.redisStartupTimeoutMs,
      commandTimeoutMs: config.redisCommandTimeoutMs,
      startupSignal: options.startupSignal
    }, registry, app.log)
    app.decorate('bus', engine.bus)
    app.decorate('state', engine.state)
    app.decorate('ingress', engine.ingress)
    app.decorate('durableIngress', engine.durable)
    app.decorate('requestCounter', engine.requests)
    // Draining, this instance is no place to hand the ingress lease to.
    // The hand-over of the lease must end before the process exits (src/server.ts).
    app.addHook('preClose', async () => engine.ingress.beginStop(Date.now() + stopByMs(config)))
    app.addHook('onClose', async () => await engine.close())
  } else {
    const bus = new MemoryBus({ historySize: config.historySize, historyTtlS: config.historyTtlS, maxHistoryBytes: config.historyMaxBytes })
    const state = new MemoryState(bus, registry, config.presenceGraceMs)
    app.decorate('bus', bus)
    app.decorate('state', state)
    app.decorate('ingress', null)
    app.decorate('durableIngress', null)
    app.decorate('requestCounter', null)
    app.addHook('onClose', async () => {
      await state.close()
      await bus.close()
    })
  }
}, { name: 'bus', dependencies: ['config', 'registry'] })
