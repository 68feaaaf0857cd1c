import type { FastifyPluginAsync } from 'fastify'
import { Type } from '@sinclair/typebox'
import { validatePublishBody } from '../src/core/publish'
import { errorResponses } from '../src/schemas/common'
import { errors } from '../src/errors'

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
    const validation = validatePublishBody(request.body, config.maxEventBytes)
    if (!validation.ok) {
      throw validation.status === 413 ? new errors.TooLarge(validation.message) : new errors.BadRequest(validation.message)
    }
    const { items, batch } = validation.value
    const ids = (await publisher.publish(items)).map(String)
    for (const item of items) app.metrics.published(item.target.kind, 1)
    reply.code(202)
    return batch ? { ids } : { id: ids[0] }
  })
}

export default publishRoutes
