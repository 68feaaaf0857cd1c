/**
 * Redis answering but refusing work for its own condition (here: out of
 * memory under noeviction). Publishers get 503, as when Redis is unreachable,
 * and no log line carries the refused command's arguments (event data).
 */
import { setTimeout as delay } from 'node:timers/promises'
import t from 'tap'
import { needRedis, redisClient, startOwnRedis, uniquePrefix } from './helpers/redis'
import { eventually, openConnected, publish, publishOk, publisherToken, request, startGateway, userToken } from './helpers'
import { errForLog } from '../src/logging'

const SECRET_DATA = 'PAYLOAD-c41d-refused-never-log-me'

t.test('Redis out of memory: publish and job PUT answer 503 and log why, without the event data; both work again once Redis has room', async (t) => {
  if (!(await needRedis(t))) return
  const redis = await startOwnRedis(t)
  const gateway = await startGateway(t, { REDIS_URL: redis.url, REDIS_PREFIX: uniquePrefix('oom'), LOG_LEVEL: 'info' }, { captureLogs: true })
  const publisher = publisherToken()
  const { stream } = await openConnected(`${gateway.url}/v1/stream?token=${userToken('u1')}`, { t })
  const admin = redisClient(t, redis.url)
  await admin.config('SET', 'maxmemory-policy', 'noeviction')
  await admin.config('SET', 'maxmemory', '1')

  const refused = await publish(gateway.url, publisher, { to: { user: 'u1' }, event: 'note', data: SECRET_DATA })
  t.equal(refused.status, 503, 'publish: 503')
  t.match(refused.json, { statusCode: 503, code: 'GW_UNAVAILABLE', error: 'Service Unavailable', message: 'the event store (Redis) is unavailable' })
  const job = await request(`${gateway.url}/v1/jobs/j1`, { method: 'PUT', token: publisher, body: { userId: 'u1', status: 'active', result: SECRET_DATA } })
  t.equal(job.status, 503, 'job PUT: 503')

  await admin.config('SET', 'maxmemory', '0')
  const [id] = await publishOk(gateway.url, publisher, { to: { user: 'u1' }, event: 'note', data: 'after' })
  t.equal((await stream.nextEvent('note')).id, id, 'the stream receives what is published once Redis has room')

  const text = gateway.logText()
  t.notOk(text.includes(SECRET_DATA), 'no event data in the logs')
  t.match(text, /"reason":"OOM command not allowed/, 'the refusal logged with Redis\'s reason')
})

t.test('an error from Redis logs its message, not the command and arguments it failed', async (t) => {
  if (!(await needRedis(t))) return
  const redis = redisClient(t)
  const error = await redis.eval('return redis.call("NO-SUCH-COMMAND")', 0, SECRET_DATA).then(() => null, (error: unknown) => error)
  if (!(error instanceof Error)) throw new Error('the script did not fail')
  t.ok('command' in error, 'ioredis attaches the command to its error')
  const logged = errForLog(error)
  t.match(logged.message, /Unknown Redis command/)
  t.notOk(JSON.stringify(logged).includes(SECRET_DATA), 'the arguments are not in the line')
})

t.test('Redis out of memory long enough for an instance to be taken for dead and reaped: once Redis takes writes again, the instance records its streams again', async (t) => {
  if (!(await needRedis(t))) return
  const redis = await startOwnRedis(t)
  const prefix = uniquePrefix('oomreap')
  // Beats every ~330 ms.
  const a = await startGateway(t, { REDIS_URL: redis.url, REDIS_PREFIX: prefix, INSTANCE_TTL_MS: '1000', LOG_LEVEL: 'warn' }, { captureLogs: true })
  const { stream } = await openConnected(`${a.url}/v1/stream?token=${userToken('u1')}`, { t })
  const admin = redisClient(t, redis.url)
  await admin.config('SET', 'maxmemory-policy', 'noeviction')
  await admin.config('SET', 'maxmemory', '1')
  // Refused for longer than INSTANCE_TTL_MS: long enough to be reaped.
  await eventually(() => a.logText().includes('heartbeat failed'), 'a beat refused', 10_000)
  // Four beats' time, refused (a failed beat is logged once, not at every beat).
  await delay(1500)
  // What another instance's reap does to an instance silent for INSTANCE_TTL_MS.
  const instance = a.app.state.instanceId
  await admin.del(`${prefix}i:${instance}:conns`)
  await admin.zrem(`${prefix}instances`, instance)
  await admin.del(`${prefix}uc:u1`)
  t.equal((await a.app.state.presence('u1')).connections, 0, 'reaped')
  await admin.config('SET', 'maxmemory', '0')
  await eventually(async () => (await a.app.state.presence('u1')).connections === 1, 'the stream recorded again', 15_000, 50)
  t.notOk(stream.ended, 'the stream stayed open throughout')
  t.match(await a.app.state.presence('u1'), { online: true, connections: 1 }, 'counted and online again')
})

t.test('a close refused while Redis takes no writes (NOREPLICAS), with no reconnect after: recorded once Redis takes writes again, and the user may open again', async (t) => {
  if (!(await needRedis(t))) return
  const redis = await startOwnRedis(t)
  // Beats every 2 s: the refusal below is over before one.
  const gateway = await startGateway(t, { REDIS_URL: redis.url, REDIS_PREFIX: uniquePrefix('norepl'), INSTANCE_TTL_MS: '6000', MAX_CONNECTIONS_PER_USER: '1', LOG_LEVEL: 'warn' }, { captureLogs: true })
  const { stream } = await openConnected(`${gateway.url}/v1/stream?token=${userToken('u1')}`, { t })
  const admin = redisClient(t, redis.url)
  await admin.config('SET', 'min-replicas-to-write', '1')
  stream.close()
  await eventually(() => gateway.logText().includes('stream closes are recorded once Redis is back'), 'the close refused')
  await admin.config('SET', 'min-replicas-to-write', '0')
  await eventually(async () => (await gateway.app.state.presence('u1')).connections === 0, 'the close recorded', 10_000, 50)
  const { stream: again } = await openConnected(`${gateway.url}/v1/stream?token=${userToken('u1')}`, { t })
  t.notOk(again.ended, 'the user opens a stream again')
})
