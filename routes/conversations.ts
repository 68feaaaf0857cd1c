import type { FastifyPluginAsync } from 'fastify'
import { Type, type Static } from '@sinclair/typebox'
import { detachedCopy } from '../src/core/ids'
import { errorResponses, PathId, UserId } from '../src/schemas/common'

const Params = Type.Object({ id: PathId })
const MembersBody = (minItems: number) => Type.Object({
  members: Type.Array(UserId, { minItems, maxItems: 10000 })
}, { additionalProperties: false })
const MembersReply = Type.Object({ members: Type.Array(Type.String()) })

const conversationRoutes: FastifyPluginAsync = async (app) => {
  const { state } = app
  const routes = [['PUT', 'set', 0], ['POST', 'add', 1], ['DELETE', 'remove', 1]] as const
  for (const [method, op, minItems] of routes) {
    app.route({
      method,
      url: '/v1/conversations/:id/members',
      config: { auth: 'publisher', internal: true },
      schema: { params: Params, body: MembersBody(minItems), response: { 200: MembersReply, ...errorResponses } },
      handler: async (request) => {
        // Kept as the conversation's key: not a view into a URL that may carry a token.
        const id = detachedCopy((request.params as Static<typeof Params>).id)
        const { members } = request.body as { members: string[] }
        return { members: await state.updateMembers(id, op, [...new Set(members)]) }
      }
    })
  }
}

export default conversationRoutes
