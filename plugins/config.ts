import fp from 'fastify-plugin'
import type { Config } from '../src/config'

declare module 'fastify' {
  interface FastifyInstance {
    config: Config
  }
}

export default fp<{ config: Config }>(async (app, opts) => {
  app.decorate('config', opts.config)
  const secret = opts.config.jwtSecret
  // Used as given; a newline a secret file left at its end is the usual cause.
  if (secret !== null && secret !== secret.trim()) {
    app.log.warn({}, 'JWT_SECRET begins or ends with whitespace; it is used as given, so tokens must be signed with exactly that')
  }
}, { name: 'config' })
