import type { FastifyPluginAsync } from 'fastify'
import { Type, type Static } from '@sinclair/typebox'
import { authOf, type AuthContext } from '../plugins/auth'
import { topicAllowed } from '../src/core/framing'
import { errorResponses, PathId } from '../src/schemas/common'
import { errors } from '../src/errors'
import { checkTopics } from './topics'

const SubscriptionBody = Type.Object({
  topics: Type.Array(Type.String(), { minItems: 1, maxItems: 100 }),
  connectionId: Type.Optional(PathId)
}, { additionalProperties: false })
const TopicsReply = Type.Object({ topics: Type.Array(Type.String()) })

/**
 * A token held to some topics (a widget's, say) is not shown the names of
 * the user's others, which its streams do not join either.
 */
function shownTo (auth: AuthContext, topics: string[]): string[] {
  return auth.topics === null ? topics : topics.filter((topic) => topicAllowed(topic, auth.topics))
}

const subscriptionRoutes: FastifyPluginAsync = async (app) => {
  const { config, state } = app

  const change = async (auth: AuthContext, connectionId: string | undefined, add: string[], remove: string[]): Promise<{ topics: string[] }> => {
    const { userId } = auth
    if (connectionId === undefined) {
      // Every live stream of the user, on every instance, follows before we answer.
      const topics = add.length > 0
        ? await state.changeUserTopics(userId, 'add', add, config.historyTtlS, config.maxTopics)
        : await state.changeUserTopics(userId, 'remove', remove, config.historyTtlS, config.maxTopics)
      if (topics === null) throw new errors.Conflict(`a user holds at most ${config.maxTopics} user-wide topics`)
      return { topics: shownTo(auth, topics) }
    }
    if (await state.connectionOwner(connectionId) !== userId) throw new errors.NotFound(`no stream ${connectionId}`)
    const answer = await state.broadcastControl({ type: 'topics', userId, connectionId, add, remove })
    if (answer === null) throw new errors.NotFound(`stream ${connectionId} is not open`)
    if (!Array.isArray(answer)) throw answer.forbidden ? new errors.Forbidden(answer.refused) : new errors.Conflict(answer.refused)
    // Another stream of the user, opened with a broader token, may hold others.
    return { topics: shownTo(auth, answer) }
  }

  app.post('/v1/subscriptions', {
    config: { auth: 'user' },
    schema: { body: SubscriptionBody, response: { 200: TopicsReply, ...errorResponses } }
  }, async (request) => {
    const auth = authOf(request)
    const body = request.body as Static<typeof SubscriptionBody>
    return await change(auth, body.connectionId, checkTopics(auth, body.topics), [])
  })

  app.delete('/v1/subscriptions', {
    config: { auth: 'user' },
    schema: { body: SubscriptionBody, response: { 200: TopicsReply, ...errorResponses } }
  }, async (request) => {
    const auth = authOf(request)
    const body = request.body as Static<typeof SubscriptionBody>
    // Leaving a topic is always allowed, even one the token no longer grants.
    const topics = checkTopics({ ...auth, topics: null }, body.topics)
    return await change(auth, body.connectionId, [], topics)
  })
}

export default subscriptionRoutes
