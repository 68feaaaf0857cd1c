import type { FastifyPluginAsync } from 'fastify'
import { Type, type Static } from '@sinclair/typebox'
import { ErrorSchema } from '../src/schemas/common'

const StatusSchema = Type.Object({ status: Type.String() })
// The contract's error shape, and `status` as the 200 has it, for probes that read it.
const NotReadySchema = Type.Composite([ErrorSchema, StatusSchema])

const opsRoutes: FastifyPluginAsync = async (app) => {
  app.get('/health', { logLevel: 'warn', schema: { response: { 200: StatusSchema } } }, async () => ({ status: 'ok' }))

  const notReady = (status: string, message: string): Static<typeof NotReadySchema> => ({ statusCode: 503, code: 'GW_UNAVAILABLE', error: 'Service Unavailable', message, status })
  app.get('/ready', { logLevel: 'warn', schema: { response: { 200: StatusSchema, 503: NotReadySchema } } }, async (_request, reply) => {
    if (app.streams.isDraining) return await reply.code(503).send(notReady('draining', 'the gateway is shutting down'))
    if (!app.bus.isAnswering()) return await reply.code(503).send(notReady('store unavailable', 'Redis does not answer'))
    return { status: 'ready' }
  })

  app.get('/metrics', { logLevel: 'warn', config: { internal: true } }, async (_request, reply) => {
    reply.header('content-type', app.metrics.registry.contentType)
    return await app.metrics.registry.metrics()
  })
}

export default opsRoutes
