import { randomBytes } from 'node:crypto'

/** A stream id: unguessable, URL-safe. */
export function newConnectionId (): string {
  return `c_${randomBytes(12).toString('base64url')}`
}
