import { spawn, type ChildProcess } from 'node:child_process'
import { randomBytes } from 'node:crypto'
import Redis from 'ioredis'
import { mkdtemp, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { freePort, listensOn } from './process'

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

class RedisExited extends Error {
  constructor (code: number) {
    super(`redis-server exited with ${code}`)
  }
}

/** A redis-server of the test's own, which it may stop and start again. */
export class OwnRedis {
  private process: ChildProcess | null = null
  /** `args` go before the port and the rest: a config file and `--sentinel`, `--replicaof`… */
  constructor (readonly port: number, private readonly args: string[] = [], private readonly password: string | null = null) {}

  get url (): string {
    return `redis://${this.password === null ? '' : `:${this.password}@`}127.0.0.1:${this.port}`
  }

  async start (): Promise<void> {
    const child = spawn('redis-server', [...this.args, '--port', String(this.port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no'], { stdio: 'ignore' })
    this.process = child
    const deadline = Date.now() + 10_000
    while (Date.now() < deadline) {
      // Only its own answer counts: another test's Redis may hold a port handed out twice.
      if (await redisAnswers(this.url) && await listensOn(child.pid, this.port)) return
      if (child.exitCode !== null) throw new RedisExited(child.exitCode)
      await new Promise((resolve) => setTimeout(resolve, 50))
    }
    await this.stop()
    throw new Error('redis-server did not answer within 10 s')
  }

  /** Freezes the server (SIGSTOP): connections stay up, nothing is answered. */
  freeze (): void {
    this.process?.kill('SIGSTOP')
  }

  thaw (): void {
    this.process?.kill('SIGCONT')
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

/** `args` as OwnRedis takes them: `['--dir', dir]` to save snapshots there and load them at the next start. */
export async function startOwnRedis (t: Pick<Test, 'teardown'>, args: string[] = []): Promise<OwnRedis> {
  for (let attempt = 1; ; attempt++) {
    const redis = new OwnRedis(await freePort(), args)
    t.teardown(async () => await redis.stop())
    try {
      await redis.start()
      return redis
    } catch (error) {
      // Its port taken in between by another test (freePort can hand one out twice): another port.
      if (!(error instanceof RedisExited) || attempt === 3) throw error
    }
  }
}

export interface SentinelGroup {
  /** The name the sentinel knows the master by. */
  masterName: string
  master: OwnRedis
  replica: OwnRedis
  sentinel: OwnRedis
}

/**
 * A master, its replica and one Sentinel watching them (quorum 1), all the
 * test's own and stopped in teardown. Resolves once the sentinel knows the
 * replica is in sync, so a failover can be asked for at once.
 */
export interface SentinelGroupOptions {
  masterName?: string
  /** requirepass of the master and its replica. */
  masterPassword?: string
  /** requirepass of the sentinel. */
  sentinelPassword?: string
}

export async function startSentinelGroup (t: Pick<Test, 'teardown'>, options: SentinelGroupOptions = {}): Promise<SentinelGroup> {
  const masterName = options.masterName ?? 'gateway-master'
  const dir = await mkdtemp(join(tmpdir(), 'sentinel-'))
  t.teardown(async () => await rm(dir, { recursive: true, force: true }))
  const masterPassword = options.masterPassword ?? null
  const auth = masterPassword === null ? [] : ['--requirepass', masterPassword, '--masterauth', masterPassword]
  // The group's own directory: a replica writes the RDB of its full sync there, --save '' or not.
  const dirArgs = ['--dir', dir]
  const started: OwnRedis[] = []
  t.teardown(async () => { for (const server of started.reverse()) await server.stop() })
  const master = new OwnRedis(await freePort(), [...dirArgs, ...auth], masterPassword)
  started.push(master)
  await master.start()
  const replica = new OwnRedis(await freePort(), [...dirArgs, '--replicaof', '127.0.0.1', String(master.port), ...auth], masterPassword)
  started.push(replica)
  await replica.start()
  // Sentinel rewrites its config file as it learns: it must be a file of its own.
  const config = join(dir, 'sentinel.conf')
  await writeFile(config, [
    `sentinel monitor ${masterName} 127.0.0.1 ${master.port} 1`,
    `sentinel down-after-milliseconds ${masterName} 1000`,
    `sentinel failover-timeout ${masterName} 10000`,
    ...(masterPassword === null ? [] : [`sentinel auth-pass ${masterName} ${masterPassword}`]),
    ...(options.sentinelPassword === undefined ? [] : [`requirepass ${options.sentinelPassword}`]),
    ''
  ].join('\n'))
  const sentinel = new OwnRedis(await freePort(), [config, '--sentinel'], options.sentinelPassword ?? null)
  started.push(sentinel)
  await sentinel.start()
  const client = redisClient(t, sentinel.url)
  const deadline = Date.now() + 20_000
  for (;;) {
    const replicas = await client.call('SENTINEL', 'REPLICAS', masterName) as string[][]
    const fields = replicas.map((list) => Object.fromEntries(list.flatMap((value, index) => index % 2 === 0 ? [[value, list[index + 1]]] : [])))
    if (fields.some((replicaFields) => replicaFields.port === String(replica.port) && replicaFields['master-link-status'] === 'ok' && !String(replicaFields.flags).includes('down'))) break
    if (Date.now() > deadline) throw new Error(`the sentinel did not see the replica in sync within 20 s: ${JSON.stringify(fields)}`)
    await new Promise((resolve) => setTimeout(resolve, 100))
  }
  return { masterName, master, replica, sentinel }
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
