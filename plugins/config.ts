import fp from 'fastify-plugin'
import type { Config } from '../src/config'

declare module 'fastify' {
  interface FastifyInstance {
    config: Config
  }
}

const MIN_SECRET_BYTES = 32

export default fp<{ config: Config }>(async (app, opts) => {
  app.decorate('config', opts.config)
  const secret = opts.config.jwtSecret
  // Used as given; a newline a secret file left at its end is the usual cause.
  if (secret !== null && secret !== secret.trim()) {
    app.log.warn({}, 'JWT_SECRET begins or ends with whitespace; it is used as given, so tokens must be signed with exactly that')
  }
  // RFC 7518 §3.2: an HS256 key is at least as long as its hash. A short one
  // can be guessed offline from any token a user holds, and then tokens forged.
  if (secret !== null && Buffer.byteLength(secret) < MIN_SECRET_BYTES) {
    app.log.warn({ bytes: Buffer.byteLength(secret) }, `JWT_SECRET is shorter than ${MIN_SECRET_BYTES} bytes: anyone holding a token could guess it offline and forge others (e.g. openssl rand -base64 32)`)
  }
}, { name: 'config' })
