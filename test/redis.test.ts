import { mkdtemp, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import t, { type Test } from 'tap'
import {
  adminToken, eventually, openConnected, openStream, publishOk, publisherToken, request, spawnServer, startGateway, TEST_SECRET, userToken,
  type Gateway, type SseClient, type SseEvent
} from './helpers'
import { needRedis, redisClient, REDIS_URL, startOwnRedis, uniquePrefix } from './helpers/redis'
import { channel } from '../src/core/channels'
import { FaultyProxy } from './helpers/proxy'
import { metricValue, scrape } from './helpers/raw'

const publisher = publisherToken()

/** u1 reconnecting to `gateway` with `cursor`: its stream, and the first event after `connected`. */
async function reconnectWith (t: Test, gateway: Gateway, cursor: string): Promise<{ stream: SseClient, first: SseEvent }> {
  const stream = await openStream(`${gateway.url}/v1/stream?token=${userToken('u1')}`, { t, headers: { 'last-event-id': cursor } })
  await stream.nextEvent('connected')
  return { stream, first: await stream.next(() => true) }
}
const admin = adminToken()

async function cluster (t: Test, count: number, env: Record<string, string> = {}): Promise<{ gateways: Gateway[], prefix: string }> {
  const prefix = uniquePrefix('redis')
  const gateways: Gateway[] = []
  for (let index = 0; index < count; index++) {
    gateways.push(await startGateway(t, { REDIS_URL, REDIS_PREFIX: prefix, INSTANCE_TTL_MS: '2000', ...env }))
  }
  return { gateways, prefix }
}

function ids (events: SseEvent[]): string[] {
  return events.map((event) => event.id ?? '')
}

function strictlyIncreasing (values: string[]): boolean {
  return values.every((value, index) => index === 0 || BigInt(value) > BigInt(values[index - 1]))
}

interface Stats { connections: number, users: number, topics: Record<string, number>, instances: number }

async function stats (gateway: Gateway): Promise<Stats> {
  const answer = await request<Stats>(`${gateway.url}/v1/stats`, { token: admin })
  return answer.json
}

const MARKDOWN = '# Title\n\nFirst paragraph with `code`.\r\n\r\n- item: one\n- data: not a field\nid: 7\n\n```js\nconsole.log("hi")\n```\n'

t.test('an event published on instance B reaches a stream on instance A', async (t) => {
  if (!(await needRedis(t))) return
  const { gateways: [a, b] } = await cluster(t, 2)
  const { stream } = await openConnected(`${a.url}/v1/stream?token=${userToken('u1')}`, { t })
  const [id] = await publishOk(b.url, publisher, { to: { user: 'u1' }, event: 'note', data: { from: 'B' } })
  const event = await stream.nextEvent('note')
  t.equal(event.id, id)
  t.same(JSON.parse(event.data), { from: 'B' })
})

t.test('one user with tabs on A and B: both receive user, topic and broadcast events, once each, in order', async (t) => {
  if (!(await needRedis(t))) return
  const { gateways: [a, b] } = await cluster(t, 2)
  const tabA = (await openConnected(`${a.url}/v1/stream?token=${userToken('u1')}&topics=news`, { t })).stream
  const tabB = (await openConnected(`${b.url}/v1/stream?token=${userToken('u1')}&topics=news`, { t })).stream
  const published = [
    ...await publishOk(a.url, publisher, { to: { user: 'u1' }, event: 'n', data: 1 }),
    ...await publishOk(b.url, publisher, { to: { topic: 'news' }, event: 'n', data: 2 }),
    ...await publishOk(a.url, publisher, [{ to: { broadcast: true }, event: 'n', data: 3 }, { to: { users: ['u1', 'u2'] }, event: 'n', data: 4 }]),
    ...await publishOk(b.url, publisher, { to: { user: 'u1' }, event: 'end', data: 5 })
  ]
  for (const tab of [tabA, tabB]) {
    await tab.nextEvent('end')
    const received = tab.events.filter((event) => event.id !== undefined)
    t.same(ids(received), published, 'every event once, in publish order')
    t.same(received.map((event) => event.data), ['1', '2', '3', '4', '5'])
  }
})

t.test('ids are strictly increasing across instances and channels', async (t) => {
  if (!(await needRedis(t))) return
  const { gateways: [a, b, c] } = await cluster(t, 3)
  const { stream } = await openConnected(`${c.url}/v1/stream?token=${userToken('u1')}&topics=t1`, { t })
  const bodies = [a, b, a, b, c].map((gateway, index) => ({ gateway, body: index % 2 === 0 ? { to: { user: 'u1' }, data: index } : { to: { topic: 't1' }, data: index } }))
  const published = await Promise.all(bodies.map(async ({ gateway, body }) => (await publishOk(gateway.url, publisher, body))[0]))
  const received = ids(await stream.take(5))
  t.equal(received.length, 5)
  t.ok(strictlyIncreasing(received), `received ids increase: ${received.join(', ')}`)
  t.same([...received].sort(), [...published].sort(), 'each published event arrived once')
})

t.test('a client that reconnects to another instance with Last-Event-ID gets exactly what it missed', async (t) => {
  if (!(await needRedis(t))) return
  const { gateways: [a, b] } = await cluster(t, 2)
  const first = (await openConnected(`${a.url}/v1/stream?token=${userToken('u1')}&topics=news`, { t })).stream
  const before = await publishOk(a.url, publisher, [1, 2].map((n) => ({ to: { user: 'u1' }, data: n })))
  await first.next((event) => event.id === before[1])
  first.close()
  await eventually(async () => (await stats(a)).connections === 0, 'the first stream to be gone')
  const missed = [
    ...await publishOk(a.url, publisher, { to: { user: 'u1' }, data: 3 }),
    ...await publishOk(b.url, publisher, { to: { topic: 'news' }, data: 4 }),
    ...await publishOk(a.url, publisher, { to: { broadcast: true }, data: 5 }),
    ...await publishOk(b.url, publisher, { to: { user: 'someone-else' }, data: 'not for u1' })
  ]
  const second = await openStream(`${b.url}/v1/stream?token=${userToken('u1')}&topics=news`, { t, headers: { 'last-event-id': before[1] } })
  await second.nextEvent('connected')
  const replayed = await second.take(3)
  t.same(ids(replayed), missed.slice(0, 3), 'the three missed events, in order, none of the other user')
  const [live] = await publishOk(a.url, publisher, { to: { user: 'u1' }, data: 6 })
  const next = await second.next((event) => event.id !== undefined)
  t.equal(next.id, live, 'then live, with no duplicate')
  t.notOk(second.events.some((event) => event.event === 'reset'), 'no reset')
})

t.test('each instance subscribes only to the channels its own streams need, and unsubscribes after the last one', async (t) => {
  if (!(await needRedis(t))) return
  const { gateways: [a, b], prefix } = await cluster(t, 2)
  const redis = redisClient(t)
  const subscribers = async (channel: string): Promise<number> => {
    const [, count] = await redis.pubsub('NUMSUB', `${prefix}ch:${channel}`) as [string, number]
    return count
  }
  const one = (await openConnected(`${a.url}/v1/stream?token=${userToken('solo')}&topics=rare`, { t })).stream
  const two = (await openConnected(`${a.url}/v1/stream?token=${userToken('solo')}&topics=rare`, { t })).stream
  t.equal(await subscribers('u:solo'), 1, 'instance A subscribes once for two streams')
  t.equal(await subscribers('t:rare'), 1)
  t.equal(await subscribers('b'), 1, 'B holds no stream, so only A listens to broadcast')
  await openConnected(`${b.url}/v1/stream?token=${userToken('other')}`, { t })
  t.equal(await subscribers('b'), 2, 'both instances listen to broadcast once each holds a stream')
  t.equal(await subscribers('u:solo'), 1, 'B never subscribes to a user it does not hold')
  one.close()
  await eventually(async () => a.app.registry.size === 1, 'one stream left on A')
  t.equal(await subscribers('u:solo'), 1, 'still needed by the second stream')
  two.close()
  await eventually(async () => await subscribers('u:solo') === 0, 'A to unsubscribe from u:solo')
  t.equal(await subscribers('t:rare'), 0)
})

t.test('Redis ingress: <prefix>publish and stream:<id> are each delivered exactly once across three instances', async (t) => {
  if (!(await needRedis(t))) return
  const { gateways: [a, b, c], prefix } = await cluster(t, 3)
  const redis = redisClient(t)
  const { stream, connected } = await openConnected(`${b.url}/v1/stream?token=${userToken('writer')}`, { t })
  await eventually(async () => [a, b, c].some((gateway) => gateway.app.ingress?.isLeader === true), 'an ingress lease holder')
  t.equal([a, b, c].filter((gateway) => gateway.app.ingress?.isLeader === true).length, 1, 'exactly one instance holds the lease')
  t.equal(await redis.publish(`${prefix}publish`, JSON.stringify({ to: { user: 'writer' }, event: 'content-chunk', data: MARKDOWN })), 3, 'every instance listens to the ingress channel (the holder, and two standbys)')
  const chunks = ['## Part one\n\nline\r\nline', '\n', 'data: looks like a field\n\nid: 99', 'last chunk ✓']
  for (const chunk of chunks) await redis.publish(`stream:${connected.connectionId}`, JSON.stringify({ event: 'content-chunk', data: chunk }))
  await redis.publish(`${prefix}publish`, JSON.stringify({ to: { connection: connected.connectionId }, event: 'done', data: {} }))
  await stream.nextEvent('done')
  const received = stream.events.filter((event) => event.event === 'content-chunk')
  t.same(received.map((event) => event.data), [MARKDOWN, ...chunks].map((text) => text.replace(/\r\n|\r/g, '\n')), 'markdown intact, in order, each once')
  t.ok(strictlyIncreasing(ids(received)), 'one id each, increasing')
})

t.test('the durable ingress (XADD <prefix>ingress) delivers each entry once', async (t) => {
  if (!(await needRedis(t))) return
  const { gateways: [a, b], prefix } = await cluster(t, 2)
  const redis = redisClient(t)
  const { stream } = await openConnected(`${a.url}/v1/stream?token=${userToken('durable')}`, { t })
  for (let n = 0; n < 20; n++) {
    await redis.xadd(`${prefix}ingress`, '*', 'payload', JSON.stringify({ to: { user: 'durable' }, event: 'seq', data: n }))
  }
  await stream.next((event) => event.data === '19', 10_000)
  await publishOk(b.url, publisher, { to: { user: 'durable' }, event: 'marker', data: 0 })
  await stream.nextEvent('marker')
  t.same(stream.events.filter((event) => event.event === 'seq').map((event) => Number(event.data)), [...Array(20).keys()])
  // Handled entries are deleted: the stream does not grow by one per message forever.
  await eventually(async () => await redis.xlen(`${prefix}ingress`) === 0, 'the handled entries deleted')
  t.pass('the ingress stream is empty once its entries are handled')
  // Each was published once through a key of its own, kept for the idempotency window.
  const onceKeys = await redis.keys(`${prefix}once:ingress:*`)
  t.equal(onceKeys.length, 20, 'one once-key per entry')
  const ttls = await Promise.all(onceKeys.map(async (key) => await redis.ttl(key)))
  t.ok(ttls.every((ttl) => ttl > 0 && ttl <= 600), `each expires within IDEMPOTENCY_WINDOW_S (${Math.min(...ttls)}–${Math.max(...ttls)} s)`)
})

t.test('durable ingress: a pending entry deleted from the stream before any holder handled it is logged, and does not hold up the rest', async (t) => {
  if (!(await needRedis(t))) return
  const prefix = uniquePrefix('durdeleted')
  const redis = redisClient(t)
  const key = `${prefix}ingress`
  const entry = (event: string): string => JSON.stringify({ to: { user: 'u1' }, event, data: 1 })
  // A holder that is gone read it (it is pending to that holder), then a backend deleted it.
  await redis.xgroup('CREATE', key, 'gateway', '0', 'MKSTREAM')
  const lost = await redis.xadd(key, '*', 'payload', entry('lost'))
  await redis.xreadgroup('GROUP', 'gateway', 'gone-holder', 'COUNT', 10, 'STREAMS', key, '>')
  await redis.xdel(key, lost ?? '')
  const gateway = await startGateway(t, { REDIS_URL, REDIS_PREFIX: prefix }, { captureLogs: true })
  const { stream } = await openConnected(`${gateway.url}/v1/stream?token=${userToken('u1')}`, { t })
  await eventually(() => gateway.logText().includes('deleted from the stream before they were handled'), 'the lost entry logged', 10_000)
  await redis.xadd(key, '*', 'payload', entry('marker'))
  await stream.nextEvent('marker', 10_000)
  t.notOk(stream.events.some((event) => event.event === 'lost'), 'nothing for the deleted entry')
  const [pending] = await redis.xpending(key, 'gateway') as [number]
  t.equal(pending, 0, 'nothing left pending')
})

t.test('durable ingress: entries added while its consumer group is missing (the stream deleted, or before any gateway ran) are delivered', async (t) => {
  if (!(await needRedis(t))) return
  const { gateways: [gateway], prefix } = await cluster(t, 1)
  await eventually(() => gateway.app.ingress?.isLeader === true, 'the only instance to take the lease')
  const { stream } = await openConnected(`${gateway.url}/v1/stream?token=${userToken('u1')}`, { t })
  const redis = redisClient(t)
  const entry = (n: number): string => JSON.stringify({ to: { user: 'u1' }, event: 'seq', data: n })
  // Deleting the stream deletes its group: the next read makes it again, with these two already in.
  await redis.multi().del(`${prefix}ingress`).xadd(`${prefix}ingress`, '*', 'payload', entry(1)).xadd(`${prefix}ingress`, '*', 'payload', entry(2)).exec()
  await stream.next((event) => event.data === '2', 10_000, 'the second entry')
  t.same(stream.events.filter((event) => event.event === 'seq').map((event) => event.data), ['1', '2'], 'both, in order')
})

t.test('durable ingress: an entry its holder published but never acknowledged is claimed by the next holder as it takes over, and not published again', async (t) => {
  if (!(await needRedis(t))) return
  const prefix = uniquePrefix('durclaim')
  const proxy = await FaultyProxy.start(t, Number(new URL(REDIS_URL).port || 6379))
  const env = { REDIS_PREFIX: prefix, INSTANCE_TTL_MS: '2000' }
  const a = await startGateway(t, { ...env, REDIS_URL: proxy.url })
  // Teardowns run last first: A gets Redis back before it is closed.
  t.teardown(() => proxy.restore())
  await eventually(() => a.app.ingress?.isLeader === true, 'A to take the lease')
  const b = await startGateway(t, { ...env, REDIS_URL }, { captureLogs: true })
  const { stream } = await openConnected(`${b.url}/v1/stream?token=${userToken('u1')}`, { t })
  const redis = redisClient(t)

  // A's commands connection hears nothing back: its publish of the entry
  // runs in Redis, but A never gets to acknowledge the entry.
  proxy.holdReplies('sse-gateway')
  await redis.xadd(`${prefix}ingress`, '*', 'payload', JSON.stringify({ to: { user: 'u1' }, event: 'entry', data: 1 }))
  await stream.nextEvent('entry', 10_000)
  // Then A is gone for Redis: its lease runs out and B takes over.
  proxy.cutOff()
  await eventually(() => b.app.ingress?.isLeader === true, 'B to take the lease', 15_000)
  // Well within the 30 s after which an idle entry is claimed anyway.
  await eventually(async () => await redis.xlen(`${prefix}ingress`) === 0, 'B to claim, handle and delete the entry', 10_000)
  await redis.xadd(`${prefix}ingress`, '*', 'payload', JSON.stringify({ to: { user: 'u1' }, event: 'marker', data: 2 }))
  await stream.nextEvent('marker', 10_000)
  t.equal(stream.events.filter((event) => event.event === 'entry').length, 1, 'the entry was published once')
  t.equal(metricValue(await scrape(b.url), 'sse_ingress_repeats_total'), 1, 'B counts the repeat it skipped')
  t.match(b.logText(), /"entry":"ingress:\d+-\d+".*"msg":"ingress entry already published: skipped"/, 'and logs it with its entry id')
  proxy.restore()
  await eventually(() => a.app.bus.isReady(), 'A back on Redis', 10_000)
  // A's publish, sent again on its new connection, is a repeat too.
  await redis.xadd(`${prefix}ingress`, '*', 'payload', JSON.stringify({ to: { user: 'u1' }, event: 'marker', data: 3 }))
  await stream.next((event) => event.event === 'marker' && event.data === '3', 10_000, 'the last marker')
  t.equal(stream.events.filter((event) => event.event === 'entry').length, 1, 'still once')
})

t.test('durable ingress: each holder reads under its own consumer name; once a new holder has claimed what the last one left, the group lists it alone', async (t) => {
  if (!(await needRedis(t))) return
  const prefix = uniquePrefix('durconsumers')
  const env = { REDIS_URL, REDIS_PREFIX: prefix, INSTANCE_TTL_MS: '2000' }
  const a = await startGateway(t, env)
  await eventually(() => a.app.ingress?.isLeader === true, 'A to take the lease')
  const b = await startGateway(t, env)
  const { stream } = await openConnected(`${b.url}/v1/stream?token=${userToken('u1')}`, { t })
  const redis = redisClient(t)
  const consumers = async (): Promise<string[]> => ((await redis.xinfo('CONSUMERS', `${prefix}ingress`, 'gateway')) as string[][]).map((fields) => fields[1])
  await redis.xadd(`${prefix}ingress`, '*', 'payload', JSON.stringify({ to: { user: 'u1' }, event: 'first', data: 1 }))
  await stream.nextEvent('first', 10_000)
  t.same(await consumers(), [a.app.registry.instanceId], 'A read it')

  await a.app.close()
  await eventually(() => b.app.ingress?.isLeader === true, 'B to take the lease', 15_000)
  await redis.xadd(`${prefix}ingress`, '*', 'payload', JSON.stringify({ to: { user: 'u1' }, event: 'second', data: 2 }))
  await stream.nextEvent('second', 10_000)
  await eventually(async () => (await consumers()).length === 1, 'A\'s consumer removed', 10_000, 100)
  t.same(await consumers(), [b.app.registry.instanceId], 'the group lists B alone')
})

t.test('bad ingress messages are counted, logged without their data, dropped; the gateway goes on', async (t) => {
  if (!(await needRedis(t))) return
  const prefix = uniquePrefix('badingress')
  // A Redis of its own: stream:* has no prefix, and other tests' messages there would reach its counters.
  const own = await startOwnRedis(t)
  const gateway = await startGateway(t, { REDIS_URL: own.url, REDIS_PREFIX: prefix }, { captureLogs: true })
  const redis = redisClient(t, own.url)
  await eventually(async () => gateway.app.ingress?.isLeader === true, 'the only instance to take the lease')
  const { stream, connected } = await openConnected(`${gateway.url}/v1/stream?token=${userToken('u1')}`, { t })
  const secret = 'SECRET-DATA-93f1'
  await redis.publish(`${prefix}publish`, `not json ${secret}`)
  await redis.publish(`${prefix}publish`, JSON.stringify({ to: { user: 'u1' }, event: 'bad\nname', data: secret }))
  await redis.publish(`${prefix}publish`, JSON.stringify([{ to: { user: 'u1' }, data: secret }, { to: {}, data: secret }]))
  await redis.publish(`stream:${connected.connectionId}`, JSON.stringify({ event: 'x', data: 'y'.repeat(300_000) + secret }))
  // Not UTF-8 (a stray byte; a surrogate half): refused, as a POST body is, not read with U+FFFD.
  await redis.publish(`${prefix}publish`, Buffer.concat([Buffer.from(`{"to":{"user":"u1"},"event":"x","data":"${secret}`), Buffer.from([0xff]), Buffer.from('"}')]))
  await redis.publish(`stream:${connected.connectionId}`, Buffer.concat([Buffer.from(`{"event":"x","data":"${secret}`), Buffer.from([0xed, 0xa0, 0x80]), Buffer.from('"}')]))
  // A byte order mark before the JSON is skipped, as POST /v1/publish skips it.
  const bom = '\ufeff'
  await redis.publish(`${prefix}publish`, bom + JSON.stringify({ to: { user: 'u1' }, event: 'bom', data: 'publish' }))
  await redis.publish(`stream:${connected.connectionId}`, bom + JSON.stringify({ event: 'bom', data: 'stream' }))
  await redis.xadd(`${prefix}ingress`, '*', 'payload', bom + JSON.stringify({ to: { user: 'u1' }, event: 'bom', data: 'durable' }))
  await stream.next((event) => event.event === 'bom' && event.data === 'durable', undefined, 'the durable entry with a byte order mark')
  await redis.publish(`stream:${connected.connectionId}`, JSON.stringify({ event: 'ok', data: 'after the bad ones' }))
  const ok = await stream.nextEvent('ok')
  t.equal(ok.data, 'after the bad ones')
  t.same(stream.events.filter((event) => event.event === 'bom').map((event) => event.data).sort(), ['durable', 'publish', 'stream'], 'messages starting with a byte order mark delivered, once each')
  t.notOk(stream.events.some((event) => event.data.includes(secret)), 'nothing of a bad message was delivered')
  const metrics = (await request(`${gateway.url}/metrics`)).text
  const rejected = [...metrics.matchAll(/^sse_ingress_rejected_total\{[^}]*\} (\d+)/gm)].reduce((sum, match) => sum + Number(match[1]), 0)
  t.equal(rejected, 6, 'six rejects counted')
  t.equal(gateway.logs.filter((line) => line.includes('ingress message dropped')).length, 6, 'six rejects logged')
  t.equal(gateway.logs.filter((line) => line.includes('not UTF-8')).length, 2, 'two of them as not UTF-8')
  t.notOk(gateway.logText().includes(secret), 'no data in the logs')
})

t.test('shared state: a stream id pre-created on A is joined on B; stats are cluster-wide', async (t) => {
  if (!(await needRedis(t))) return
  const { gateways: [a, b] } = await cluster(t, 2)
  const created = await request<{ connectionId: string }>(`${a.url}/v1/connections`, { method: 'POST', token: publisher, body: { userId: 'joiner' } })
  t.equal(created.status, 201)
  const { connectionId } = created.json
  await publishOk(a.url, publisher, { to: { connection: connectionId }, event: 'early', data: 'before join' })
  const { stream, connected } = await openConnected(`${b.url}/v1/stream/${connectionId}?token=${userToken('joiner')}`, { t })
  t.equal(connected.connectionId, connectionId)
  t.equal((await stream.nextEvent('early')).data, 'before join')
  await openConnected(`${a.url}/v1/stream?token=${userToken('other')}&topics=x`, { t })
  const seen = await stats(a)
  t.match(seen, { connections: 2, users: 2, topics: { x: 1 }, instances: 2 })
  t.same(await stats(b), seen, 'both instances see the same cluster')
})

t.test('Redis stopped and restarted: /ready turns 503 then 200, open streams survive and keep receiving, old cursors reset', async (t) => {
  if (!(await needRedis(t))) return
  const redis = await startOwnRedis(t)
  const prefix = uniquePrefix('outage')
  const env = { REDIS_URL: redis.url, REDIS_PREFIX: prefix, INSTANCE_TTL_MS: '2000' }
  const a = await startGateway(t, env)
  const b = await startGateway(t, env)
  const { stream } = await openConnected(`${a.url}/v1/stream?token=${userToken('u1')}&topics=news`, { t })
  const [before] = await publishOk(b.url, publisher, { to: { user: 'u1' }, data: 'before' })
  await stream.next((event) => event.id === before)

  await redis.stop()
  await eventually(async () => (await request(`${a.url}/ready`)).status === 503, '/ready to answer 503 while Redis is down')
  const refused = await request(`${b.url}/v1/publish`, { method: 'POST', token: publisher, body: { to: { user: 'u1' }, data: 'x' } })
  t.equal(refused.status, 503, 'publishing answers 503, not 500')
  t.equal((await openStream(`${b.url}/v1/stream?token=${userToken('u2')}`, { t })).status, 503, 'new streams are refused with 503')
  t.equal(stream.ended, false, 'the open stream stays open')

  await redis.start()
  await eventually(async () => (await request(`${a.url}/ready`)).status === 200 && (await request(`${b.url}/ready`)).status === 200, 'both instances ready again', 20_000)
  // The subscriber connection re-subscribes on reconnect; publish until the open stream hears it.
  let after = ''
  await eventually(async () => {
    after = (await publishOk(b.url, publisher, { to: { topic: 'news' }, data: 'after' }))[0]
    return stream.events.some((event) => event.data === 'after')
  }, 'the old stream to receive again', 15_000, 200)
  t.ok(BigInt(after) > BigInt(before), 'ids go on increasing after Redis lost everything')
  const reconnect = await openStream(`${b.url}/v1/stream?token=${userToken('u1')}`, { t, headers: { 'last-event-id': before } })
  await reconnect.nextEvent('connected')
  const reset = await reconnect.next(() => true)
  t.equal(reset.event, 'reset', 'a cursor from before the store lost its history gets reset')
  t.same(JSON.parse(reset.data), { reason: 'unknown' })
})

t.test('Redis restarted from an older snapshot: a cursor past what it kept gets reset, after new publishes too, not a silent gap; a cursor from after the restart replays', async (t) => {
  if (!(await needRedis(t))) return
  const dir = await mkdtemp(join(tmpdir(), 'gw-snapshot-'))
  t.teardown(async () => await rm(dir, { recursive: true, force: true }))
  const redis = await startOwnRedis(t, ['--dir', dir])
  const gateway = await startGateway(t, { REDIS_URL: redis.url, REDIS_PREFIX: uniquePrefix('snapshot') })
  const client = redisClient(t, redis.url)
  await publishOk(gateway.url, publisher, { to: { user: 'u1' }, data: 'kept' })
  await client.save()
  // Published after the snapshot: lost when Redis comes back from it.
  const [seen] = await publishOk(gateway.url, publisher, { to: { user: 'u1' }, data: 'seen' })
  await publishOk(gateway.url, publisher, { to: { user: 'u1' }, data: 'missed' })

  await redis.stop()
  await redis.start()
  let after = ''
  await eventually(async () => {
    const answer = await request<{ id?: string }>(`${gateway.url}/v1/publish`, { method: 'POST', token: publisher, body: { to: { user: 'u1' }, data: 'after' } })
    after = answer.json?.id ?? ''
    return answer.status === 202
  }, 'a publish answered after the restart', 20_000, 100)

  const { stream: stale, first: reset } = await reconnectWith(t, gateway, seen)
  t.same([reset.event, JSON.parse(reset.data)], ['reset', { reason: 'unknown' }], 'the cursor of an event the store lost gets reset')
  await publishOk(gateway.url, publisher, { to: { user: 'u1' }, data: 'live' })
  t.equal((await stale.next(() => true)).data, 'live', 'then live events, nothing older')

  t.equal((await reconnectWith(t, gateway, after)).first.data, 'live', 'a cursor from after the restart replays what followed it')
})

t.test('Redis back from an older snapshot: a publish sent as the connection turns ready, a tick before ioredis says so, still waits for the restart check and goes out in the new epoch', async (t) => {
  if (!(await needRedis(t))) return
  const dir = await mkdtemp(join(tmpdir(), 'gw-snapshot-'))
  t.teardown(async () => await rm(dir, { recursive: true, force: true }))
  const redis = await startOwnRedis(t, ['--dir', dir])
  const prefix = uniquePrefix('readytick')
  const gateway = await startGateway(t, { REDIS_URL: redis.url, REDIS_PREFIX: prefix })
  const client = redisClient(t, redis.url)
  await publishOk(gateway.url, publisher, { to: { user: 'u1' }, data: 'kept' })
  await client.save()
  await publishOk(gateway.url, publisher, { to: { user: 'u1' }, data: 'lost' })

  // ioredis sets the status, then emits 'ready' on the next tick.
  const commands = (gateway.app.state as unknown as { commands: { redis: { setStatus: (status: string, arg?: unknown) => void } } }).commands.redis
  const setStatus = commands.setStatus.bind(commands)
  let sentAsReady: Promise<number[]> | null = null
  commands.setStatus = (status, arg) => {
    setStatus(status, arg)
    if (status === 'ready' && sentAsReady === null) sentAsReady = gateway.app.bus.publish([{ channels: [channel.user('u1')], body: 'data: as ready\n' }])
  }
  t.teardown(() => { commands.setStatus = setStatus })
  await redis.stop()
  await redis.start()
  await eventually(() => sentAsReady !== null, 'the commands connection to turn ready', 20_000, 20)
  const [id] = await (sentAsReady as unknown as Promise<number[]>)
  const epoch = Number(await client.get(`${prefix}epoch`))
  t.ok(id >= epoch, `its id (${id}) is in the epoch started at the restart (${epoch}): a cursor at it replays rather than resets`)
})

t.test('a Redis whose ACL refuses INFO: the gateway starts, publishes and replays, without the restart check', async (t) => {
  if (!(await needRedis(t))) return
  const redis = await startOwnRedis(t)
  await redisClient(t, redis.url).acl('SETUSER', 'default', 'on', 'nopass', '~*', '&*', '+@all', '-info')
  const gateway = await startGateway(t, { REDIS_URL: redis.url, REDIS_PREFIX: uniquePrefix('noinfo') })
  const [first] = await publishOk(gateway.url, publisher, { to: { user: 'u1' }, data: 'first' })
  await publishOk(gateway.url, publisher, { to: { user: 'u1' }, data: 'second' })
  t.equal((await reconnectWith(t, gateway, first)).first.data, 'second')
})

t.test('an event body gone from Redis before its window ended (evicted, deleted): a cursor before it gets reset (trimmed), not a silent gap', async (t) => {
  if (!(await needRedis(t))) return
  const prefix = uniquePrefix('evicted')
  const gateway = await startGateway(t, { REDIS_URL, REDIS_PREFIX: prefix })
  const [first] = await publishOk(gateway.url, publisher, { to: { user: 'u1' }, data: 'first' })
  const [gone] = await publishOk(gateway.url, publisher, { to: { user: 'u1' }, data: 'gone' })
  await publishOk(gateway.url, publisher, { to: { user: 'u1' }, data: 'last' })
  await redisClient(t).del(`${prefix}e:${gone}`)
  const reset = (await reconnectWith(t, gateway, first)).first
  t.same([reset.event, JSON.parse(reset.data)], ['reset', { reason: 'trimmed' }])
})

t.test('a Redis whose maxmemory-policy may evict keys gets a warning at start; one with noeviction none', async (t) => {
  if (!(await needRedis(t))) return
  const evicting = await startOwnRedis(t, ['--maxmemory-policy', 'volatile-lru'])
  const warned = await startGateway(t, { REDIS_URL: evicting.url, REDIS_PREFIX: uniquePrefix('policy') }, { captureLogs: true })
  const warning = warned.logs.map((line) => JSON.parse(line) as Record<string, unknown>).find((line) => 'maxmemoryPolicy' in line)
  t.match(warning, { level: 40, maxmemoryPolicy: 'volatile-lru' }, 'a warning names the policy')
  const quiet = await startOwnRedis(t, ['--maxmemory-policy', 'noeviction'])
  const unwarned = await startGateway(t, { REDIS_URL: quiet.url, REDIS_PREFIX: uniquePrefix('policy') }, { captureLogs: true })
  t.notOk(unwarned.logText().includes('maxmemoryPolicy'), 'no warning under noeviction')
})

t.test('the epoch key lost (evicted, deleted): the next publish starts a new one, so cursors from before reset and later ones replay again', async (t) => {
  if (!(await needRedis(t))) return
  const prefix = uniquePrefix('epoch')
  const gateway = await startGateway(t, { REDIS_URL, REDIS_PREFIX: prefix })
  const [before] = await publishOk(gateway.url, publisher, { to: { user: 'u1' }, data: 'before' })
  await redisClient(t).del(`${prefix}epoch`)
  const [cursor] = await publishOk(gateway.url, publisher, { to: { user: 'u1' }, data: 'cursor' })
  await publishOk(gateway.url, publisher, { to: { user: 'u1' }, data: 'next' })

  t.equal((await reconnectWith(t, gateway, cursor)).first.data, 'next', 'a cursor from after the loss replays')
  t.equal((await reconnectWith(t, gateway, before)).first.event, 'reset', 'one from before gets reset')
})

t.test('an instance killed with SIGKILL leaves the instance list and the counts within its TTL', async (t) => {
  if (!(await needRedis(t))) return
  const prefix = uniquePrefix('sigkill')
  const historyTtlS = 30
  const env = { REDIS_URL, REDIS_PREFIX: prefix, INSTANCE_TTL_MS: '2000', MAX_CONNECTIONS_PER_USER: '2', PRESENCE_GRACE_MS: '200', HISTORY_TTL_S: String(historyTtlS) }
  const survivor = await startGateway(t, env)
  const doomed = await spawnServer(t, { ...env, JWT_SECRET: TEST_SECRET, LOG_LEVEL: 'warn', HOST: '127.0.0.1' })
  await request(`${survivor.url}/v1/conversations/c1/members`, { method: 'PUT', token: publisher, body: { members: ['victim', 'friend'] } })
  const friend = (await openConnected(`${survivor.url}/v1/stream?token=${userToken('friend')}`, { t })).stream
  const first = await openConnected(`${doomed.url}/v1/stream?token=${userToken('victim')}&topics=gone`, { t })
  const second = await openConnected(`${doomed.url}/v1/stream?token=${userToken('victim')}`, { t })
  const subscribed = await request(`${survivor.url}/v1/subscriptions`, { method: 'POST', token: userToken('victim'), body: { topics: ['user-wide'] } })
  t.equal(subscribed.status, 200, 'a user-wide subscription')
  await friend.nextEvent('user:online')
  t.match(await stats(survivor), { connections: 3, users: 2, instances: 2, topics: { gone: 1 } })
  t.equal((await openStream(`${survivor.url}/v1/stream?token=${userToken('victim')}`, { t })).status, 429, 'the per-user limit counts streams on the other instance')

  doomed.child.kill('SIGKILL')
  await doomed.exited
  await eventually(async () => {
    const now = await stats(survivor)
    return now.instances === 1 && now.connections === 1 && now.topics.gone === undefined
  }, 'the dead instance and its streams to stop counting', 10_000, 100)
  const offline = await friend.nextEvent('user:offline', 10_000)
  t.same(JSON.parse(offline.data), { userId: 'victim' }, 'the members of its conversations learn it went offline')
  // As after a clean close: the ids stay reopenable, and the user-wide
  // topics kept, for HISTORY_TTL_S, then they go.
  const redis = redisClient(t)
  for (const { connectionId } of [first.connected, second.connected]) {
    const ttl = await redis.ttl(`${prefix}conn:${connectionId}`)
    t.ok(ttl > 0 && ttl <= historyTtlS, `stream id ${connectionId} expires in ${ttl} s`)
  }
  const topicsTtl = await redis.ttl(`${prefix}ut:victim`)
  t.ok(topicsTtl > 0 && topicsTtl <= historyTtlS, `the user-wide topics expire in ${topicsTtl} s`)
  t.equal((await openStream(`${survivor.url}/v1/stream?token=${userToken('victim')}`, { t })).status, 200, 'its streams no longer count against the user')
})

t.test('reopens by id without a cursor read the last id with a plain GET: no INFO (the epoch check) per reopen', async (t) => {
  if (!(await needRedis(t))) return
  const redis = await startOwnRedis(t)
  const gateway = await startGateway(t, { REDIS_URL: redis.url, REDIS_PREFIX: uniquePrefix('lastid') })
  const client = redisClient(t, redis.url)
  const first = await openConnected(`${gateway.url}/v1/stream?token=${userToken('alice')}`, { t })
  first.stream.close()
  const infoCalls = async (): Promise<number> => Number(/cmdstat_info:calls=(\d+)/.exec(await client.info('commandstats'))?.[1] ?? 0)
  const before = await infoCalls()
  for (let n = 0; n < 10; n++) {
    const { stream } = await openConnected(`${gateway.url}/v1/stream/${first.connected.connectionId}?token=${userToken('alice')}`, { t })
    stream.close()
  }
  // The test's own INFO is counted by the time it answers: one per reading.
  t.equal(await infoCalls() - before, 1, 'ten reopens, no INFO of the gateway\'s')
})
