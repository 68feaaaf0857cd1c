/** HS256 JWTs signed with node:crypto, as scripts/token.js does. */
import { createHmac } from 'node:crypto'

export function signToken (secret: string, claims: Record<string, unknown>, ttlS = 86400): string {
  const now = Math.floor(Date.now() / 1000)
  const encode = (value: unknown): string => Buffer.from(JSON.stringify(value)).toString('base64url')
  const unsigned = `${encode({ alg: 'HS256', typ: 'JWT' })}.${encode({ iat: now, exp: now + ttlS, ...claims })}`
  return `${unsigned}.${createHmac('sha256', secret).update(unsigned).digest('base64url')}`
}

/** One token per user `{prefix}0..{prefix}{users-1}`; streams cycle through them. */
export function userTokens (secret: string, users: number, prefix = 'bench-u'): string[] {
  return Array.from({ length: users }, (_, index) => signToken(secret, { sub: `${prefix}${index}` }))
}
