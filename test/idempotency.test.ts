/**
 * `Idempotency-Key` on POST /v1/publish: a publisher that did not get its
 * answer (a 503 after a lost Redis reply, a timeout) sends the request again
 * with the same key and gets the first answer, without a second event.
 */
import t from 'tap'
import { MemoryBus } from '../src/core/memory-bus'
import { eventually, openConnected, publishOk, publisherToken, request, token, userToken, type Gateway, type JsonResponse, type SseClient } from './helpers'
import { forEachMode, startCluster } from './helpers/modes'
import { proxiedCluster } from './helpers/proxy'
import { needRedis, uniquePrefix } from './helpers/redis'
import { connect, setMembers } from './helpers/channels'

const publisher = publisherToken()

interface Answer {
  id?: string
  ids?: string[]
  code?: string
  message?: string
}

async function publishWithKey (gateway: Gateway, key: string, body: unknown, as = publisher): Promise<JsonResponse<Answer>> {
  return await request<Answer>(`${gateway.url}/v1/publish`, { method: 'POST', token: as, headers: { 'idempotency-key': key }, body })
}

/** How many `name` events `stream` got before a marker published after them. */
async function countBeforeMarker (gateway: Gateway, stream: SseClient, name: string): Promise<number> {
  await publishOk(gateway.url, publisher, { to: { user: 'u1' }, event: 'marker', data: 0 })
  await stream.nextEvent('marker')
  return stream.events.filter((event) => event.event === name).length
}

forEachMode(t, 'the same key twice: one event, and the second answer is the first', async (t, mode) => {
  const [gateway] = await startCluster(t, mode)
  const { stream } = await openConnected(`${gateway.url}/v1/stream?token=${userToken('u1')}`, { t })
  const body = { to: { user: 'u1' }, event: 'order', data: { n: 1 } }

  const first = await publishWithKey(gateway, 'order-1', body)
  t.equal(first.status, 202)
  t.equal(first.headers.get('idempotent-replayed'), null, 'the first is not a replay')
  const again = await publishWithKey(gateway, 'order-1', body)
  t.equal(again.status, 202)
  t.same(again.json, first.json, 'the same id')
  t.equal(again.headers.get('idempotent-replayed'), 'true')
  // The IETF draft sends the key as a quoted string: the same key.
  const quoted = await publishWithKey(gateway, '"order-1"', body)
  t.same(quoted.json, first.json)

  t.equal(await countBeforeMarker(gateway, stream, 'order'), 1, 'delivered once')
  t.equal(stream.events.find((event) => event.event === 'order')?.id, first.json.id)
})

forEachMode(t, 'a batch sent again with its key: the same ids, nothing published twice', async (t, mode) => {
  const [gateway] = await startCluster(t, mode)
  const { stream } = await openConnected(`${gateway.url}/v1/stream?token=${userToken('u1')}`, { t })
  const body = [1, 2, 3].map((n) => ({ to: { user: 'u1' }, event: 'item', data: n }))
  const first = await publishWithKey(gateway, 'batch-1', body)
  t.equal(first.json.ids?.length, 3)
  const again = await publishWithKey(gateway, 'batch-1', body)
  t.same(again.json, first.json)
  t.equal(await countBeforeMarker(gateway, stream, 'item'), 3)
})

forEachMode(t, 'a key used for another request: 422, nothing published; other keys and other publishers are independent', async (t, mode) => {
  const [gateway] = await startCluster(t, mode)
  const { stream } = await openConnected(`${gateway.url}/v1/stream?token=${userToken('u1')}`, { t })
  const first = await publishWithKey(gateway, 'k', { to: { user: 'u1' }, event: 'a', data: 1 })
  t.equal(first.status, 202)

  const other = await publishWithKey(gateway, 'k', { to: { user: 'u1' }, event: 'a', data: 2 })
  t.equal(other.status, 422)
  t.match(other.json, { statusCode: 422, error: 'Unprocessable Entity', code: 'GW_UNPROCESSABLE', message: /Idempotency-Key/ })
  // The same request written differently is the same request.
  const reordered = await publishWithKey(gateway, 'k', { data: 1, event: 'a', to: { user: 'u1' } })
  t.same([reordered.status, reordered.json], [202, first.json], 'keys in another order')
  const plain = await publishWithKey(gateway, 'm', { to: { user: 'u1' }, data: 3 })
  const spelledOut = await publishWithKey(gateway, 'm', { to: { user: 'u1' }, event: 'message', data: 3 })
  t.same(spelledOut.json, plain.json, 'the default event name spelled out')
  t.equal(spelledOut.headers.get('idempotent-replayed'), 'true')

  const otherKey = await publishWithKey(gateway, 'k2', { to: { user: 'u1' }, event: 'a', data: 1 })
  t.equal(otherKey.status, 202)
  t.not(otherKey.json.id, first.json.id, 'another key publishes')
  // A second backend (another token subject) choosing the same key.
  const otherPublisher = await publishWithKey(gateway, 'k', { to: { user: 'u1' }, event: 'a', data: 2 }, token({ sub: 'billing', roles: ['publisher'] }))
  t.equal(otherPublisher.status, 202)

  await countBeforeMarker(gateway, stream, 'a')
  t.same(stream.events.filter((event) => event.event === 'a').map((event) => event.data), ['1', '1', '2'], 'the refused one never went out')
})

forEachMode(t, 'a conversation grown past MAX_PUBLISH_CHANNELS since: the repeat still gets its ids; a new key is 413', async (t, mode) => {
  const [gateway] = await startCluster(t, mode, 1, { MAX_PUBLISH_CHANNELS: '3' })
  await setMembers(gateway, 'room', ['m0', 'm1'])
  const member = await connect(t, gateway, 'm0')
  const body = { to: { conversation: 'room' }, event: 'said', data: 'hi' }
  const first = await publishWithKey(gateway, 'said-1', body)
  t.equal(first.status, 202)

  await setMembers(gateway, 'room', ['m0', 'm1', 'm2', 'm3'])
  const again = await publishWithKey(gateway, 'said-1', body)
  t.equal(again.status, 202, 'not 413: it was published within the limit')
  t.same(again.json, first.json, 'the same id')
  t.equal(again.headers.get('idempotent-replayed'), 'true')
  const other = await publishWithKey(gateway, 'said-1', { ...body, data: 'bye' })
  t.equal(other.status, 422, 'the key with another request is still a conflict')
  const fresh = await publishWithKey(gateway, 'said-2', body)
  t.equal(fresh.status, 413, 'a new key past the limit is refused')

  await publishOk(gateway.url, publisher, { to: { user: 'm0' }, event: 'marker', data: 0 })
  await member.stream.nextEvent('marker')
  t.same(member.stream.events.filter((event) => event.event === 'said').map((event) => event.id), [first.json.id], 'delivered once')
})

forEachMode(t, 'a malformed key: 400 in the error shape, nothing published', async (t, mode) => {
  const [gateway] = await startCluster(t, mode)
  const { stream } = await openConnected(`${gateway.url}/v1/stream?token=${userToken('u1')}`, { t })
  for (const key of ['', 'has space', 'x'.repeat(256), 'quo"te', 'ü']) {
    const answer = await request<Answer>(`${gateway.url}/v1/publish`, {
      method: 'POST',
      token: publisher,
      headers: { 'idempotency-key': key },
      body: { to: { user: 'u1' }, event: 'bad', data: 1 }
    })
    t.equal(answer.status, 400, `key ${JSON.stringify(key)}`)
    t.match(answer.json, { code: 'GW_BAD_REQUEST', message: /Idempotency-Key/ })
  }
  t.equal(await countBeforeMarker(gateway, stream, 'bad'), 0)
})

t.test('across instances: a key used on one is repeated on the other [redis]', async (t) => {
  if (!(await needRedis(t))) return
  const [a, b] = await startCluster(t, 'redis', 2)
  const { stream } = await openConnected(`${b.url}/v1/stream?token=${userToken('u1')}`, { t })
  const body = { to: { user: 'u1' }, event: 'x', data: 1 }
  const first = await publishWithKey(a, 'cross', body)
  const again = await publishWithKey(b, 'cross', body)
  t.same(again.json, first.json)
  t.equal(again.headers.get('idempotent-replayed'), 'true')
  t.equal(await countBeforeMarker(b, stream, 'x'), 1)
})

t.test('a publish whose Redis reply was lost (503), sent again with its key: the first event\'s id, still one event', async (t) => {
  if (!(await needRedis(t))) return
  const prefix = uniquePrefix('oncelost')
  const { proxy, viaProxy, direct } = await proxiedCluster(t, { REDIS_PREFIX: prefix })
  const { stream } = await openConnected(`${direct.url}/v1/stream?token=${userToken('u1')}`, { t })
  const body = { to: { user: 'u1' }, event: 'charge', data: { amount: 5 } }

  proxy.holdReplies()
  const lost = publishWithKey(viaProxy, 'charge-7', body).catch((error: Error) => error)
  const delivered = await stream.nextEvent('charge')
  proxy.cut()
  const answer = await lost
  if (answer instanceof Error) throw answer
  t.equal(answer.status, 503, 'the publisher cannot tell whether it went out')

  await eventually(async () => (await request(`${viaProxy.url}/ready`)).status === 200, 'the gateway back on Redis', 10_000, 50)
  const retried = await publishWithKey(viaProxy, 'charge-7', body)
  t.equal(retried.status, 202)
  t.equal(retried.json.id, delivered.id, 'the retry answers with the id that went out')
  t.equal(await countBeforeMarker(direct, stream, 'charge'), 1, 'no second event')
})

forEachMode(t, 'past IDEMPOTENCY_WINDOW_S the key is forgotten: the same request publishes again', async (t, mode) => {
  const [gateway] = await startCluster(t, mode, 1, { IDEMPOTENCY_WINDOW_S: '1' })
  const body = { to: { user: 'u1' }, event: 'tick', data: 1 }
  const first = await publishWithKey(gateway, 'tick-1', body)
  t.equal(first.status, 202)
  let later: Answer = {}
  await eventually(async () => {
    const answer = await publishWithKey(gateway, 'tick-1', body)
    later = answer.json
    return answer.status === 202 && answer.headers.get('idempotent-replayed') === null
  }, 'the key forgotten', 10_000, 100)
  t.not(later.id, first.json.id, 'a new event')
  t.type(later.id, 'string')
})

t.test('a browser page of an allowed origin may send the key and read the replay header', async (t) => {
  const [gateway] = await startCluster(t, 'memory', 1, { CORS_ORIGINS: 'https://admin.example.com' })
  const preflight = await request(`${gateway.url}/v1/publish`, {
    method: 'OPTIONS',
    headers: { origin: 'https://admin.example.com', 'access-control-request-method': 'POST', 'access-control-request-headers': 'authorization, content-type, idempotency-key' }
  })
  t.match(preflight.headers.get('access-control-allow-headers'), /Idempotency-Key/i)
  const answer = await publishWithKey(gateway, 'cors', { to: { user: 'u1' }, data: 1 })
  t.equal(answer.status, 202)
  const again = await request<Answer>(`${gateway.url}/v1/publish`, { method: 'POST', token: publisher, headers: { origin: 'https://admin.example.com', 'idempotency-key': 'cors' }, body: { to: { user: 'u1' }, data: 1 } })
  t.match(again.headers.get('access-control-expose-headers'), /Idempotent-Replayed/i)
})

t.test('embedded mode bounds the memory its keys take, forgetting the oldest first', async (t) => {
  // Room for two keys of one event each.
  const bus = new MemoryBus({ historySize: 10, historyTtlS: 60, maxOnceBytes: 2 * 431 })
  t.teardown(async () => await bus.close())
  const item = { channels: ['u:u1'], body: 'data: 1\n' }
  const once = (key: string): { key: string, fingerprint: string, windowS: number } => ({ key, fingerprint: 'f', windowS: 600 })
  const first = await bus.publishOnce([item], once('k1'))
  await bus.publishOnce([item], once('k2'))
  t.match(await bus.publishOnce([item], once('k1')), { kind: 'repeated' }, 'two fit')
  await bus.publishOnce([item], once('k3'))
  t.match(await bus.publishOnce([item], once('k3')), { kind: 'repeated' }, 'the newest kept')
  t.match(await bus.publishOnce([item], once('k2')), { kind: 'repeated' })
  const again = await bus.publishOnce([item], once('k1'))
  t.equal(again.kind, 'published', 'the oldest forgotten')
  t.not(again.kind !== 'conflict' && again.ids[0], first.kind !== 'conflict' && first.ids[0])

  // A big batch counts for what it holds: it pushes out both single keys.
  await bus.publishOnce(Array.from({ length: 30 }, () => item), once('batch'))
  t.match(await bus.publishOnce([item], once('batch')), { kind: 'repeated' })
  t.equal((await bus.publishOnce([item], once('k3'))).kind, 'published', 'pushed out by the batch')
})
