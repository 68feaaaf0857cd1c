/**
 * The gateway's configuration: every environment variable it reads, parsed and
 * validated once at start-up. Nothing else in the code base reads `process.env`.
 */

import { createPublicKey } from 'node:crypto'
import { isIP } from 'node:net'
import type { LimitPolicy } from './core/state'

export type LogLevel = 'fatal' | 'error' | 'warn' | 'info' | 'debug' | 'trace' | 'silent'

export interface Config {
  port: number
  host: string
  internalPort: number | null
  jwtSecret: string | null
  jwtPublicKey: string | null
  jwtIssuer: string | null
  jwtAudience: string | null
  jwtUserClaim: string
  /** Cookie that may carry a user's token on GET routes (EventSource withCredentials), or null. */
  jwtCookie: string | null
  redisUrl: string | null
  /** Sentinels to ask for the master that REDIS_URL's host names; empty: REDIS_URL is the server. */
  redisSentinels: RedisSentinel[]
  redisSentinelPassword: string | null
  redisPrefix: string
  corsOrigins: string[] | null
  keepaliveMs: number
  retryMs: number
  historySize: number
  historyTtlS: number
  historyMaxBytes: number
  maxConnections: number
  maxConnectionsPerUser: number
  connectionLimitPolicy: LimitPolicy
  maxBufferedBytes: number
  maxEventBytes: number
  maxBodyBytes: number
  /** Channels one publish may write to, summed over its events. */
  maxPublishChannels: number
  presenceGraceMs: number
  jobTtlS: number
  shutdownTimeoutMs: number
  /** Topics one stream may hold, and user-wide topics one user may hold. */
  maxTopics: number
  logLevel: LogLevel
  /** Stream opens allowed per client address and minute (0 disables). */
  rateLimitStreamsPerMin: number
  /** Publish-route requests allowed per client address and minute (0 disables). */
  rateLimitPublishPerMin: number
  /** Proxies whose X-Forwarded-For is believed (comma list of addresses/CIDRs), or null. */
  trustProxy: string[] | null
  /** How long an instance's record in Redis outlives its last heartbeat. */
  instanceTtlMs: number
  /** How long a publish's Idempotency-Key is remembered. */
  idempotencyWindowS: number
  /** How long start-up waits for Redis to answer before giving up. */
  redisStartupTimeoutMs: number
  redisCommandTimeoutMs: number
}

export interface RedisSentinel {
  host: string
  port: number
}

export class ConfigError extends Error {
  constructor (readonly variable: string, reason: string) {
    super(`invalid configuration: ${variable} ${reason}`)
    this.name = 'ConfigError'
  }
}

type Env = Record<string, string | undefined>

function read (env: Env, name: string): string | undefined {
  const value = env[name]
  return value === undefined || value.trim() === '' ? undefined : value.trim()
}

function integer (env: Env, name: string, fallback: number, min: number, max = Number.MAX_SAFE_INTEGER): number {
  const raw = read(env, name)
  if (raw === undefined) return fallback
  if (!/^\d+$/.test(raw)) throw new ConfigError(name, `must be a whole number, got "${raw.slice(0, 40)}"`)
  const value = Number(raw)
  if (value < min || value > max) throw new ConfigError(name, `must be between ${min} and ${max}, got ${value}`)
  return value
}

/**
 * HISTORY_MAX_BYTES: 0 (no cap), or at least 64 KB and twice the largest
 * event's data: an event larger than the cap leaves history at the next
 * publish, and every reconnect that needed it gets `reset`. The floor only
 * keeps the cap clear of the plain cases: an event costs more than its data
 * (each line of data is framed as its own `data:` line, each channel adds
 * an entry and a record) and the memory bus reserves a table of marks of
 * up to a sixth of the cap.
 */
function historyBytes (env: Env, maxEventBytes: number): number {
  const least = Math.max(65_536, 2 * maxEventBytes)
  const value = integer(env, 'HISTORY_MAX_BYTES', Math.max(256 * 1024 * 1024, 4 * maxEventBytes), 0)
  if (value !== 0 && value < least) throw new ConfigError('HISTORY_MAX_BYTES', `must be 0 (no cap) or at least ${least} (64 KB, and twice MAX_EVENT_BYTES), got ${value}`)
  return value
}

function port (env: Env, name: string, fallback: number): number
function port (env: Env, name: string, fallback: null): number | null
function port (env: Env, name: string, fallback: number | null): number | null {
  const raw = read(env, name)
  if (raw === undefined) return fallback
  return integer(env, name, 0, 0, 65535)
}

function oneOf<T extends string> (env: Env, name: string, fallback: T, allowed: readonly T[]): T {
  const raw = read(env, name)
  if (raw === undefined) return fallback
  if (!(allowed as readonly string[]).includes(raw)) {
    throw new ConfigError(name, `must be one of ${allowed.join(', ')}, got "${raw.slice(0, 40)}"`)
  }
  return raw as T
}

function list (env: Env, name: string): string[] | null {
  const raw = read(env, name)
  if (raw === undefined) return null
  const items = raw.split(',').map((item) => item.trim()).filter((item) => item !== '')
  return items.length === 0 ? null : items
}

// Checked here, so a bad value stops the start with the variable's name
// rather than as an error from deep inside the JWT or Redis client.
/** Curves of the ES algorithms the verifier accepts (ES256, ES384, ES512). */
const ES_CURVES = new Set(['prime256v1', 'secp384r1', 'secp521r1'])

/** Why a PEM cannot verify RS/PS/ES tokens, or null when it can. */
function publicKeyProblem (pem: string): string | null {
  // A private key would verify too, but has no business in the gateway's environment.
  if (!pem.includes('-----BEGIN') || pem.includes('PRIVATE KEY-----')) return 'must be a PEM public key'
  let key
  try {
    key = createPublicKey(pem)
  } catch {
    return 'must be a PEM public key'
  }
  // Found here rather than by the verifier at start, whose error names no variable.
  const type = key.asymmetricKeyType
  // fast-jwt reads only rsaEncryption keys, not RSASSA-PSS ones.
  if (type === 'rsa') return null
  if (type === 'ec' && ES_CURVES.has(key.asymmetricKeyDetails?.namedCurve ?? '')) return null
  const kind = type === 'ec'
    ? `an EC key on ${key.asymmetricKeyDetails?.namedCurve ?? 'an unknown curve'}`
    : type === undefined ? 'a key of unknown type' : `a ${type} key`
  return `must be an RSA key or an EC key on P-256, P-384 or P-521 (RS*, PS*, ES* tokens); this is ${kind}`
}

/** REDIS_SENTINELS: `host[:port]` (26379 by default), comma-separated; IPv6 hosts in brackets. */
function sentinels (env: Env, redisUrl: string | null): RedisSentinel[] {
  const raw = read(env, 'REDIS_SENTINELS')
  if (raw === undefined) return []
  if (redisUrl === null) throw new ConfigError('REDIS_SENTINELS', 'needs REDIS_URL=redis://[:password@]<master name>[/database number]')
  const url = new URL(redisUrl)
  // Sidekiq's and redis-rb's convention: with sentinels, the URL's host is the master group's name.
  if (url.port !== '') throw new ConfigError('REDIS_URL', 'takes no port with REDIS_SENTINELS: its host names the master group the sentinels know')
  if (url.protocol === 'rediss:') throw new ConfigError('REDIS_URL', 'rediss:// (TLS) is not supported with REDIS_SENTINELS')
  return raw.split(',').map((entry) => {
    const match = /^(?:\[([0-9A-Fa-f:.]+)\]|([A-Za-z0-9.-]+))(?::(\d{1,5}))?$/.exec(entry.trim())
    const port = Number(match?.[3] ?? 26379)
    if (match === null || port < 1 || port > 65535) {
      throw new ConfigError('REDIS_SENTINELS', `must be a comma-separated list of host[:port], got "${entry.trim().slice(0, 40)}"`)
    }
    return { host: match[1] ?? match[2], port }
  })
}

function isRedisUrl (text: string): boolean {
  try {
    const url = new URL(text)
    return url.hostname !== '' && /^(\/\d*)?$/.test(url.pathname)
  } catch {
    return false
  }
}

// proxy-addr's names for address ranges, as Fastify's trustProxy takes them.
const PROXY_RANGE_NAMES = new Set(['loopback', 'linklocal', 'uniquelocal'])

function isProxyEntry (entry: string): boolean {
  if (PROXY_RANGE_NAMES.has(entry)) return true
  const [address, prefix, extra] = entry.split('/')
  const family = isIP(address)
  if (family === 0 || extra !== undefined) return false
  if (prefix === undefined) return true
  return /^\d{1,3}$/.test(prefix) && Number(prefix) <= (family === 4 ? 32 : 128)
}

function proxyList (env: Env): string[] | null {
  const entries = list(env, 'TRUST_PROXY')
  const bad = entries?.find((entry) => !isProxyEntry(entry))
  if (bad !== undefined) throw new ConfigError('TRUST_PROXY', `holds "${bad.slice(0, 60)}", not an address or CIDR like 10.0.0.0/8`)
  return entries
}

// RFC 6265's cookie-name characters (an HTTP token).
const COOKIE_NAME = /^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,64}$/

function cookieName (env: Env): string | null {
  const value = read(env, 'JWT_COOKIE')
  if (value === undefined) return null
  if (!COOKIE_NAME.test(value)) throw new ConfigError('JWT_COOKIE', 'must be a cookie name (1-64 letters, digits or !#$%&\'*+.^_`|~-)')
  return value
}

/** URL.parse, which Node 20's earlier releases lack. */
function urlOf (text: string): URL | null {
  try {
    return new URL(text)
  } catch {
    return null
  }
}

export function loadConfig (env: Env = process.env): Config {
  // Byte for byte, spaces included: the service that signs the tokens uses
  // the value it was given as it is, and a trimmed copy would refuse them all.
  const jwtSecret = read(env, 'JWT_SECRET') === undefined ? null : env.JWT_SECRET as string
  // Keys are often passed through env files with literal "\n" sequences.
  const jwtPublicKey = read(env, 'JWT_PUBLIC_KEY')?.replace(/\\n/g, '\n') ?? null
  if (jwtSecret === null && jwtPublicKey === null) {
    throw new ConfigError('JWT_SECRET', 'is required (or set JWT_PUBLIC_KEY)')
  }
  const keyProblem = jwtPublicKey === null ? null : publicKeyProblem(jwtPublicKey)
  if (keyProblem !== null) throw new ConfigError('JWT_PUBLIC_KEY', keyProblem)
  const redisUrl = read(env, 'REDIS_URL') ?? null
  if (redisUrl !== null && !/^rediss?:\/\//.test(redisUrl)) {
    throw new ConfigError('REDIS_URL', 'must start with redis:// or rediss://')
  }
  if (redisUrl !== null && !isRedisUrl(redisUrl)) {
    throw new ConfigError('REDIS_URL', 'must be redis[s]://[user:password@]host[:port][/database number]')
  }
  const redisSentinels = sentinels(env, redisUrl)
  // Empty means unset, as for every variable: no prefix at all would put the
  // gateway's keys (`id`, `epoch`, `instances`…) among an application's own.
  const redisPrefix = read(env, 'REDIS_PREFIX') ?? 'sse:'
  if (!/^[A-Za-z0-9_.:{}-]{1,64}$/.test(redisPrefix)) {
    throw new ConfigError('REDIS_PREFIX', 'may hold only A-Z a-z 0-9 _ . : { } - (at most 64)')
  }
  // The ingress listens to every channel named stream:* (seed 000's channels,
  // outside the prefix): it would take the gateway's own for ingress messages.
  if (redisPrefix.startsWith('stream:')) {
    throw new ConfigError('REDIS_PREFIX', 'may not start with "stream:", the ingress channels\' names')
  }
  // As a browser writes its Origin header: the host in lower case, no
  // default port. Listed as typed, `https://App.example.com:443` would never match.
  const corsOrigins = list(env, 'CORS_ORIGINS')?.map((origin) => {
    if (origin === '*') return origin
    const parsed = /^https?:\/\/[^/\s]+$/.test(origin) ? urlOf(origin) : null
    if (parsed === null) throw new ConfigError('CORS_ORIGINS', `holds "${origin.slice(0, 60)}", not an origin like https://app.example.com or *`)
    return parsed.origin
  }) ?? null
  const keepaliveMs = integer(env, 'KEEPALIVE_MS', 15000, 100, 3_600_000)
  const maxEventBytes = integer(env, 'MAX_EVENT_BYTES', 262144, 1)
  const config: Config = {
    port: port(env, 'PORT', 3000),
    host: read(env, 'HOST') ?? '0.0.0.0',
    internalPort: port(env, 'INTERNAL_PORT', null),
    jwtSecret,
    jwtPublicKey,
    jwtIssuer: read(env, 'JWT_ISSUER') ?? null,
    jwtAudience: read(env, 'JWT_AUDIENCE') ?? null,
    jwtUserClaim: read(env, 'JWT_USER_CLAIM') ?? 'sub',
    jwtCookie: cookieName(env),
    redisUrl,
    redisSentinels,
    redisSentinelPassword: read(env, 'REDIS_SENTINEL_PASSWORD') ?? null,
    redisPrefix,
    corsOrigins,
    keepaliveMs,
    retryMs: integer(env, 'RETRY_MS', 3000, 0, 3_600_000),
    historySize: integer(env, 'HISTORY_SIZE', 1000, 0, 1_000_000),
    historyTtlS: integer(env, 'HISTORY_TTL_S', 3600, 1, 30 * 86400),
    historyMaxBytes: historyBytes(env, maxEventBytes),
    maxConnections: integer(env, 'MAX_CONNECTIONS', 100000, 1),
    maxConnectionsPerUser: integer(env, 'MAX_CONNECTIONS_PER_USER', 20, 1),
    connectionLimitPolicy: oneOf(env, 'CONNECTION_LIMIT_POLICY', 'reject', ['reject', 'evict-oldest'] as const),
    maxBufferedBytes: integer(env, 'MAX_BUFFERED_BYTES', 1048576, 1024),
    maxEventBytes,
    maxBodyBytes: integer(env, 'MAX_BODY_BYTES', 1048576, 64),
    maxPublishChannels: integer(env, 'MAX_PUBLISH_CHANNELS', 100000, 1),
    presenceGraceMs: integer(env, 'PRESENCE_GRACE_MS', 2000, 0, 3_600_000),
    jobTtlS: integer(env, 'JOB_TTL_S', 86400, 1),
    shutdownTimeoutMs: integer(env, 'SHUTDOWN_TIMEOUT_MS', 10000, 100, 3_600_000),
    maxTopics: integer(env, 'MAX_TOPICS', 256, 1, 10_000),
    logLevel: oneOf(env, 'LOG_LEVEL', 'info', ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'] as const),
    rateLimitStreamsPerMin: integer(env, 'RATE_LIMIT_STREAMS_PER_MIN', 0, 0),
    rateLimitPublishPerMin: integer(env, 'RATE_LIMIT_PUBLISH_PER_MIN', 0, 0),
    trustProxy: proxyList(env),
    instanceTtlMs: integer(env, 'INSTANCE_TTL_MS', 10000, 1000, 600_000),
    redisStartupTimeoutMs: integer(env, 'REDIS_STARTUP_TIMEOUT_MS', 30000, 0, 3_600_000),
    redisCommandTimeoutMs: integer(env, 'REDIS_COMMAND_TIMEOUT_MS', 5000, 100, 600_000),
    idempotencyWindowS: integer(env, 'IDEMPOTENCY_WINDOW_S', 600, 1, 86_400)
  }
  // Any site could then read a user's streams with the browser's cookie.
  if (config.jwtCookie !== null && config.corsOrigins?.includes('*') === true) {
    throw new ConfigError('JWT_COOKIE', 'cannot be used with CORS_ORIGINS=*: list the origins allowed to use the cookie')
  }
  if (config.internalPort !== null && config.internalPort !== 0 && config.internalPort === config.port) {
    throw new ConfigError('INTERNAL_PORT', 'must differ from PORT')
  }
  return config
}

/**
 * How long a stop waits on connections (streams flushing their last frames,
 * requests in flight) before it cuts them: 5 s, or half of
 * SHUTDOWN_TIMEOUT_MS if less, so that Redis is still closed in time.
 */
export function closeGraceMs (config: Pick<Config, 'shutdownTimeoutMs'>): number {
  return Math.min(5000, Math.floor(config.shutdownTimeoutMs / 2))
}

/**
 * How long after SIGTERM the process exits if the stop has not ended by
 * then: SHUTDOWN_TIMEOUT_MS less a share for the last log lines.
 */
export function stopByMs (config: Pick<Config, 'shutdownTimeoutMs'>): number {
  return config.shutdownTimeoutMs - Math.min(500, Math.floor(config.shutdownTimeoutMs / 4))
}
