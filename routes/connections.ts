import type { FastifyPluginAsync } from 'fastify'
import { Type, type Static } from '@sinclair/typebox'
import { newConnectionId } from '../src/core/ids'
import { TOPIC_NAME } from '../src/core/framing'
import { errorResponses, UserId } from '../src/schemas/common'

const CreateBody = Type.Object({ userId: UserId }, { additionalProperties: false })
const ConnectionInfo = Type.Object({
  connectionId: Type.String(),
  userId: Type.String(),
  topics: Type.Array(Type.String()),
  openedAt: Type.String(),
  instance: Type.String()
})

/**
 * Narrowing is optional, so the bare route stays the contract's full listing;
 * at 100k streams that is about 15 MB, which a dashboard should not poll.
 */
const ListQuery = Type.Object({
  token: Type.Optional(Type.String()),
  userId: Type.Optional(UserId),
  topic: Type.Optional(Type.String({ pattern: TOPIC_NAME.source })),
  q: Type.Optional(Type.String({ minLength: 1, maxLength: 256 })),
  // Query values are not coerced (see app.ts), so the number is a pattern.
  limit: Type.Optional(Type.String({ pattern: '^[1-9][0-9]{0,5}$' }))
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
    schema: { querystring: ListQuery, response: { 200: Type.Object({ connections: Type.Array(ConnectionInfo) }), ...errorResponses } }
  }, async (request, reply) => {
    const query = request.query as Static<typeof ListQuery>
    const { connections, total } = await state.connections({
      userId: query.userId,
      topic: query.topic,
      search: query.q,
      limit: query.limit === undefined ? undefined : Number(query.limit)
    })
    // A header, so that the body keeps exactly the contract's shape.
    reply.header('x-total-count', String(total))
    return { connections }
  })
}

export default connectionRoutes
