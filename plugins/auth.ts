import fp from 'fastify-plugin'
import fastifyJwt, { type FastifyJWTOptions, type JWT } from '@fastify/jwt'
import type { FastifyRequest } from 'fastify'
import { hasLoneSurrogate, isEntityId, MAX_ID_CHARACTERS, tooManyCharacters } from '../src/core/publish'
import { errors } from '../src/errors'
import { holdsDecodableJwt } from '../src/logging'
import { headerLines, unquoted } from '../src/headers'

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

type Algorithms = NonNullable<NonNullable<FastifyJWTOptions['verify']>['algorithms']>
// Each list is both what its verifier accepts and how a token is routed to it.
const HMAC_ALGORITHMS: Algorithms = ['HS256', 'HS384', 'HS512']
const PUBLIC_KEY_ALGORITHMS: Algorithms = ['RS256', 'RS384', 'RS512', 'ES256', 'ES384', 'ES512', 'PS256', 'PS384', 'PS512']
/** Whether `list` names `alg`, a header's value, which may be anything. */
const names = (list: Algorithms, alg: string): boolean => (list as readonly string[]).includes(alg)

/** Tokens are looked for in this order; the first one present is the only one verified. */
export function extractToken (request: FastifyRequest): string | null {
  const authorization = request.headers.authorization
  // The source is a Bearer header: another scheme (Basic credentials that a
  // browser adds by itself on a site behind HTTP auth) is not a token, and
  // does not hide the later sources. A Bearer one that is malformed does, as
  // does a bare value with no scheme (a token sent without `Bearer `).
  if (authorization !== undefined) {
    // Node keeps the first of two Authorization headers and drops the other:
    // a proxy that reads the last would take another caller than the
    // gateway. Ambiguous, so malformed (as two X-Auth-Token headers are).
    if (headerLines(request.raw.rawHeaders, 'authorization') > 1) return ''
    if (/^\s*bearer(\s|$)/i.test(authorization) || !/^\s*\S+\s+\S/.test(authorization)) {
      const match = /^\s*Bearer\s+(\S+)\s*$/i.exec(authorization)
      return match === null ? '' : match[1]
    }
  }
  const header = request.headers['x-auth-token']
  if (header !== undefined) return Array.isArray(header) ? header[0] ?? '' : header.trim()
  const query = request.query as Record<string, unknown> | undefined
  const token = query?.token
  if (token !== undefined) return typeof token === 'string' ? token : ''
  return null
}

/** The value of cookie `name` in the request's Cookie header (quotes taken off), or null. */
function cookieValue (request: FastifyRequest, name: string): string | null {
  const header = request.headers.cookie
  if (header === undefined) return null
  for (const pair of header.split(';')) {
    const equals = pair.indexOf('=')
    if (equals < 0 || pair.slice(0, equals).trim() !== name) continue
    return unquoted(pair.slice(equals + 1).trim())
  }
  return null
}

/**
 * A claim by name, or, when no claim has that name and it has dots, by path
 * into nested claims: `user.id` reads `{"user":{"id":…}}`, as tokens signed
 * with `{ user: { id } }` (a common Express pattern) carry the user id.
 * Own properties only: a path never reaches into an object's prototype.
 */
function claimAt (claims: Claims, name: string): unknown {
  if (Object.hasOwn(claims, name)) return claims[name]
  if (!name.includes('.')) return undefined
  let value: unknown = claims
  for (const key of name.split('.')) {
    if (typeof value !== 'object' || value === null || Array.isArray(value) || !Object.hasOwn(value, key)) return undefined
    value = (value as Record<string, unknown>)[key]
  }
  return value
}

function rolesOf (claims: Claims): Set<string> {
  const roles = new Set<string>()
  if (Array.isArray(claims.roles)) for (const role of claims.roles) if (typeof role === 'string') roles.add(role)
  if (typeof claims.role === 'string') roles.add(claims.role)
  return roles
}

export function hasRole (auth: AuthContext, level: AuthLevel): boolean {
  if (level === 'none' || level === 'user') return true
  if (auth.roles.has('admin')) return true
  return level === 'publisher' && auth.roles.has('publisher')
}

const MESSAGES: Record<string, string> = {
  expired: 'token expired',
  inactive: 'token is not valid yet (nbf)',
  unsigned: 'token is not signed',
  invalid: 'token is invalid',
  malformed: 'token is malformed'
}

declare module '@fastify/jwt' {
  interface JWT {
    /** Verifies HS256/384/512 tokens with JWT_SECRET. */
    hmac?: JWT
    /** Verifies RS, ES and PS tokens with JWT_PUBLIC_KEY. */
    publicKey?: JWT
  }
}

// fast-jwt's codes, as the verifier throws them. VERIFY_ERROR: a signature
// the key could not even check (an ES signature of another curve's length).
const INVALID_CODES = new Set(['FAST_JWT_INVALID_SIGNATURE', 'FAST_JWT_VERIFY_ERROR', 'FAST_JWT_INVALID_KEY', 'FAST_JWT_INVALID_CLAIM_VALUE', 'FAST_JWT_INVALID_CLAIM_TYPE', 'FAST_JWT_MISSING_REQUIRED_CLAIM'])

function failureReason (error: { code?: string }): string {
  if (error.code === 'FAST_JWT_EXPIRED') return 'expired'
  // A clock behind the issuer's makes these: saying so saves a search.
  if (error.code === 'FAST_JWT_INACTIVE') return 'inactive'
  if (error.code === 'FAST_JWT_MISSING_SIGNATURE') return 'unsigned'
  if (error.code !== undefined && INVALID_CODES.has(error.code)) return 'invalid'
  return 'malformed'
}

/** The `alg` of a token's header ('' when it names none), or null when the header does not parse. */
function algorithmOf (token: string): string | null {
  const end = token.indexOf('.')
  if (end <= 0) return null
  try {
    const header: unknown = JSON.parse(Buffer.from(token.slice(0, end), 'base64url').toString())
    if (typeof header !== 'object' || header === null) return null
    const alg = (header as { alg?: unknown }).alg
    return typeof alg === 'string' ? alg : ''
  } catch {
    return null
  }
}

export default fp(async (app) => {
  const { config } = app
  const verifyOptions = {
    ...(config.jwtIssuer !== null ? { allowedIss: config.jwtIssuer } : {}),
    ...(config.jwtAudience !== null ? { allowedAud: config.jwtAudience } : {}),
    // Without this, a token lacking the claim altogether would pass the check.
    requiredClaims: [...(config.jwtIssuer !== null ? ['iss'] : []), ...(config.jwtAudience !== null ? ['aud'] : [])],
    clockTolerance: 0
  }
  // One verifier per kind of key, each built once with a fixed key and its own
  // algorithms, and called synchronously: the key follows the token's
  // algorithm, so an HS token is never checked against the public key
  // (algorithm confusion) and `none` has no key at all. A key callback would
  // decode every token twice and verify it through a callback chain.
  if (config.jwtSecret !== null) {
    await app.register(fastifyJwt, {
      namespace: 'hmac',
      secret: config.jwtSecret,
      verify: { ...verifyOptions, algorithms: [...HMAC_ALGORITHMS] }
    })
  }
  if (config.jwtPublicKey !== null) {
    await app.register(fastifyJwt, {
      namespace: 'publicKey',
      secret: { public: config.jwtPublicKey },
      verify: { ...verifyOptions, algorithms: [...PUBLIC_KEY_ALGORITHMS] }
    })
  }

  /** The verifier for the token's algorithm, or why there is none. */
  const verifierFor = (token: string): JWT | 'malformed' | 'invalid' => {
    const alg = algorithmOf(token)
    if (alg === null) return 'malformed'
    if (names(HMAC_ALGORITHMS, alg)) return app.jwt.hmac ?? 'invalid'
    if (names(PUBLIC_KEY_ALGORITHMS, alg)) return app.jwt.publicKey ?? 'invalid'
    return 'invalid'
  }

  app.decorateRequest('auth', null)

  const unauthorized = (reason: string, message = MESSAGES[reason] ?? 'unauthorized'): Error => {
    app.metrics.authFailure(reason)
    return new errors.Unauthorized(message)
  }

  const cookie = config.jwtCookie
  const allowedOrigins = new Set(config.corsOrigins ?? [])
  /**
   * Only a script's request (EventSource, fetch) of a page of the gateway's
   * own origin, or of an origin CORS allows, as the browser's Fetch Metadata
   * say: a link, a redirect, an image or a form elsewhere, or a link opened
   * from outside the browser, must not open streams as the user. A request
   * without those headers (no browser, or one too old) gets no cookie auth.
   */
  const originMayUseCookie = (request: FastifyRequest): boolean => {
    const headers = request.headers
    if (headers['sec-fetch-dest'] !== 'empty') return false
    const mode = headers['sec-fetch-mode']
    // fetch(url, { mode: 'same-origin' }) says so; only the page's own origin sends it.
    if (headers['sec-fetch-site'] === 'same-origin') return mode === 'cors' || mode === 'same-origin'
    return mode === 'cors' && headers.origin !== undefined && allowedOrigins.has(headers.origin)
  }
  const missingMessage = `no token: send Authorization: Bearer <jwt>, X-Auth-Token or ?token=${cookie !== null ? ` (or, on user routes, the ${cookie} cookie)` : ''}`
  app.addHook('onRequest', async (request) => {
    const level = request.routeOptions.config.auth ?? 'none'
    if (level === 'none') return
    let token = extractToken(request)
    // A browser sends cookies by itself, so another page could make requests
    // with them: the cookie is read only on user routes (streams, job state,
    // the user's subscriptions), only from a script of a page of an allowed
    // origin (a form or a link elsewhere is not one), and it carries no role.
    let fromCookie = false
    if (token === null && cookie !== null && level === 'user') {
      token = cookieValue(request, cookie)
      fromCookie = token !== null
      if (fromCookie && !originMayUseCookie(request)) {
        app.metrics.authFailure('forbidden')
        throw new errors.Forbidden(`the ${cookie} cookie is accepted only from scripts of the gateway's own origin or of one in CORS_ORIGINS`)
      }
    }
    if (token === null) throw unauthorized('missing', missingMessage)
    if (token === '') throw unauthorized('malformed')
    const verifier = verifierFor(token)
    if (typeof verifier === 'string') throw unauthorized(verifier)
    let claims: Claims
    try {
      claims = verifier.verify<Claims>(token)
    } catch (error) {
      request.log.debug({ code: (error as { code?: string }).code, reason: (error as Error).message }, 'token rejected')
      throw unauthorized(failureReason(error as { code?: string }))
    }
    const userId = [claimAt(claims, config.jwtUserClaim), claims.userId, claims.id].find(
      (value) => (typeof value === 'string' && value !== '') || typeof value === 'number'
    )
    if (userId === undefined) throw unauthorized('no-user', 'token has no user id claim')
    if (tooManyCharacters(String(userId))) throw unauthorized('no-user', `the token's user id is longer than ${MAX_ID_CHARACTERS} characters`)
    // Such a user could open streams that no publish, presence or job can name.
    if (typeof userId === 'string' && !isEntityId(userId)) {
      throw unauthorized('no-user', hasLoneSurrogate(userId) ? 'the token\'s user id is not well-formed Unicode' : 'the token\'s user id holds control characters')
    }
    // Log lines name the user of each stream: a token there would be logged whole.
    if (typeof userId === 'string' && holdsDecodableJwt(userId)) throw unauthorized('no-user', 'the token\'s user id holds a JWT, which logs would show')
    // Roles count only in tokens sent explicitly, never in the cookie.
    const roles = fromCookie ? new Set<string>() : rolesOf(claims)
    // A restriction that is not a list of patterns allows nothing rather than everything.
    const topics = claims.topics === undefined
      ? null
      : Array.isArray(claims.topics) ? claims.topics.filter((topic): topic is string => typeof topic === 'string') : []
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
