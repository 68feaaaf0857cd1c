import type { FastifyPluginAsync } from 'fastify'
import { Type, type Static } from '@sinclair/typebox'
import { newConnectionId } from '../src/core/ids'
import { errorResponses, UserId } from '../src/schemas/common'

const CreateBody = Type.Object({ userId: UserId }, { additionalProperties: false })
const ConnectionInfo = Type.Object({
  connectionId: Type.String(),
  userId: Type.String(),
  topics: Type.Array(Type.String()),
  openedAt: Type.String(),
  instance: Type.String()
})

const connectionRoutes: FastifyPluginAsync = async (app) => {
  const { config, state } = app

  app.post('/v1/connections', {
    config: { auth: 'publisher', internal: true },
    schema: {
      body: CreateBody,
      response: { 201: Type.Object({ connectionId: Type.String(), expiresAt: Type.String() }), ...errorResponses }
    }
  }, async (request, reply) => {
    const { userId } = request.body as Static<typeof CreateBody>
    const connectionId = newConnectionId()
    await state.createConnection(connectionId, userId, config.historyTtlS)
    reply.code(201)
    return { connectionId, expiresAt: new Date(Date.now() + config.historyTtlS * 1000).toISOString() }
  })

  app.get('/v1/connections', {
    config: { auth: 'admin', internal: true },
    schema: { response: { 200: Type.Object({ connections: Type.Array(ConnectionInfo) }), ...errorResponses } }
  }, async () => ({ connections: await state.connections() }))
}

export default connectionRoutes
