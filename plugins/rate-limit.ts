import fp from 'fastify-plugin'
import rateLimit, { type FastifyRateLimitStore, type FastifyRateLimitStoreCtor } from '@fastify/rate-limit'
import type { FastifyBaseLogger, FastifyRequest, onRequestHookHandler, RouteOptions } from 'fastify'
import { StoreUnavailableError, type RequestCounter } from '../src/core/state'
import { clientAddress } from '../src/client-address'

declare module 'fastify' {
  interface FastifyContextConfig {
    /** The route opens a stream: it counts against RATE_LIMIT_STREAMS_PER_MIN. */
    opensStream?: true
  }
}

const WINDOW_MS = 60_000

/**
 * The library's store over counters every instance shares. Each group's
 * keys are already apart (see `limiter`), so a child is the same store.
 * A count that fails lets the request pass (skipOnError); that the limits
 * are off is logged, once a window, not once a request.
 */
function sharedStore (counter: RequestCounter, log: FastifyBaseLogger): FastifyRateLimitStoreCtor {
  let warnedAt = -Infinity
  return class SharedStore implements FastifyRateLimitStore {
    incr (key: string, callback: (error: Error | null, result?: { current: number, ttl: number }) => void): void {
      counter.count(key, WINDOW_MS).then((count) => callback(null, count), (error: unknown) => {
        const now = Date.now()
        if (now - warnedAt >= WINDOW_MS) {
          warnedAt = now
          log.warn({ reason: error instanceof StoreUnavailableError ? error.reason : String(error) }, 'rate limits not applied: Redis did not count the request')
        }
        callback(error instanceof Error ? error : new Error(String(error)))
      })
    }

    child (): FastifyRateLimitStore {
      return this
    }
  }
}

/**
 * Per-address limits on stream opens and on publisher routes. Each group
 * shares one counter across its routes, so a client cannot multiply its
 * allowance by spreading requests over several routes. The client address is
 * the socket's, or X-Forwarded-For's when the proxy is trusted (TRUST_PROXY).
 *
 * In Redis mode the counters are in Redis, so a limit holds across the
 * instances behind a load balancer rather than once per instance. While Redis
 * cannot count (down, frozen, refusing writes), requests pass: a limit that
 * refused everyone during an outage would turn it into a lockout, and the
 * requests meet Redis's trouble in their own work anyway.
 */
export default fp(async (app) => {
  const { config, requestCounter } = app
  await app.register(rateLimit, {
    global: false,
    ...(requestCounter !== null ? { store: sharedStore(requestCounter, app.log), skipOnError: true } : {}),
    errorResponseBuilder: (_request, context) => ({
      statusCode: 429,
      code: 'GW_RATE_LIMITED',
      error: 'Too Many Requests',
      message: `rate limit exceeded, retry in ${context.after}`
    })
  })
  const limiter = (group: string, max: number): onRequestHookHandler | null => max > 0
    ? app.rateLimit({ max, timeWindow: WINDOW_MS, keyGenerator: (request: FastifyRequest) => `${group}:${clientAddress(request.ip)}` })
    : null
  const streams = limiter('streams', config.rateLimitStreamsPerMin)
  const publishers = limiter('publish', config.rateLimitPublishPerMin)

  app.addHook('onRoute', (route: RouteOptions) => {
    const handler = route.config?.opensStream === true ? streams : route.config?.auth === 'publisher' ? publishers : null
    if (handler === null) return
    const existing = route.onRequest === undefined ? [] : Array.isArray(route.onRequest) ? route.onRequest : [route.onRequest]
    route.onRequest = [...existing, handler]
  })
}, { name: 'rate-limit', dependencies: ['config', 'bus'] })
