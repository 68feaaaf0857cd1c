/**
 * A stream whose open fails once the route has taken the connection over
 * (a Redis read after admission): the client gets a refusal in the
 * contract's shape, not an empty reply, the stream's slot is given back,
 * and the gateway serves on.
 */
import t from 'tap'
import { needRedis, redisClient, startOwnRedis, uniquePrefix } from './helpers/redis'
import { eventually, loggedAs, openConnected, request, startGateway, userToken } from './helpers'

interface LogLine { msg: string, level: number, reason?: string, err?: { stack?: string } }

t.test('Redis answering the open\'s read of user-wide topics too late: 503 with Retry-After and the JSON shape, one log line without a stack; the slot goes back', async (t) => {
  if (!(await needRedis(t))) return
  const redis = await startOwnRedis(t)
  const prefix = uniquePrefix('openfail')
  const gateway = await startGateway(t, {
    REDIS_URL: redis.url,
    REDIS_PREFIX: prefix,
    REDIS_COMMAND_TIMEOUT_MS: '500',
    MAX_CONNECTIONS_PER_USER: '1',
    LOG_LEVEL: 'info'
  }, { captureLogs: true })
  const admin = redisClient(t, redis.url)
  // Admission passes; reading millions of user-wide topics back takes Redis
  // far longer than the gateway's 500 ms command timeout (loaded, admission still answers within it).
  await admin.eval(`
    for batch = 0, 299 do
      local members = {}
      for i = 1, 5000 do members[i] = 'topic-' .. (batch * 5000 + i) end
      redis.call('SADD', KEYS[1], unpack(members))
    end`, 1, `${prefix}ut:u1`)

  const refused = await request(`${gateway.url}/v1/stream?token=${userToken('u1')}`)
  t.equal(refused.status, 503)
  t.same(refused.json, { statusCode: 503, code: 'GW_UNAVAILABLE', error: 'Service Unavailable', message: 'the event store (Redis) is unavailable' })
  t.match(refused.headers.get('retry-after'), /^\d+$/, 'Retry-After')
  t.match(refused.headers.get('content-type'), /^application\/json/)

  const failures = loggedAs<LogLine>(gateway.logText(), 'stream failed to open: Redis did not answer')
  t.equal(failures.length, 1, 'one line for the failed open')
  t.equal(failures[0]?.level, 40, 'a warning')
  t.match(failures[0]?.reason, /timed out/i, 'with Redis\'s reason')
  t.equal(failures[0]?.err, undefined, 'no stack')

  await admin.unlink(`${prefix}ut:u1`)
  // The only slot of the user was given back (asynchronously, after the close).
  let opened = false
  await eventually(async () => {
    const attempt = await openConnected(`${gateway.url}/v1/stream?token=${userToken('u1')}`, { t }).then(() => true, () => false)
    opened ||= attempt
    return opened
  }, 'the user opens a stream again', 10_000, 100)
  t.ok(opened)
})

t.test('an unexpected failure of the open after admission: 500 in the JSON shape, not an empty reply, and other users\' streams open', async (t) => {
  if (!(await needRedis(t))) return
  const prefix = uniquePrefix('openfail500')
  const gateway = await startGateway(t, { REDIS_URL: process.env.REDIS_URL ?? 'redis://127.0.0.1:6379', REDIS_PREFIX: prefix, LOG_LEVEL: 'info' }, { captureLogs: true })
  const admin = redisClient(t)
  t.teardown(async () => { await admin.del(`${prefix}ut:u2`) })
  // Not a set: reading it fails with WRONGTYPE.
  await admin.set(`${prefix}ut:u2`, 'not a set')

  const failed = await request(`${gateway.url}/v1/stream?token=${userToken('u2')}`)
  t.equal(failed.status, 500)
  t.same(failed.json, { statusCode: 500, code: 'GW_INTERNAL', error: 'Internal Server Error', message: 'Internal Server Error' })
  t.equal(loggedAs<LogLine>(gateway.logText(), 'stream failed to open').length, 1, 'logged as an error')

  const { connected } = await openConnected(`${gateway.url}/v1/stream?token=${userToken('u3')}`, { t })
  t.equal(connected.userId, 'u3', 'another user\'s stream opens')
})
