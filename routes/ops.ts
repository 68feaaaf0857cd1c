import type { FastifyPluginAsync } from 'fastify'
import { Type } from '@sinclair/typebox'

const StatusSchema = Type.Object({ status: Type.String() })

const opsRoutes: FastifyPluginAsync = async (app) => {
  app.get('/health', { logLevel: 'warn', schema: { response: { 200: StatusSchema } } }, async () => ({ status: 'ok' }))

  app.get('/ready', { logLevel: 'warn', schema: { response: { 200: StatusSchema, 503: StatusSchema } } }, async (_request, reply) => {
    if (app.streams.isDraining) return await reply.code(503).send({ status: 'draining' })
    if (!app.bus.isAnswering()) return await reply.code(503).send({ status: 'store unavailable' })
    return { status: 'ready' }
  })

  app.get('/metrics', { logLevel: 'warn', config: { internal: true } }, async (_request, reply) => {
    reply.header('content-type', app.metrics.registry.contentType)
    return await app.metrics.registry.metrics()
  })
}

export default opsRoutes
