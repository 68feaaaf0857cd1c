import type { FastifyPluginAsync } from 'fastify'
import { Type } from '@sinclair/typebox'
import { authOf } from '../plugins/auth'
import { channel } from '../src/core/channels'
import { topicAllowed } from '../src/core/framing'
import { detachedCopy, newConnectionId } from '../src/core/ids'
import { errorResponses, PathId, StreamQuery, type StreamQueryType } from '../src/schemas/common'
import { errors } from '../src/errors'
import { checkTopics, parseTopicList } from './topics'

/**
 * A list written the way qs and axios write one (`topics[]=a`, `topics[0]=a`)
 * is not read: refused, where the stream would open subscribed to nothing.
 */
function refuseBracketedTopics (query: object): void {
  for (const key in query) {
    if (key.startsWith('topics[')) throw new errors.BadRequest('topics are read as topics=a,b or topics=a&topics=b, not topics[]=a')
  }
}

/** The user's stream: its own id, the user, its topics, broadcast. */
const streamRoutes: FastifyPluginAsync = async (app) => {
  const { state } = app

  const open = async (request: Parameters<typeof app.openStream>[0], reply: Parameters<typeof app.openStream>[1], connectionId: string, reopened: boolean): Promise<void> => {
    const auth = authOf(request)
    const query = request.query as StreamQueryType
    refuseBracketedTopics(query)
    const topics = checkTopics(auth, parseTopicList(query.topics), app.config.maxTopics)
    await app.openStream(request, reply, {
      connectionId,
      kind: 'stream',
      topics,
      channels: [channel.connection(connectionId), channel.user(auth.userId), channel.broadcast, ...topics.map(channel.topic)],
      // User-wide subscriptions the token no longer allows are left out.
      extraTopics: async () => (await state.userTopics(auth.userId)).filter((topic) => topicAllowed(topic, auth.topics)),
      windowChannels: reopened ? [channel.connection(connectionId)] : undefined
    })
  }

  // No HEAD twin (Fastify adds one to every GET): its handler would open a
  // real stream, answer HEAD with a body, and escape the stream-open limit.
  app.get('/v1/stream', {
    exposeHeadRoute: false,
    config: { auth: 'user', opensStream: true },
    schema: { querystring: StreamQuery, response: errorResponses }
  }, async (request, reply) => {
    await open(request, reply, newConnectionId(), false)
  })

  app.get('/v1/stream/:connectionId', {
    exposeHeadRoute: false,
    config: { auth: 'user', opensStream: true },
    schema: { params: Type.Object({ connectionId: PathId }), querystring: StreamQuery, response: errorResponses }
  }, async (request, reply) => {
    const connectionId = detachedCopy((request.params as { connectionId: string }).connectionId)
    const owner = await state.connectionOwner(connectionId)
    if (owner === null || owner !== authOf(request).userId) throw new errors.NotFound(`no stream ${connectionId}`)
    await open(request, reply, connectionId, true)
  })
}

export default streamRoutes
