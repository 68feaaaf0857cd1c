import fp from 'fastify-plugin'
import type { EventBus } from '../src/core/bus'
import { MemoryBus } from '../src/core/memory-bus'
import { MemoryState } from '../src/core/memory-state'
import type { SharedState } from '../src/core/state'

declare module 'fastify' {
  interface FastifyInstance {
    /** Assigns ids, keeps history and fans events out: in memory, or through Redis. */
    bus: EventBus
    /** State every instance sees alike. */
    state: SharedState
  }
}

export default fp(async (app) => {
  const { config, registry } = app
  if (config.redisUrl !== null) {
    throw new Error('REDIS_URL is set but Redis mode is not available in this build')
  } else {
    const bus = new MemoryBus({ historySize: config.historySize, historyTtlS: config.historyTtlS })
    app.decorate('bus', bus)
    app.decorate('state', new MemoryState(bus, registry, config.presenceGraceMs))
  }
  app.addHook('onClose', async () => {
    await app.state.close()
    await app.bus.close()
  })
}, { name: 'bus', dependencies: ['config', 'registry'] })
