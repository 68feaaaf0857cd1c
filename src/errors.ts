import createError from '@fastify/error'

/**
 * Every error the gateway answers with; the body is `{ statusCode, code, error, message }`.
 * src/app.ts adds GW_NOT_FOUND (unknown routes), GW_METHOD_NOT_ALLOWED, GW_INTERNAL and GW_UNAVAILABLE,
 * and for requests Node's HTTP parser refuses GW_BAD_REQUEST, GW_TOO_LARGE (431)
 * and GW_TIMEOUT (408); plugins/rate-limit.ts adds GW_RATE_LIMITED.
 */
export const errors = {
  BadRequest: createError('GW_BAD_REQUEST', '%s', 400),
  Unauthorized: createError('GW_UNAUTHORIZED', '%s', 401),
  Forbidden: createError('GW_FORBIDDEN', '%s', 403),
  NotFound: createError('GW_NOT_FOUND', '%s', 404),
  Conflict: createError('GW_CONFLICT', '%s', 409),
  TooLarge: createError('GW_TOO_LARGE', '%s', 413),
  UnsupportedMediaType: createError('GW_UNSUPPORTED_MEDIA_TYPE', '%s', 415),
  Unprocessable: createError('GW_UNPROCESSABLE', '%s', 422),
  Limited: createError('GW_LIMITED', '%s', 429),
  NotImplemented: createError('GW_NOT_IMPLEMENTED', '%s', 501),
  Unavailable: createError('GW_UNAVAILABLE', '%s', 503)
}
