import type { FastifyPluginAsync } from 'fastify'
import { Type } from '@sinclair/typebox'
import { errorResponses } from '../src/schemas/common'

const StatsReply = Type.Object({
  connections: Type.Integer(),
  users: Type.Integer(),
  averageConnectionsPerUser: Type.Number(),
  topics: Type.Record(Type.String(), Type.Integer()),
  instances: Type.Integer()
})

const statsRoutes: FastifyPluginAsync = async (app) => {
  app.get('/v1/stats', {
    config: { auth: 'admin', internal: true },
    schema: { response: { 200: StatsReply, ...errorResponses } }
  }, async () => {
    const stats = await app.state.stats()
    const average = stats.users === 0 ? 0 : Math.round((stats.connections / stats.users) * 100) / 100
    return { ...stats, averageConnectionsPerUser: average }
  })
}

export default statsRoutes
