/**
 * Instances judge each other's heartbeats by Redis's clock alone: a gateway
 * whose own clock runs far behind (a host whose clock drifted) still counts
 * as live, its streams count for presence and limits, and it is not reaped.
 * Which of a user's streams is the oldest follows the order of admission,
 * not the clocks of the instances that admitted them.
 */
import { join } from 'node:path'
import { setTimeout as delay } from 'node:timers/promises'
import t, { type Test } from 'tap'
import { eventually, openConnected, openStream, spawnServer, startGateway, TEST_SECRET, userToken, type ServerProcess } from './helpers'
import { presence, stats } from './helpers/channels'
import { needRedis, redisClient, REDIS_URL, startOwnRedis, uniquePrefix } from './helpers/redis'

const INSTANCE_TTL_MS = 3000
/** Far past INSTANCE_TTL_MS: by its own clock, the instance's every beat is long dead. */
const CLOCK_SKEW_MS = -10 * INSTANCE_TTL_MS
const SKEW_PRELOAD = join(__dirname, 'helpers', 'clock-skew.js')

function clusterEnv (limit: number, policy: 'reject' | 'evict-oldest'): Record<string, string> {
  return { REDIS_URL, REDIS_PREFIX: uniquePrefix('clock'), INSTANCE_TTL_MS: String(INSTANCE_TTL_MS), MAX_CONNECTIONS_PER_USER: String(limit), CONNECTION_LIMIT_POLICY: policy }
}

/** A gateway process whose clock runs `skewMs` off the machine's (CLOCK_SKEW_MS behind unless told). */
async function spawnSkewed (t: Test, env: Record<string, string>, skewMs = CLOCK_SKEW_MS): Promise<ServerProcess> {
  return await spawnServer(t, { ...env, JWT_SECRET: TEST_SECRET, HOST: '127.0.0.1', LOG_LEVEL: 'warn', NODE_OPTIONS: `--require ${SKEW_PRELOAD}`, CLOCK_SKEW_MS: String(skewMs) })
}


t.test('instances whose clocks run 30 s behind and ahead still count as live: their streams count for presence and the per-user limit, they see the others as live, and none is reaped', async (t) => {
  if (!(await needRedis(t))) return
  const env = clusterEnv(1, 'reject')
  // Started first, so the lease and its reaps are the skewed instance's own too, at first.
  const behind = await spawnSkewed(t, env)
  const ahead = await spawnSkewed(t, env, -CLOCK_SKEW_MS)
  const onTime = await startGateway(t, env)

  await openConnected(`${behind.url}/v1/stream?token=${userToken('u1')}`, { t })
  t.same(await presence(onTime, 'u1'), { userId: 'u1', online: true, connections: 1 }, 'the stream on the instance behind counts as online')
  for (const gateway of [onTime, ahead, behind]) t.match(await stats(gateway), { instances: 3, connections: 1 }, 'all three instances are live, whoever asks')
  const second = await openStream(`${onTime.url}/v1/stream?token=${userToken('u1')}`, { t })
  t.equal(second.status, 429, 'the stream on the instance behind counts against the limit')

  // Past several beats and reap checks of every instance.
  await delay(2 * INSTANCE_TTL_MS)
  t.same(await presence(onTime, 'u1'), { userId: 'u1', online: true, connections: 1 }, 'still online: not reaped')
  for (const gateway of [onTime, ahead, behind]) t.match(await stats(gateway), { instances: 3, connections: 1 }, 'still all live')
})

t.test('evict-oldest evicts the stream admitted first, not the one whose instance\'s clock is behind', async (t) => {
  if (!(await needRedis(t))) return
  const env = clusterEnv(2, 'evict-oldest')
  const behind = await spawnSkewed(t, env)
  const onTime = await startGateway(t, env)
  const first = await openConnected(`${onTime.url}/v1/stream?token=${userToken('u1')}`, { t })
  const second = await openConnected(`${behind.url}/v1/stream?token=${userToken('u1')}`, { t })
  await openConnected(`${onTime.url}/v1/stream?token=${userToken('u1')}`, { t })
  t.equal((await first.stream.nextEvent('evicted')).event, 'evicted', 'the stream admitted first is evicted')
  await first.stream.waitEnd()
  // One stream is evicted per admission: the first, and only it.
  t.same(await presence(onTime, 'u1'), { userId: 'u1', online: true, connections: 2 })
  t.notOk(second.stream.ended, 'the stream on the instance behind, admitted later, stays')
})

t.test('during a rolling upgrade, evict-oldest still ends the stream admitted first when an earlier version listed a newer one by its open time in ms', async (t) => {
  if (!(await needRedis(t))) return
  const env = clusterEnv(2, 'evict-oldest')
  const gateway = await startGateway(t, env)
  const redis = redisClient(t)
  const prefix = env.REDIS_PREFIX
  const first = await openConnected(`${gateway.url}/v1/stream?token=${userToken('u1')}`, { t })
  // An instance of an earlier version, beating, whose stream of u1 opened after the first.
  const [seconds] = await redis.time()
  await redis.zadd(`${prefix}instances`, Number(seconds) * 1000 + 1000, 'earlier-version')
  await redis.hset(`${prefix}i:earlier-version:conns`, 'c_earlier', JSON.stringify({ userId: 'u1' }))
  await redis.zadd(`${prefix}uc:u1`, Date.now() + 1000, 'earlier-version|c_earlier')
  t.same(await presence(gateway, 'u1'), { userId: 'u1', online: true, connections: 2 }, 'both count')
  await openConnected(`${gateway.url}/v1/stream?token=${userToken('u1')}`, { t })
  t.equal((await first.stream.nextEvent('evicted')).event, 'evicted', 'the stream admitted first is evicted')
  t.not(await redis.zscore(`${prefix}uc:u1`, 'earlier-version|c_earlier'), null, 'the newer one, listed by the earlier version, stays')
})

t.test('after Redis comes back empty, the streams recorded again keep the order of their admissions: evict-oldest still ends the one admitted first', async (t) => {
  const redis = await startOwnRedis(t)
  const env: Record<string, string> = { ...clusterEnv(2, 'evict-oldest'), REDIS_URL: redis.url }
  const behind = await spawnSkewed(t, env)
  const onTime = await startGateway(t, env)
  const first = await openConnected(`${onTime.url}/v1/stream?token=${userToken('u1')}`, { t })
  const second = await openConnected(`${behind.url}/v1/stream?token=${userToken('u1')}`, { t })
  await redis.stop()
  await redis.start()
  const client = redisClient(t, redis.url)
  await eventually(async () => await client.zcard(`${env.REDIS_PREFIX}uc:u1`) === 2, 'both streams recorded again', 15_000, 50)
  await openConnected(`${onTime.url}/v1/stream?token=${userToken('u1')}`, { t })
  t.equal((await first.stream.nextEvent('evicted')).event, 'evicted', 'the stream admitted first is evicted')
  t.notOk(second.stream.ended, 'the one admitted second, on the instance behind, stays')
})
