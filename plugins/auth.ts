import fp from 'fastify-plugin'
import fastifyJwt from '@fastify/jwt'
import type { FastifyRequest } from 'fastify'
import { errors } from '../src/errors'

export type Role = 'publisher' | 'admin'
export type AuthLevel = 'none' | 'user' | 'publisher' | 'admin'

export interface AuthContext {
  userId: string
  roles: Set<string>
  /** Topic patterns the token allows (`*` wildcard), or null for any topic. */
  topics: string[] | null
  /** Token expiry in ms since the epoch. */
  expiresAt: number | null
}

declare module 'fastify' {
  interface FastifyRequest {
    auth: AuthContext | null
  }
  interface FastifyContextConfig {
    auth?: AuthLevel
  }
}

type Claims = Record<string, unknown>

const HMAC = /^HS(256|384|512)$/
const ASYMMETRIC = /^(RS|ES|PS)(256|384|512)$/

/** Tokens are looked for in this order; the first one present is the only one verified. */
export function extractToken (request: FastifyRequest): string | null {
  const authorization = request.headers.authorization
  if (authorization !== undefined) {
    const match = /^Bearer\s+(\S+)\s*$/i.exec(authorization)
    // A present but malformed header is not skipped in favour of a later source.
    return match === null ? '' : match[1]
  }
  const header = request.headers['x-auth-token']
  if (header !== undefined) return Array.isArray(header) ? header[0] ?? '' : header.trim()
  const query = request.query as Record<string, unknown> | undefined
  const token = query?.token
  if (token !== undefined) return typeof token === 'string' ? token : ''
  return null
}

function hasRole (auth: AuthContext, level: AuthLevel): boolean {
  if (level === 'none' || level === 'user') return true
  if (auth.roles.has('admin')) return true
  return level === 'publisher' && auth.roles.has('publisher')
}

function failureReason (error: { code?: string }): string {
  switch (error.code) {
    case 'FST_JWT_AUTHORIZATION_TOKEN_EXPIRED': return 'expired'
    case 'FAST_JWT_MISSING_SIGNATURE': return 'unsigned'
    case 'FST_JWT_AUTHORIZATION_TOKEN_INVALID': return 'invalid'
    default: return 'malformed'
  }
}

const MESSAGES: Record<string, string> = {
  expired: 'token expired',
  unsigned: 'token is not signed',
  invalid: 'token is invalid',
  malformed: 'token is malformed'
}

export default fp(async (app) => {
  const { config } = app
  const pendingTokens = new WeakMap<FastifyRequest, string>()
  const algorithms: string[] = []
  if (config.jwtSecret !== null) algorithms.push('HS256', 'HS384', 'HS512')
  if (config.jwtPublicKey !== null) algorithms.push('RS256', 'RS384', 'RS512', 'ES256', 'ES384', 'ES512', 'PS256', 'PS384', 'PS512')

  await app.register(fastifyJwt, {
    // The key follows the token's algorithm, so an HS token is never checked
    // against the public key (algorithm confusion) and `none` has no key at all.
    secret: async (_request: FastifyRequest, token: unknown) => {
      const alg = (token as { header?: { alg?: unknown } }).header?.alg
      if (typeof alg === 'string' && HMAC.test(alg) && config.jwtSecret !== null) return config.jwtSecret
      if (typeof alg === 'string' && ASYMMETRIC.test(alg) && config.jwtPublicKey !== null) return config.jwtPublicKey
      throw Object.assign(new Error('unsupported algorithm'), { code: 'FST_JWT_AUTHORIZATION_TOKEN_INVALID' })
    },
    verify: {
      algorithms: algorithms as never,
      ...(config.jwtIssuer !== null ? { allowedIss: config.jwtIssuer } : {}),
      ...(config.jwtAudience !== null ? { allowedAud: config.jwtAudience } : {}),
      // Without this, a token lacking the claim altogether would pass the check.
      requiredClaims: [...(config.jwtIssuer !== null ? ['iss'] : []), ...(config.jwtAudience !== null ? ['aud'] : [])],
      clockTolerance: 0,
      // Verifying with the plugin's own options keeps its cached verifier per key.
      extractToken: (request: FastifyRequest) => pendingTokens.get(request)
    },
    // The secret callback needs the header to pick the key by algorithm.
    decode: { complete: true },
    decoratorName: 'jwtClaims'
  })

  app.decorateRequest('auth', null)

  const unauthorized = (reason: string, message = MESSAGES[reason] ?? 'unauthorized'): Error => {
    app.metrics.authFailure(reason)
    return new errors.Unauthorized(message)
  }

  app.addHook('onRequest', async (request) => {
    const level = request.routeOptions.config.auth ?? 'none'
    if (level === 'none') return
    const token = extractToken(request)
    if (token === null) throw unauthorized('missing', 'no token: send Authorization: Bearer <jwt>, X-Auth-Token or ?token=')
    if (token === '') throw unauthorized('malformed')
    let claims: Claims
    try {
      pendingTokens.set(request, token)
      claims = await request.jwtVerify<Claims>()
    } catch (error) {
      request.log.debug({ code: (error as { code?: string }).code, reason: (error as Error).message }, 'token rejected')
      throw unauthorized(failureReason(error as { code?: string }))
    }
    const userId = [claims[config.jwtUserClaim], claims.userId, claims.id].find(
      (value) => (typeof value === 'string' && value !== '') || typeof value === 'number'
    )
    if (userId === undefined || String(userId).length > 256) throw unauthorized('no-user', 'token has no user id claim')
    const roles = new Set<string>()
    if (Array.isArray(claims.roles)) for (const role of claims.roles) if (typeof role === 'string') roles.add(role)
    if (typeof claims.role === 'string') roles.add(claims.role)
    const topics = Array.isArray(claims.topics) ? claims.topics.filter((topic): topic is string => typeof topic === 'string') : null
    const auth: AuthContext = {
      userId: String(userId),
      roles,
      topics,
      expiresAt: typeof claims.exp === 'number' ? claims.exp * 1000 : null
    }
    if (!hasRole(auth, level)) {
      app.metrics.authFailure('forbidden')
      throw new errors.Forbidden(`this route needs the ${level} role`)
    }
    request.auth = auth
  })
}, { name: 'auth', dependencies: ['config', 'metrics'] })

/** The authenticated caller of a route declared with an auth level. */
export function authOf (request: FastifyRequest): AuthContext {
  if (request.auth === null) throw new errors.Unauthorized('not authenticated')
  return request.auth
}
