/**
 * Reaping a silent instance (RedisState.reap, run by the lease holder) takes
 * one REAP script per user, then forgets the instance's list and its place
 * among the instances. An instance that was only cut off may beat again
 * meanwhile and rejoin its streams: the rest of the reap must leave them,
 * and its list, alone. The instance is a gateway reaching Redis through a
 * fault proxy; the reaper is a RedisState the test drives, held after its
 * first REAP until the instance is back.
 */
import { randomBytes } from 'node:crypto'
import t, { type Test } from 'tap'
import Redis from 'ioredis'
import { Registry } from '../src/core/registry'
import { redisOptions, ScriptedRedis, type ScriptName } from '../src/core/redis/client'
import { RedisState } from '../src/core/redis/redis-state'
import { eventually, openConnected, startGateway, userToken } from './helpers'
import { FaultyProxy } from './helpers/proxy'
import { needRedis, redisClient, REDIS_URL, uniquePrefix } from './helpers/redis'
import { within } from './helpers/wait'

const INSTANCE_TTL_MS = 3000
const WAIT_MS = 5000
const redisPort = Number(new URL(REDIS_URL).port || 6379)

interface Reaper {
  state: RedisState
  /** Users announced offline by the reaper, in order. */
  offline: string[]
  /** Resolves with the user of the first REAP once it has run; the reap then waits for `resume()`. */
  pausedAfterFirstReap: Promise<string>
  resume: () => void
}

/**
 * A RedisState of the cluster on a connection of its own, as the lease holder
 * has, whose reap stops after the first user's REAP until `resume()`.
 */
async function reaperOf (t: Test, prefix: string, listening = true): Promise<Reaper> {
  const commands = new ScriptedRedis(REDIS_URL)
  // Never connected: reaping uses the commands connection only.
  const subscriber = new Redis(REDIS_URL, { ...redisOptions(), connectionName: 'redis-reap-test' })
  for (const client of [commands.redis, subscriber]) client.on('error', () => {})
  const log = { warn: () => {}, info: () => {} }
  const state = new RedisState(commands, subscriber, new Registry(`reaper-${randomBytes(4).toString('hex')}`), {
    prefix, historySize: 100, historyTtlS: 60, presenceGraceMs: 100, instanceTtlMs: INSTANCE_TTL_MS
  }, log)
  t.teardown(async () => {
    await state.close()
    commands.redis.disconnect()
    subscriber.disconnect()
  })
  await commands.redis.connect()
  const offline: string[] = []
  if (listening) state.onOffline((userId) => offline.push(userId))

  let paused = (_userId: string): void => {}
  const pausedAfterFirstReap = new Promise<string>((resolve) => { paused = resolve })
  let resume = (): void => {}
  const resumed = new Promise<void>((resolve) => { resume = resolve })
  const run = commands.run.bind(commands)
  let first = true
  commands.run = async (name: ScriptName, args: Array<string | number>): Promise<unknown> => {
    const answer = await run(name, args)
    if (name === 'REAP' && first) {
      first = false
      paused(String(args[1]))
      await resumed
    }
    return answer
  }
  return { state, offline, pausedAfterFirstReap, resume }
}

t.test('an instance that beats again mid-reap keeps the streams it rejoined and its list; its users are not announced offline', async (t) => {
  if (!(await needRedis(t))) return
  const prefix = uniquePrefix('reap')
  const redis = redisClient(t)
  const proxy = await FaultyProxy.start(t, redisPort)
  const instance = await startGateway(t, { REDIS_URL: proxy.url, REDIS_PREFIX: prefix, INSTANCE_TTL_MS: String(INSTANCE_TTL_MS) })
  const instanceId = instance.app.registry.instanceId
  const streams = new Map<string, Awaited<ReturnType<typeof openConnected>>>()
  for (const user of ['u1', 'u2']) streams.set(user, await openConnected(`${instance.url}/v1/stream?token=${userToken(user)}`, { t }))
  const member = (user: string): string => `${instanceId}|${streams.get(user)?.connected.connectionId ?? ''}`
  const reaper = await reaperOf(t, prefix)

  // Cut off, and silent for longer than INSTANCE_TTL_MS as far as the cluster can tell.
  proxy.cutOff()
  await eventually(() => !instance.app.bus.isReady(), 'the instance to lose Redis')
  await redis.zadd(`${prefix}instances`, Date.now() - 10 * INSTANCE_TTL_MS, instanceId)
  t.same(await reaper.state.deadInstances(), [instanceId], 'the instance is taken for dead')

  const reaping = reaper.state.reap(instanceId).catch((error: Error) => error)
  const first = await within(reaper.pausedAfterFirstReap, WAIT_MS, 'the first REAP')
  const second = first === 'u1' ? 'u2' : 'u1'
  t.equal(await redis.zscore(`${prefix}uc:${first}`, member(first)), null, `${first}'s stream is reaped while the instance is silent`)

  // Back before the reap reaches the other user: it beats and rejoins its streams.
  proxy.restore()
  await eventually(async () => {
    const beat = await redis.zscore(`${prefix}instances`, instanceId)
    return beat !== null && Number(beat) > Date.now() - INSTANCE_TTL_MS &&
      await redis.zscore(`${prefix}uc:${first}`, member(first)) !== null
  }, 'the instance to beat again and rejoin its streams', 15_000, 50)
  reaper.resume()
  const reaped = await within(reaping, WAIT_MS, 'the reap to finish')
  if (reaped instanceof Error) throw new Error(`the reap failed: ${reaped.message}`)

  t.same(reaper.offline, [first], `only ${first}, reaped while the instance was silent, is announced offline`)
  t.not(await redis.zscore(`${prefix}uc:${second}`, member(second)), null, `${second} keeps its stream`)
  t.not(await redis.zscore(`${prefix}uc:${first}`, member(first)), null, `${first} keeps the stream it rejoined`)
  t.same((await redis.hkeys(`${prefix}i:${instanceId}:conns`)).sort(), ['u1', 'u2'].map((user) => streams.get(user)?.connected.connectionId).sort(), 'the instance\'s rebuilt list stays')
  t.not(await redis.zscore(`${prefix}instances`, instanceId), null, 'the instance stays among the instances')
  t.match(await reaper.state.presence(second), { online: true, connections: 1 }, `${second} is online with one stream`)
  t.equal((await reaper.state.connections()).total, 2, 'both streams are listed cluster-wide')
  for (const [user, { stream }] of streams) t.notOk(stream.ended, `${user}'s stream stayed open`)
})

/**
 * A gateway with one stream of `user`, cut off from Redis and taken for dead
 * by the cluster (its beat moved back past INSTANCE_TTL_MS), and a reaper
 * whose reap runs straight through.
 */
async function deadInstanceWithStream (t: Test, name: string, user: string): Promise<{ reaper: Reaper, instanceId: string, prefix: string }> {
  const prefix = uniquePrefix(name)
  const redis = redisClient(t)
  const proxy = await FaultyProxy.start(t, redisPort)
  const instance = await startGateway(t, { REDIS_URL: proxy.url, REDIS_PREFIX: prefix, INSTANCE_TTL_MS: String(INSTANCE_TTL_MS) })
  const instanceId = instance.app.registry.instanceId
  // Teardowns run last first: the instance gets Redis back before it is closed.
  t.teardown(() => proxy.restore())
  await openConnected(`${instance.url}/v1/stream?token=${userToken(user)}`, { t })
  const reaper = await reaperOf(t, prefix)
  reaper.resume()
  proxy.cutOff()
  await eventually(() => !instance.app.bus.isReady(), 'the instance to lose Redis')
  await redis.zadd(`${prefix}instances`, Date.now() - 10 * INSTANCE_TTL_MS, instanceId)
  t.same(await reaper.state.deadInstances(), [instanceId], 'the instance is taken for dead')
  return { reaper, instanceId, prefix }
}

t.test('a presence read between an instance\'s death and its reap leaves the reap to announce the user offline', async (t) => {
  if (!(await needRedis(t))) return
  const { reaper, instanceId } = await deadInstanceWithStream(t, 'reapread', 'u1')
  t.match(await reaper.state.presence('u1'), { online: false, connections: 0 }, 'the dead instance\'s stream no longer counts')
  await within(reaper.state.reap(instanceId), WAIT_MS, 'the reap')
  t.same(reaper.offline, ['u1'], 'the reap announces u1 offline')
})

t.test('a user who reconnects elsewhere before its dead instance is reaped is neither announced online again nor offline', async (t) => {
  if (!(await needRedis(t))) return
  const { reaper, instanceId } = await deadInstanceWithStream(t, 'reapback', 'u1')
  // The reaper stands for the instance the user reconnects to.
  await reaper.state.heartbeat()
  const admission = await reaper.state.admit({ connectionId: 'back-1', userId: 'u1', topics: [], openedAt: Date.now(), limit: 1, policy: 'reject' })
  t.match(admission, { admitted: true, cameOnline: false }, 'admitted at the limit of 1 (the dead stream does not count), and not announced online: its peers never saw it leave')
  await within(reaper.state.reap(instanceId), WAIT_MS, 'the reap')
  t.same(reaper.offline, [], 'the reap announces nothing: u1 is still online')
  t.match(await reaper.state.presence('u1'), { online: true, connections: 1 }, 'online with its new stream')
})

t.test('a reap before anyone listens for user:offline (right after start) leaves the dead instance for a later one, which announces', async (t) => {
  if (!(await needRedis(t))) return
  const { reaper, instanceId, prefix } = await deadInstanceWithStream(t, 'reapearly', 'u1')
  const early = await reaperOf(t, prefix, false)
  early.resume()
  await within(early.state.reap(instanceId), WAIT_MS, 'the early reap')
  t.same(await early.state.deadInstances(), [instanceId], 'the instance is still there to reap')
  await within(reaper.state.reap(instanceId), WAIT_MS, 'the reap')
  t.same(reaper.offline, ['u1'], 'the later reap announces u1 offline')
})

t.test('an instance\'s list of streams outlives a long silence (a day), so a reap after the whole cluster was down still finds its users', async (t) => {
  if (!(await needRedis(t))) return
  const prefix = uniquePrefix('reaplist')
  const redis = redisClient(t)
  const instance = await startGateway(t, { REDIS_URL, REDIS_PREFIX: prefix, INSTANCE_TTL_MS: String(INSTANCE_TTL_MS) })
  await openConnected(`${instance.url}/v1/stream?token=${userToken('u1')}`, { t })
  const list = `${prefix}i:${instance.app.registry.instanceId}:conns`
  // Each heartbeat sets the list's expiry.
  await eventually(async () => await redis.ttl(list) > 0, 'a heartbeat to set the list\'s expiry', 10_000, 50)
  const ttl = await redis.ttl(list)
  t.ok(ttl > 86_000, `the list expires in ${ttl} s`)
})
