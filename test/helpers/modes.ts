/**
 * One test body, both engines: `forEachMode(t, 'name', async (t, mode) => …)`
 * runs it in embedded mode and in Redis mode; `startCluster` starts one or
 * more gateways that share a Redis prefix (in embedded mode, exactly one).
 */
import type { Test } from 'tap'
import { startGateway, type Gateway, type GatewayOptions } from './gateway'
import { needRedis, REDIS_URL, uniquePrefix } from './redis'

export type Mode = 'memory' | 'redis'
export const MODES: Mode[] = ['memory', 'redis']

/** Env for a gateway in `mode`; instances given the same prefix form one cluster. */
export function modeEnv (mode: Mode, prefix: string, env: Record<string, string> = {}): Record<string, string> {
  if (mode === 'memory') return env
  // Short instance TTL so tests about dead instances finish quickly.
  return { REDIS_URL, REDIS_PREFIX: prefix, INSTANCE_TTL_MS: '3000', ...env }
}

/** Runs `body` once per mode as subtests `<name> [memory]` and `<name> [redis]`. */
export function forEachMode (t: Test, name: string, body: (t: Test, mode: Mode) => Promise<void>, modes: Mode[] = MODES): void {
  for (const mode of modes) {
    t.test(`${name} [${mode}]`, async (t) => {
      if (mode === 'redis' && !(await needRedis(t))) return
      await body(t, mode)
    })
  }
}

/** `count` gateways of one cluster (Redis mode), or a single one (embedded mode). */
export async function startCluster (t: Test, mode: Mode, count = 1, env: Record<string, string> = {}, options: GatewayOptions = {}): Promise<Gateway[]> {
  if (mode === 'memory' && count > 1) throw new Error('embedded mode is one process')
  const prefix = uniquePrefix(t.name.replace(/[^A-Za-z0-9]/g, '').slice(0, 20) || 't')
  const gateways: Gateway[] = []
  for (let index = 0; index < count; index++) {
    gateways.push(await startGateway(t, modeEnv(mode, prefix, env), options))
  }
  return gateways
}
