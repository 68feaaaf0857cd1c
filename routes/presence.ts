import type { FastifyPluginAsync } from 'fastify'
import { Type, type Static } from '@sinclair/typebox'
import { errorResponses, UserId } from '../src/schemas/common'

const Params = Type.Object({ userId: UserId })

const presenceRoutes: FastifyPluginAsync = async (app) => {
  app.get('/v1/presence/:userId', {
    config: { auth: 'publisher', internal: true },
    schema: {
      params: Params,
      response: { 200: Type.Object({ userId: Type.String(), online: Type.Boolean(), connections: Type.Integer() }), ...errorResponses }
    }
  }, async (request) => await app.state.presence((request.params as Static<typeof Params>).userId))
}

export default presenceRoutes
