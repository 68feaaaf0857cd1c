import { spawn, type ChildProcess } from 'node:child_process'
import { randomBytes } from 'node:crypto'
import Redis from 'ioredis'
import { freePort } from './process'

import type { Test } from 'tap'

export const REDIS_URL = process.env.REDIS_TEST_URL ?? 'redis://127.0.0.1:6379'

/** A key prefix no other test uses, so tests can share one Redis. */
export function uniquePrefix (name = 't'): string {
  return `test:${name}:${randomBytes(4).toString('hex')}:`
}

export async function redisAnswers (url = REDIS_URL): Promise<boolean> {
  const client = new Redis(url, { lazyConnect: true, maxRetriesPerRequest: 0, retryStrategy: () => null, enableOfflineQueue: false })
  client.on('error', () => {})
  try {
    await client.connect()
    return await client.ping() === 'PONG'
  } catch {
    return false
  } finally {
    client.disconnect()
  }
}

/**
 * Redis-mode tests run when a Redis answers. In CI they must never be skipped:
 * a missing Redis there is a failure.
 */
export async function needRedis (t: Test): Promise<boolean> {
  if (await redisAnswers()) return true
  if (process.env.CI === 'true') t.fail(`no Redis at ${REDIS_URL} (CI must provide one)`)
  else t.plan(0, `skipped: no Redis at ${REDIS_URL}`)
  return false
}

/** A redis-server of the test's own, which it may stop and start again. */
export class OwnRedis {
  private process: ChildProcess | null = null
  constructor (readonly port: number) {}

  get url (): string {
    return `redis://127.0.0.1:${this.port}`
  }

  async start (): Promise<void> {
    const child = spawn('redis-server', ['--port', String(this.port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no'], { stdio: 'ignore' })
    this.process = child
    const deadline = Date.now() + 10_000
    while (Date.now() < deadline) {
      if (await redisAnswers(this.url)) return
      if (child.exitCode !== null) throw new Error(`redis-server exited with ${child.exitCode}`)
      await new Promise((resolve) => setTimeout(resolve, 50))
    }
    throw new Error('redis-server did not answer within 10 s')
  }

  async stop (): Promise<void> {
    const child = this.process
    this.process = null
    if (child === null || child.exitCode !== null) return
    const exited = new Promise((resolve) => child.once('exit', resolve))
    child.kill('SIGKILL')
    await exited
  }
}

export async function startOwnRedis (t: Pick<Test, 'teardown'>): Promise<OwnRedis> {
  const redis = new OwnRedis(await freePort())
  await redis.start()
  t.teardown(async () => await redis.stop())
  return redis
}

/** A plain client for a test to look at or drive Redis directly; closed in teardown. */
export function redisClient (t: Pick<Test, 'teardown'>, url = REDIS_URL): Redis {
  const client = new Redis(url)
  client.on('error', () => {})
  t.teardown(() => client.disconnect())
  return client
}

/** How many connections are subscribed to `channel` (PUBSUB NUMSUB). */
export async function subscriberCount (redis: Redis, channel: string): Promise<number> {
  const [, count] = await redis.pubsub('NUMSUB', channel) as [string, number]
  return Number(count)
}
