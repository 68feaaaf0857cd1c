import fp from 'fastify-plugin'
import rateLimit from '@fastify/rate-limit'
import type { onRequestHookHandler, RouteOptions } from 'fastify'

declare module 'fastify' {
  interface FastifyContextConfig {
    /** The route opens a stream: it counts against RATE_LIMIT_STREAMS_PER_MIN. */
    opensStream?: true
  }
}

/**
 * Per-address limits on stream opens and on publisher routes, counted per
 * instance. Each group shares one counter across its routes, so a client
 * cannot multiply its allowance by spreading requests over several routes.
 * The client address is the socket's, or X-Forwarded-For's when the proxy is
 * trusted (TRUST_PROXY).
 */
export default fp(async (app) => {
  const { config } = app
  await app.register(rateLimit, {
    global: false,
    errorResponseBuilder: (_request, context) => ({
      statusCode: 429,
      code: 'GW_RATE_LIMITED',
      error: 'Too Many Requests',
      message: `rate limit exceeded, retry in ${context.after}`
    })
  })
  const limiter = (max: number): onRequestHookHandler | null => max > 0 ? app.rateLimit({ max, timeWindow: 60_000 }) : null
  const streams = limiter(config.rateLimitStreamsPerMin)
  const publishers = limiter(config.rateLimitPublishPerMin)

  app.addHook('onRoute', (route: RouteOptions) => {
    const handler = route.config?.opensStream === true ? streams : route.config?.auth === 'publisher' ? publishers : null
    if (handler === null) return
    const existing = route.onRequest === undefined ? [] : Array.isArray(route.onRequest) ? route.onRequest : [route.onRequest]
    route.onRequest = [...existing, handler]
  })
}, { name: 'rate-limit', dependencies: ['config'] })
