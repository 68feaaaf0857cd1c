/**
 * Preloaded (`node -r`) into a server process by a test: the first require
 * of `fastify` says so on stderr, then holds the thread for SLOW_LOAD_MS (as
 * a slow disk or a cold cache would), so that a signal can be sent while
 * the server's modules load.
 */
import Module from 'node:module'

const holdMs = Number(process.env.SLOW_LOAD_MS ?? '3000')
// Node's module loader; not in the typings.
const loader = Module as unknown as { _load: (request: string, ...rest: unknown[]) => unknown }
const load = loader._load
let held = false
loader._load = function (this: unknown, request: string, ...rest: unknown[]): unknown {
  if (!held && request === 'fastify') {
    held = true
    process.stderr.write('loading fastify\n')
    const until = Date.now() + holdMs
    while (Date.now() < until) {
      // Holding the thread is the point.
    }
  }
  return load.call(this, request, ...rest)
}
