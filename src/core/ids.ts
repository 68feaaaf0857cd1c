import { randomFillSync } from 'node:crypto'

const ID_BYTES = 12
// Random bytes are drawn for 256 ids at a time, as crypto.randomUUID does:
// each call into OpenSSL costs far more than the 12 bytes (a getpid() fork
// check and a Buffer), and a burst of reconnects opens thousands of streams.
const pool = Buffer.allocUnsafeSlow(ID_BYTES * 256)
let next = pool.length
const ID_PREFIX = 'c_'
const idScratch = Buffer.from(ID_PREFIX + 'x'.repeat(Math.ceil(ID_BYTES / 3) * 4), 'latin1')

/** A stream id: unguessable (96 random bits), URL-safe. */
export function newConnectionId (): string {
  if (next + ID_BYTES > pool.length) {
    randomFillSync(pool)
    next = 0
  }
  const encoded = pool.toString('base64url', next, next + ID_BYTES)
  next += ID_BYTES
  // Written out as one flat string: 'c_' + encoded would be a ConsString over
  // the two, which a Map key is flattened from; every id held (closed ones
  // for HISTORY_TTL_S) would cost ≈ 24 B more.
  idScratch.write(encoded, ID_PREFIX.length, 'latin1')
  return idScratch.toString('latin1')
}

/**
 * A copy of `text` that refers to nothing else. V8 makes a substring of 13
 * characters or more a view into the string it was cut from: a stream's path
 * id or one of its `?topics=` is a view into the request's whole URL, and a
 * browser's URL carries its token. What a stream keeps for its life (and a
 * closed stream's id for HISTORY_TTL_S) would keep the URL and the token too.
 */
export function detachedCopy (text: string): string {
  return Buffer.from(text, 'utf8').toString('utf8')
}
