/**
 * Builds and starts a gateway inside the test process. Mode-agnostic: pass
 * `REDIS_URL` (and a `REDIS_PREFIX` of the test's own) in `env` for Redis mode.
 */
import { Writable } from 'node:stream'
import type { FastifyInstance } from 'fastify'
import { buildApp, listenInternal } from '../../src/app'
import { loadConfig, type Config } from '../../src/config'
import type { Admission } from '../../src/core/state'
import { closeStreamsTo } from './sse'

/** What the helpers need of a tap test: somewhere to register clean-up. */
export interface TestLike {
  teardown: (fn: () => unknown) => void
}

export const TEST_SECRET = 'test-secret-of-at-least-32-bytes'

/** A config for tests: a known secret, no logs, an ephemeral port on loopback; `env` overrides. */
export function testConfig (env: Record<string, string> = {}): Config {
  return loadConfig({
    JWT_SECRET: TEST_SECRET,
    LOG_LEVEL: 'silent',
    PORT: '0',
    HOST: '127.0.0.1',
    ...env
  })
}

export interface GatewayOptions {
  /** Capture every log line (level `trace` unless `env.LOG_LEVEL` says otherwise). */
  captureLogs?: boolean
  instanceId?: string
}

export interface Gateway {
  app: FastifyInstance
  /** `http://127.0.0.1:<port>`, no trailing slash. */
  url: string
  port: number
  /** Captured log lines (empty unless `captureLogs`). */
  logs: string[]
  logText: () => string
}

/** Starts the app's internal listener (INTERNAL_PORT set) on an ephemeral port of 127.0.0.1; resolves with the port. */
export async function listenInternalPort (app: FastifyInstance): Promise<number> {
  const address = (await listenInternal(app, 0, '127.0.0.1')).address()
  if (address === null || typeof address === 'string') throw new Error('the internal listener has no TCP address')
  return address.port
}

/**
 * The captured log lines whose `msg` is `msg`, parsed. A child's stdout read
 * from its pipe may end in half a line, which no JSON parse takes: left out.
 */
export function loggedAs<T> (logText: string, msg: string): T[] {
  const lines = logText.split('\n')
  const cutShort = lines.pop() ?? ''
  const parsed = lines.filter((line) => line !== '').map((line) => JSON.parse(line) as T & { msg: string })
  try {
    if (cutShort !== '') parsed.push(JSON.parse(cutShort))
  } catch {}
  return parsed.filter((line) => line.msg === msg)
}

/** A Writable that keeps each line pino writes. */
export function logCollector (): { stream: Writable, lines: string[] } {
  const lines: string[] = []
  let partial = ''
  const stream = new Writable({
    write (chunk: Buffer | string, _encoding, callback) {
      const text = partial + chunk.toString()
      const parts = text.split('\n')
      partial = parts.pop() ?? ''
      for (const line of parts) if (line !== '') lines.push(line)
      callback()
    }
  })
  return { stream, lines }
}

/**
 * Builds the app from `testConfig(env)`, listens on an ephemeral port and
 * closes the app (and every test stream opened to it) in teardown.
 */
export async function startGateway (t: TestLike, env: Record<string, string> = {}, options: GatewayOptions = {}): Promise<Gateway> {
  const collector = options.captureLogs === true ? logCollector() : null
  const config = testConfig(collector !== null && env.LOG_LEVEL === undefined ? { ...env, LOG_LEVEL: 'trace' } : env)
  const app = await buildApp(config, {
    ...(collector !== null ? { logStream: collector.stream } : {}),
    ...(options.instanceId !== undefined ? { instanceId: options.instanceId } : {})
  })
  let url = ''
  t.teardown(async () => {
    if (url !== '') closeStreamsTo(url)
    await app.close()
  })
  await app.listen({ port: 0, host: '127.0.0.1' })
  const address = app.server.address()
  if (address === null || typeof address === 'string') throw new Error('the gateway has no TCP address')
  url = `http://127.0.0.1:${address.port}`
  const logs = collector?.lines ?? []
  return { app, url, port: address.port, logs, logText: () => logs.join('\n') }
}

/**
 * Polls a state check until it holds or the deadline passes (for state that no
 * event announces, such as the registry emptying after a socket closes).
 */
export async function eventually (
  check: () => boolean | Promise<boolean>,
  what: string,
  timeoutMs = 5000,
  intervalMs = 10
): Promise<void> {
  const deadline = Date.now() + timeoutMs
  for (;;) {
    if (await check()) return
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`)
    await new Promise<void>((resolve) => setTimeout(resolve, intervalMs))
  }
}

/**
 * The next admission on `gateway` goes through `around`, which gets the real
 * one (`admit`) to run when it chooses, and answers for it: to open other
 * streams before or after it, or to refuse instead. Later ones are as usual.
 */
export function interceptNextAdmission (t: TestLike, gateway: Gateway, around: (admit: () => Promise<Admission>) => Promise<Admission>): void {
  const state = gateway.app.state
  const admit = state.admit.bind(state)
  state.admit = async (request) => {
    state.admit = admit
    return await around(async () => await admit(request))
  }
  t.teardown(() => {
    state.admit = admit
  })
}
