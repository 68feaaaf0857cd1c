import t from 'tap'
import type { Test } from 'tap'
import {
  loggedAs, openConnected, openStream, publish, publisherToken, request, startCluster, startGateway, userToken, type JsonResponse
} from './helpers'
import { proxiedCluster } from './helpers/proxy'
import { getRequest, rawExchange } from './helpers/raw'
import { needRedis, redisClient, REDIS_URL, uniquePrefix } from './helpers/redis'

const publisher = publisherToken()

function assert429 (t: Test, status: number, retryAfter: string | null | undefined, body: unknown): void {
  t.equal(status, 429, '429')
  t.match(retryAfter, /^\d+$/, 'Retry-After in whole seconds')
  t.ok(Number(retryAfter) >= 1 && Number(retryAfter) <= 60, `Retry-After within the minute (${String(retryAfter)})`)
  t.match(body, { statusCode: 429, code: 'GW_RATE_LIMITED', error: 'Too Many Requests', message: String })
}

t.test('by default stream opens are not rate limited: 700 from one address within the minute all open (the contract lists no such limit)', async (t) => {
  const { url } = await startGateway(t)
  let opened = 0
  for (let next = 0; next < 700;) {
    const batch = Array.from({ length: Math.min(50, 700 - next) }, (_, i) => `burst-${next + i}`)
    next += batch.length
    await Promise.all(batch.map(async (user) => {
      const { stream } = await openConnected(`${url}/v1/stream?token=${userToken(user)}`, { t })
      opened++
      stream.close()
    }))
  }
  t.equal(opened, 700)
})

t.test('stream opens past RATE_LIMIT_STREAMS_PER_MIN from one address: 429 with Retry-After and the JSON error shape', async (t) => {
  const { url, app } = await startGateway(t, { RATE_LIMIT_STREAMS_PER_MIN: '3' })
  for (let n = 0; n < 3; n++) await openConnected(`${url}/v1/stream?token=${userToken(`u${n}`)}`, { t })
  const refused = await openStream(`${url}/v1/stream?token=${userToken('u9')}`, { t })
  assert429(t, refused.status, refused.headers['retry-after'], refused.json())
  t.match(refused.headers['content-type'], /^application\/json/)
  t.equal(app.registry.size, 3, 'the limited open holds no stream')

  // JSON routes are not stream opens.
  t.equal((await request(`${url}/health`)).status, 200)
  t.equal((await publish(url, publisher, { to: { user: 'u0' }, data: 1 })).status, 202, 'publishing is not limited by the stream limit')
})

t.test('the stream limit counts opens on every stream route together (per address, not per route)', async (t) => {
  const { url } = await startGateway(t, { RATE_LIMIT_STREAMS_PER_MIN: '2' })
  t.equal((await request(`${url}/v1/jobs/j1`, { method: 'PUT', token: publisher, body: { userId: 'u1', status: 'active' } })).status, 200)
  const opens = [
    `${url}/v1/stream?token=${userToken('u1')}`,
    `${url}/v1/jobs/stream?token=${userToken('u1')}`,
    `${url}/v1/jobs/j1/stream?token=${userToken('u1')}`,
    `${url}/v1/stream?token=${userToken('u1')}`
  ]
  const statuses: number[] = []
  for (const open of opens) statuses.push((await openStream(open, { t })).status)
  t.same(statuses, [200, 200, 429, 429], `two opens a minute from this address, whatever the route (got ${statuses.join(', ')})`)
})

t.test('the publish limit counts every publisher route together (per address, not per route)', async (t) => {
  const { url } = await startGateway(t, { RATE_LIMIT_PUBLISH_PER_MIN: '2' })
  const statuses = [
    (await publish(url, publisher, { to: { user: 'u1' }, data: 1 })).status,
    (await request(`${url}/v1/jobs/j1`, { method: 'PUT', token: publisher, body: { userId: 'u1', status: 'active' } })).status,
    (await request(`${url}/v1/conversations/c1/members`, { method: 'PUT', token: publisher, body: { members: ['u1'] } })).status,
    (await publish(url, publisher, { to: { user: 'u1' }, data: 2 })).status
  ]
  t.same(statuses, [202, 200, 429, 429], `two publisher calls a minute from this address, whatever the route (got ${statuses.join(', ')})`)
})

t.test('the stream limit is per client address (X-Forwarded-For from a trusted proxy)', async (t) => {
  const { url } = await startGateway(t, { RATE_LIMIT_STREAMS_PER_MIN: '2', TRUST_PROXY: '127.0.0.1' })
  const from = (address: string): { headers: Record<string, string>, t: Test } => ({ headers: { 'x-forwarded-for': address }, t })
  await openConnected(`${url}/v1/stream?token=${userToken('a')}`, from('203.0.113.1'))
  await openConnected(`${url}/v1/stream?token=${userToken('a')}`, from('203.0.113.1'))
  const limited = await openStream(`${url}/v1/stream?token=${userToken('a')}`, from('203.0.113.1'))
  t.equal(limited.status, 429, 'the third open from 203.0.113.1 is limited')
  const other = await openStream(`${url}/v1/stream?token=${userToken('a')}`, from('203.0.113.2'))
  t.equal(other.status, 200, 'another address is not')
})

t.test('publish past RATE_LIMIT_PUBLISH_PER_MIN: 429 with Retry-After and the JSON error shape', async (t) => {
  const { url } = await startGateway(t, { RATE_LIMIT_PUBLISH_PER_MIN: '3' })
  for (let n = 0; n < 3; n++) {
    t.equal((await publish(url, publisher, { to: { user: 'u1' }, data: n })).status, 202, `publish ${n + 1} accepted`)
  }
  const limited: JsonResponse = await request(`${url}/v1/publish`, { method: 'POST', token: publisher, body: { to: { user: 'u1' }, data: 4 } })
  assert429(t, limited.status, limited.headers.get('retry-after'), limited.json)
  t.match(limited.headers.get('content-type'), /^application\/json/)

  // Streams are not limited by the publish limit.
  await openConnected(`${url}/v1/stream?token=${userToken('u1')}`, { t })
  t.pass('a stream still opens')
})

t.test('in Redis mode a limit holds across the instances: the opens and publishes one address made on either count on both', async (t) => {
  if (!(await needRedis(t))) return
  const [first, second] = await startCluster(t, 'redis', 2, { RATE_LIMIT_STREAMS_PER_MIN: '3', RATE_LIMIT_PUBLISH_PER_MIN: '2' })
  const prefix = first.app.config.redisPrefix
  await openConnected(`${first.url}/v1/stream?token=${userToken('u1')}`, { t })
  await openConnected(`${second.url}/v1/stream?token=${userToken('u2')}`, { t })
  await openConnected(`${first.url}/v1/stream?token=${userToken('u3')}`, { t })
  for (const gateway of [second, first]) {
    const refused = await openStream(`${gateway.url}/v1/stream?token=${userToken('u4')}`, { t })
    assert429(t, refused.status, refused.headers['retry-after'], refused.json())
  }
  t.equal(second.app.registry.size, 1, 'the second instance opened one stream itself, and was refused the fourth of the address')

  // The publish limit is a counter of its own, in Redis too: three stream
  // opens and two refusals did not use it up.
  t.equal((await publish(second.url, publisher, { to: { user: 'u1' }, data: 1 })).status, 202)
  t.equal((await publish(first.url, publisher, { to: { user: 'u1' }, data: 2 })).status, 202)
  const limited = await request(`${second.url}/v1/publish`, { method: 'POST', token: publisher, body: { to: { user: 'u1' }, data: 3 } })
  assert429(t, limited.status, limited.headers.get('retry-after'), limited.json)

  const redis = redisClient(t)
  const keys = (await redis.keys(`${prefix}rl:*`)).sort()
  t.same(keys, [`${prefix}rl:publish:127.0.0.1`, `${prefix}rl:streams:127.0.0.1`], 'one key per group and address, under the prefix')
  t.same(await redis.mget(keys), ['3', '5'], 'every request counted, refused ones included')
  for (const key of keys) {
    const left = await redis.pttl(key)
    t.ok(left > 0 && left <= 60_000, `${key} expires with its minute (${left} ms left)`)
  }
})

const NOT_COUNTED = 'rate limits not applied: Redis did not count the request'

t.test('in Redis mode a request Redis cannot count passes, and the limits being off is logged once a minute, not once a request', async (t) => {
  if (!(await needRedis(t))) return
  const prefix = uniquePrefix('rlfail')
  const gateway = await startGateway(t, { REDIS_URL, REDIS_PREFIX: prefix, RATE_LIMIT_STREAMS_PER_MIN: '1', LOG_LEVEL: 'warn' }, { captureLogs: true })
  // A counter INCR cannot add to: every count of this address fails.
  await redisClient(t).set(`${prefix}rl:streams:127.0.0.1`, 'not a number', 'EX', 60)
  for (let n = 0; n < 3; n++) await openConnected(`${gateway.url}/v1/stream?token=${userToken(`nc${n}`)}`, { t })
  const warnings = loggedAs<{ reason: string }>(gateway.logText(), NOT_COUNTED)
  t.equal(warnings.length, 1, 'one warning for three uncounted opens')
  t.match(warnings[0]?.reason, /not an integer/, 'saying why')
})

t.test('in Redis mode a count Redis does not answer is waited for briefly, not for the command timeout, and the request goes on', async (t) => {
  if (!(await needRedis(t))) return
  const { proxy, viaProxy } = await proxiedCluster(t, { REDIS_PREFIX: uniquePrefix('rlheld'), RATE_LIMIT_PUBLISH_PER_MIN: '5', REDIS_COMMAND_TIMEOUT_MS: '2000', LOG_LEVEL: 'warn' }, { captureLogs: true })
  t.teardown(() => proxy.cut())
  t.equal((await publish(viaProxy.url, publisher, { to: { user: 'u1' }, data: 1 })).status, 202)
  proxy.holdReplies('sse-gateway')
  const held = await publish(viaProxy.url, publisher, { to: { user: 'u1' }, data: 2 })
  proxy.releaseReplies('sse-gateway')
  t.equal(held.status, 503, 'the publish itself meets the silent Redis')
  const warnings = loggedAs<{ reason: string }>(viaProxy.logText(), NOT_COUNTED)
  t.equal(warnings.length, 1)
  t.match(warnings[0]?.reason, /did not count within \d+ ms/, 'the count gave up on its own, before the command timeout')
})

t.test('a forwarded address that is not an address is counted under a short digest of it, apart from others', async (t) => {
  if (!(await needRedis(t))) return
  const [gateway] = await startCluster(t, 'redis', 1, { RATE_LIMIT_STREAMS_PER_MIN: '1', TRUST_PROXY: '127.0.0.1' })
  const prefix = gateway.app.config.redisPrefix
  const from = (address: string): { headers: Record<string, string>, t: Test } => ({ headers: { 'x-forwarded-for': address }, t })
  const odd = `not an address ${'x'.repeat(4000)}`
  await openConnected(`${gateway.url}/v1/stream?token=${userToken('a')}`, from(odd))
  t.equal((await openStream(`${gateway.url}/v1/stream?token=${userToken('a')}`, from(odd))).status, 429, 'the same value is limited')
  await openConnected(`${gateway.url}/v1/stream?token=${userToken('a')}`, from('something else'))
  await openConnected(`${gateway.url}/v1/stream?token=${userToken('a')}`, from('2001:db8::7'))
  const keys = await redisClient(t).keys(`${prefix}rl:*`)
  t.equal(keys.length, 3)
  t.ok(keys.includes(`${prefix}rl:streams:2001:db8::7`), 'an address is its own key')
  for (const key of keys.filter((key) => !key.endsWith('2001:db8::7'))) t.match(key.slice(prefix.length), /^rl:streams:other:[\w-]{22}$/, 'anything else a digest')
})

t.test('a request head over Node\'s header limit (a 20 KB header) gets a clean 4xx and the gateway keeps serving', async (t) => {
  const { url, port } = await startGateway(t)
  const client = await rawExchange(port, getRequest(`/v1/stream?token=${userToken('u1')}`, port, { 'x-padding': 'p'.repeat(20 * 1024) }))
  const answer = client.response()
  t.ok(answer.complete, `an HTTP answer arrived (error: ${client.error?.message ?? 'none'})`)
  t.ok(answer.status >= 400 && answer.status < 500, `a 4xx (got ${answer.status})`)
  t.equal(answer.status, 431, '431 Request Header Fields Too Large')
  t.notMatch(answer.body, /event: connected/, 'no stream opened')

  t.equal((await request(`${url}/health`)).status, 200, 'the gateway still answers')
  await openConnected(`${url}/v1/stream?token=${userToken('u1')}`, { t })
  t.pass('and still opens streams')
})

t.test('a 20 KB query string gets a clean 4xx and the gateway keeps serving', async (t) => {
  const { url, port } = await startGateway(t)
  const path = `/v1/stream?token=${userToken('u1')}&topics=${'a'.repeat(20 * 1024)}`
  const client = await rawExchange(port, getRequest(path, port))
  const answer = client.response()
  t.ok(answer.complete, `an HTTP answer arrived (error: ${client.error?.message ?? 'none'})`)
  t.ok(answer.status >= 400 && answer.status < 500, `a 4xx (got ${answer.status})`)
  t.notMatch(answer.body, /event: connected/, 'no stream opened')
  t.equal((await request(`${url}/health`)).status, 200, 'the gateway still answers')
})

t.test('a body over MAX_BODY_BYTES: 413 with the JSON error shape, on publish and on a user route', async (t) => {
  const { url } = await startGateway(t, { MAX_BODY_BYTES: '1024', MAX_EVENT_BYTES: '4096' })
  const big = { to: { user: 'u1' }, data: 'x'.repeat(2048) }
  const response = await request(`${url}/v1/publish`, { method: 'POST', token: publisher, body: big })
  t.equal(response.status, 413)
  t.match(response.json, { statusCode: 413, code: 'GW_TOO_LARGE', error: 'Payload Too Large', message: String })

  const subscribe = await request(`${url}/v1/subscriptions`, { method: 'POST', token: userToken('u1'), body: { topics: Array.from({ length: 100 }, (_, n) => `topic-${n}-padding`) } })
  t.equal(subscribe.status, 413, 'a user route too')
  t.match(subscribe.json, { statusCode: 413, code: 'GW_TOO_LARGE', error: 'Payload Too Large', message: String })

  // Just under the limit still passes.
  t.equal((await publish(url, publisher, { to: { user: 'u1' }, data: 'x'.repeat(900) })).status, 202)
})

t.test('the default MAX_BODY_BYTES is 1 MiB: 1 MiB + 1 byte is 413', async (t) => {
  const { url } = await startGateway(t)
  const body = JSON.stringify({ to: { user: 'u1' }, data: 'x' })
  const padded = body.slice(0, -1) + ' '.repeat(1024 * 1024 + 1 - body.length) + '}'
  t.equal(Buffer.byteLength(padded), 1024 * 1024 + 1)
  const response = await request(`${url}/v1/publish`, { method: 'POST', token: publisher, body: padded })
  t.equal(response.status, 413)
  t.match(response.json, { statusCode: 413, error: 'Payload Too Large' })
})
