import fp from 'fastify-plugin'
import { hostname } from 'node:os'
import { randomBytes } from 'node:crypto'
import { Registry } from '../src/core/registry'

declare module 'fastify' {
  interface FastifyInstance {
    /** This process's open streams. */
    registry: Registry
  }
}

export function newInstanceId (): string {
  return `${hostname()}-${process.pid}-${randomBytes(3).toString('hex')}`
}

export default fp<{ instanceId?: string }>(async (app, opts) => {
  app.decorate('registry', new Registry(opts.instanceId ?? newInstanceId()))
}, { name: 'registry' })
