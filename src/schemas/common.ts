import { Type, type Static } from '@sinclair/typebox'
import { MAX_ID_CHARACTERS, PATH_ID_PATTERN } from '../core/publish'

export const ErrorSchema = Type.Object({
  statusCode: Type.Integer(),
  code: Type.Optional(Type.String()),
  error: Type.String(),
  message: Type.String()
})

/** Ids in paths: jobs, conversations, connections. */
export const PathId = Type.String({ pattern: PATH_ID_PATTERN })
/**
 * User ids: what a token's claim may hold. Patterns are Unicode regexps, where
 * a surrogate pair is one character: the class refuses lone surrogates only,
 * which Redis would turn into U+FFFD, another user's id.
 */
export const UserId = Type.String({ minLength: 1, maxLength: MAX_ID_CHARACTERS, pattern: '^[^\\u0000-\\u001f\\u007f-\\u009f\\ud800-\\udfff]+$' })

export const StreamQuery = Type.Object({
  token: Type.Optional(Type.String()),
  // `topics=a,b`, or the parameter repeated (`topics=a&topics=b`), as some clients build lists.
  topics: Type.Optional(Type.Union([Type.String({ maxLength: 8192 }), Type.Array(Type.String({ maxLength: 8192 }), { maxItems: 100 })])),
  // No length limit of its own: one that does not parse gets `reset`, as the header does.
  lastEventId: Type.Optional(Type.String())
})
export type StreamQueryType = Static<typeof StreamQuery>

export const errorResponses = {
  400: ErrorSchema,
  401: ErrorSchema,
  403: ErrorSchema,
  404: ErrorSchema,
  409: ErrorSchema,
  413: ErrorSchema,
  422: ErrorSchema,
  429: ErrorSchema,
  503: ErrorSchema
}
