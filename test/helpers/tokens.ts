/**
 * JWTs for tests, minted with node:crypto only: HS256 with a shared secret,
 * RS256/ES256 with generated key pairs, and unsigned `alg: none` tokens.
 */
import { createHmac, generateKeyPairSync, sign, type KeyObject } from 'node:crypto'
import { TEST_SECRET } from './gateway'

export type Claims = Record<string, unknown>
export type Algorithm = 'HS256' | 'RS256' | 'ES256' | 'none'

export interface TokenOptions {
  alg?: Algorithm
  /** HS256 secret (default: the test secret). */
  secret?: string
  /** RS256/ES256 private key. */
  privateKey?: KeyObject
  /** Extra or replaced header fields. */
  header?: Record<string, unknown>
  /** Seconds until `exp` (default 3600); null: no `exp` claim. Ignored when `claims.exp` is given. */
  ttlS?: number | null
}

const encode = (value: unknown): string => Buffer.from(JSON.stringify(value)).toString('base64url')

export function nowS (): number {
  return Math.floor(Date.now() / 1000)
}

/**
 * An `exp` at least `seconds` from now. `nowS() + seconds` is not: the
 * current second may be nearly over, and a token minted then with
 * `nowS() + 1` can expire before its stream is even opened (401).
 */
export function secondsAhead (seconds: number): number {
  return Math.ceil(Date.now() / 1000) + seconds
}

/**
 * Signs `claims` (with `iat`, and `exp` unless told otherwise). A claim set to
 * `undefined` is left out.
 */
export function token (claims: Claims = {}, options: TokenOptions = {}): string {
  const alg = options.alg ?? 'HS256'
  const payload: Claims = { iat: nowS() }
  if (options.ttlS !== null) payload.exp = nowS() + (options.ttlS ?? 3600)
  for (const [name, value] of Object.entries(claims)) {
    if (value === undefined) delete payload[name]
    else payload[name] = value
  }
  const header = { alg, typ: 'JWT', ...options.header }
  const unsigned = `${encode(header)}.${encode(payload)}`
  return `${unsigned}.${signature(unsigned, alg, options)}`
}

function signature (unsigned: string, alg: Algorithm, options: TokenOptions): string {
  switch (alg) {
    case 'none':
      return ''
    case 'HS256':
      return createHmac('sha256', options.secret ?? TEST_SECRET).update(unsigned).digest('base64url')
    case 'RS256':
    case 'ES256': {
      if (options.privateKey === undefined) throw new Error(`${alg} needs a privateKey`)
      const key = alg === 'ES256' ? { key: options.privateKey, dsaEncoding: 'ieee-p1363' as const } : options.privateKey
      return sign('sha256', Buffer.from(unsigned), key).toString('base64url')
    }
  }
}

/** A plain user's token. */
export function userToken (sub: string, claims: Claims = {}): string {
  return token({ sub, ...claims })
}

export function publisherToken (sub = 'backend'): string {
  return token({ sub, roles: ['publisher'] })
}

export function adminToken (sub = 'operator'): string {
  return token({ sub, roles: ['admin'] })
}

export interface KeyPair {
  privateKey: KeyObject
  /** SPKI PEM, as JWT_PUBLIC_KEY takes it. */
  publicKeyPem: string
}

export function rsaKeyPair (): KeyPair {
  const { privateKey, publicKey } = generateKeyPairSync('rsa', { modulusLength: 2048 })
  return { privateKey, publicKeyPem: publicKey.export({ type: 'spki', format: 'pem' }).toString() }
}

export function ecKeyPair (): KeyPair {
  const { privateKey, publicKey } = generateKeyPairSync('ec', { namedCurve: 'P-256' })
  return { privateKey, publicKeyPem: publicKey.export({ type: 'spki', format: 'pem' }).toString() }
}
