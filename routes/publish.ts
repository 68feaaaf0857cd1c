import { createHash } from 'node:crypto'
import type { FastifyPluginAsync, FastifyRequest } from 'fastify'
import { Type } from '@sinclair/typebox'
import { authOf } from '../plugins/auth'
import type { OnceOutcome, PublishOnce } from '../src/core/bus'
import { FanoutTooLargeError, validatePublishBody } from '../src/core/publish'
import { errorResponses } from '../src/schemas/common'
import { errors } from '../src/errors'
import { unquoted } from '../src/headers'

// Printable ASCII, as Stripe's keys and the IETF draft's quoted strings are.
const IDEMPOTENCY_KEY = /^[\x21\x23-\x5b\x5d-\x7e]{1,255}$/

/** The request's Idempotency-Key (quotes taken off), or null when it has none. */
function idempotencyKeyOf (request: FastifyRequest): string | null {
  const header = request.headers['idempotency-key']
  if (header === undefined) return null
  const value = typeof header === 'string' ? unquoted(header) : header
  if (typeof value !== 'string' || !IDEMPOTENCY_KEY.test(value)) {
    throw new errors.BadRequest('Idempotency-Key must be 1-255 printable ASCII characters without spaces, quotes or backslashes')
  }
  return value
}

function sha256 (text: string): string {
  return createHash('sha256').update(text).digest('base64url')
}

const publishRoutes: FastifyPluginAsync = async (app) => {
  const { config, publisher } = app

  app.post('/v1/publish', {
    config: { auth: 'publisher', internal: true },
    schema: {
      response: {
        202: Type.Union([
          Type.Object({ id: Type.String() }),
          Type.Object({ ids: Type.Array(Type.String()) })
        ]),
        ...errorResponses
      }
    }
  }, async (request, reply) => {
    const key = idempotencyKeyOf(request)
    const validation = validatePublishBody(request.body, config.maxEventBytes)
    if (!validation.ok) {
      throw validation.fault === 'tooLarge' ? new errors.TooLarge(validation.message) : new errors.BadRequest(validation.message)
    }
    const { items, batch } = validation.value
    const once: PublishOnce | null = key === null
      ? null
      : {
          // Keys are the publisher's own: two backends choosing the same key do not collide.
          key: sha256(`${authOf(request).userId}\n${key}`),
          // Of the request as validated, so the same request whose JSON keys
          // come in another order, or that spells out a default, is the same.
          fingerprint: sha256(JSON.stringify([batch, items])),
          windowS: config.idempotencyWindowS
        }
    let outcome: OnceOutcome
    try {
      const resolved = await publisher.itemsOf(items)
      outcome = once === null
        ? { kind: 'published', ids: await publisher.publishItems(resolved) }
        : await publisher.publishItemsOnce(resolved, once)
    } catch (error) {
      if (!(error instanceof FanoutTooLargeError)) throw error
      // A conversation that has grown past the limit since the first try
      // must not turn the retry of a publish that went through into a 413.
      const used = once === null ? null : await publisher.usedOnce(once)
      if (used === null) throw new errors.TooLarge(error.message)
      outcome = used
    }
    if (outcome.kind === 'conflict') throw new errors.Unprocessable('this Idempotency-Key was used for another request')
    const { ids } = outcome
    const repeated = outcome.kind === 'repeated'
    // A repeat published nothing: it is said, not counted.
    if (repeated) reply.header('idempotent-replayed', 'true')
    else for (const item of items) app.metrics.published(item.target.kind, 1)
    reply.code(202)
    return batch ? { ids: ids.map(String) } : { id: String(ids[0]) }
  })
}

export default publishRoutes
