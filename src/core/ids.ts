import { randomFillSync } from 'node:crypto'

const ID_BYTES = 12
// Random bytes are drawn for 256 ids at a time, as crypto.randomUUID does:
// each call into OpenSSL costs far more than the 12 bytes (a getpid() fork
// check and a Buffer), and a burst of reconnects opens thousands of streams.
const pool = Buffer.allocUnsafeSlow(ID_BYTES * 256)
let next = pool.length

/** A stream id: unguessable (96 random bits), URL-safe. */
export function newConnectionId (): string {
  if (next + ID_BYTES > pool.length) {
    randomFillSync(pool)
    next = 0
  }
  const id = `c_${pool.toString('base64url', next, next + ID_BYTES)}`
  next += ID_BYTES
  return id
}
