import fp from 'fastify-plugin'
import rateLimit from '@fastify/rate-limit'

const STREAM_ROUTE = /\/stream(\/|$)/

/**
 * Per-address limits on stream opens and on publisher routes, counted per
 * instance. The client address is the socket's, or X-Forwarded-For's when the
 * proxy is trusted (TRUST_PROXY).
 */
export default fp(async (app) => {
  const { config } = app
  // Runs before @fastify/rate-limit's own onRoute hook, which reads config.rateLimit.
  app.addHook('onRoute', (route) => {
    const routeConfig = (route.config ?? {}) as { auth?: string, rateLimit?: unknown }
    const isStream = route.method === 'GET' && STREAM_ROUTE.test(route.url)
    const isPublisher = routeConfig.auth === 'publisher'
    const max = isStream ? config.rateLimitStreamsPerMin : isPublisher ? config.rateLimitPublishPerMin : 0
    if (max > 0) route.config = { ...routeConfig, rateLimit: { max, timeWindow: 60_000, groupId: isStream ? 'streams' : 'publish' } } as typeof route.config
  })
  await app.register(rateLimit, {
    global: false,
    errorResponseBuilder: (_request, context) => ({
      statusCode: 429,
      error: 'Too Many Requests',
      message: `rate limit exceeded, retry in ${context.after}`
    })
  })
}, { name: 'rate-limit', dependencies: ['config'] })
