import t from 'tap'
import {
  eventually, forEachMode, nowS, openConnected, openStream, publish, publishOk, publisherToken, request, secondsAhead, startCluster,
  startGateway, token, userToken, type SseClient
} from './helpers'
import { redisClient, startOwnRedis, uniquePrefix } from './helpers/redis'
import { lagOfInterval } from '../plugins/metrics'
import {
  flood, floodMaxBytes, getRequest, hasMetric, metricValue, neverReadingStream, parseMetrics, rawConnect, scrape
} from './helpers/raw'

const publisher = publisherToken()

function streamUrl (url: string, userId: string): string {
  return `${url}/v1/stream?token=${userToken(userId)}`
}

t.test('GET /metrics answers Prometheus text without a token', async (t) => {
  const { url } = await startGateway(t)
  const response = await request(`${url}/metrics`)
  t.equal(response.status, 200)
  t.match(response.headers.get('content-type'), /^text\/plain/)
  t.match(response.text, /^# HELP sse_connections /m)
  t.match(response.text, /^# TYPE sse_connections gauge$/m)
  t.ok(parseMetrics(response.text).length > 20, 'many samples')
})

forEachMode(t, 'open 7 streams: sse_connections is 7 (labelled with the instance); close one: 6, and closed_total{reason="client"} 1', async (t, mode) => {
  const [gateway] = await startCluster(t, mode, 1)
  const { url, app } = gateway
  const streams: SseClient[] = []
  for (let n = 0; n < 7; n++) streams.push((await openConnected(streamUrl(url, `u${n % 3}`), { t })).stream)
  let samples = await scrape(url)
  t.equal(metricValue(samples, 'sse_connections'), 7, 'sse_connections 7')
  t.equal(metricValue(samples, 'sse_connections', { gateway_instance: app.registry.instanceId }), 7, 'by instance')
  // Prometheus sets `instance` to the scrape target: a label of that name would be renamed.
  t.notOk(samples.some((sample) => 'instance' in sample.labels), 'no sample has a label named instance')
  t.equal(metricValue(samples, 'sse_connections_opened_total'), 7, 'opened_total 7')
  t.equal(metricValue(samples, 'sse_connections_closed_total'), 0, 'nothing closed yet')

  streams[0].close()
  await eventually(async () => metricValue(await scrape(url), 'sse_connections') === 6, 'sse_connections to drop to 6')
  samples = await scrape(url)
  t.equal(metricValue(samples, 'sse_connections_closed_total', { reason: 'client' }), 1, 'closed_total{reason="client"} 1')
  t.equal(metricValue(samples, 'sse_connections_opened_total'), 7, 'opened_total unchanged')
})

t.test('dropping one slow consumer: sse_slow_consumer_drops_total 1 and closed_total{reason="slow"} 1', async (t) => {
  const maxBuffered = 256 * 1024
  const { url, port, app } = await startGateway(t, { MAX_BUFFERED_BYTES: String(maxBuffered) })
  const { connectionId } = await neverReadingStream(t, url, port, 'slow')
  for (let n = 0; n < 6; n++) await openConnected(streamUrl(url, `reader${n}`), { t })
  t.equal(metricValue(await scrape(url), 'sse_slow_consumer_drops_total'), 0, 'no drop before')
  await flood(url, { user: 'slow' }, () => app.registry.get(connectionId) === undefined, floodMaxBytes(maxBuffered))
  await eventually(() => app.registry.get(connectionId) === undefined, 'the slow consumer to be dropped', 10_000)
  const samples = await scrape(url)
  t.equal(metricValue(samples, 'sse_slow_consumer_drops_total'), 1, 'sse_slow_consumer_drops_total 1')
  t.equal(metricValue(samples, 'sse_connections_closed_total', { reason: 'slow' }), 1, 'closed_total{reason="slow"} 1')
  t.equal(metricValue(samples, 'sse_connections_closed_total'), 1, 'nothing else closed')
  t.equal(metricValue(samples, 'sse_connections'), 6, 'the 6 readers remain')
})

t.test('closed_total by reason: evicted, expired, shutdown', async (t) => {
  const { url, app } = await startGateway(t, { MAX_CONNECTIONS_PER_USER: '1', CONNECTION_LIMIT_POLICY: 'evict-oldest' })
  const { stream: evicted } = await openConnected(streamUrl(url, 'u1'), { t })
  await openConnected(streamUrl(url, 'u1'), { t })
  await evicted.nextEvent('evicted')
  // At least a second to open in: `nowS() + 1` may be a few ms away, and the open is then refused (401).
  const { stream: expiring } = await openConnected(`${url}/v1/stream?token=${token({ sub: 'u2', exp: secondsAhead(1) })}`, { t })
  await expiring.nextEvent('auth-expired', 8000)
  await openConnected(streamUrl(url, 'u3'), { t })
  await eventually(async () => {
    const samples = await scrape(url)
    return metricValue(samples, 'sse_connections_closed_total', { reason: 'evicted' }) === 1 &&
      metricValue(samples, 'sse_connections_closed_total', { reason: 'expired' }) === 1
  }, 'evicted and expired to be counted')
  t.pass('closed_total{reason="evicted"} 1 and {reason="expired"} 1')

  // Shutdown closes the 2 streams left; the registry is read directly once the listener is gone.
  await app.close()
  const samples = parseMetrics(await app.metrics.registry.metrics())
  t.equal(metricValue(samples, 'sse_connections_closed_total', { reason: 'shutdown' }), 2, 'closed_total{reason="shutdown"} 2')
  t.equal(metricValue(samples, 'sse_connections'), 0)
})

t.test('sse_events_published_total counts accepted events by target kind', async (t) => {
  const { url } = await startGateway(t)
  const { connected } = await openConnected(streamUrl(url, 'u1'), { t })
  await publishOk(url, publisher, { to: { user: 'u1' }, data: 1 })
  await publishOk(url, publisher, { to: { users: ['u1', 'u2'] }, data: 1 })
  await publishOk(url, publisher, { to: { connection: connected.connectionId }, data: 1 })
  await publishOk(url, publisher, { to: { conversation: 'c1' }, data: 1 })
  await publishOk(url, publisher, [{ to: { topic: 'news' }, data: 1 }, { to: { topic: 'news' }, data: 2 }, { to: { broadcast: true }, data: 3 }])
  const job = await request(`${url}/v1/jobs/j1`, { method: 'PUT', token: publisher, body: { userId: 'u1', status: 'queued' } })
  t.equal(job.status, 200)
  // Rejected publishes count nothing.
  t.equal((await publish(url, publisher, { to: { user: 'u1' }, event: 'bad name', data: 1 })).status, 400)
  t.equal((await publish(url, userToken('u1'), { to: { user: 'u1' }, data: 1 })).status, 403)

  const samples = await scrape(url)
  const expected: Record<string, number> = { user: 1, users: 1, connection: 1, conversation: 1, topic: 2, broadcast: 1, job: 1 }
  for (const [target, count] of Object.entries(expected)) {
    t.equal(metricValue(samples, 'sse_events_published_total', { target }), count, `target="${target}" ${count}`)
  }
  t.equal(metricValue(samples, 'sse_events_published_total'), 8, 'nothing else')
})

t.test('sse_events_delivered_total counts every event written to every stream', async (t) => {
  const { url } = await startGateway(t)
  const a = (await openConnected(streamUrl(url, 'u1'), { t })).stream
  const b = (await openConnected(streamUrl(url, 'u1'), { t })).stream
  const c = (await openConnected(streamUrl(url, 'u2'), { t })).stream
  for (let n = 0; n < 3; n++) await publishOk(url, publisher, { to: { user: 'u1' }, event: 'n', data: n })
  await publishOk(url, publisher, { to: { broadcast: true }, event: 'all', data: 'x' })
  await a.take(4)
  await b.take(4)
  await c.take(1)
  // 3 events to two tabs, one broadcast to three streams.
  t.equal(metricValue(await scrape(url), 'sse_events_delivered_total'), 9)
  // A closed stream's deliveries still count.
  c.close()
  await eventually(async () => metricValue(await scrape(url), 'sse_connections') === 2, 'the closed stream to go')
  t.equal(metricValue(await scrape(url), 'sse_events_delivered_total'), 9, 'still 9 after a stream closed')
})

forEachMode(t, 'sse_events_replayed_total and sse_replay_resets_total follow reconnects', async (t, mode) => {
  const [gateway] = await startCluster(t, mode, 1)
  const { url } = gateway
  const ids: string[] = []
  for (let n = 0; n < 4; n++) ids.push(...await publishOk(url, publisher, { to: { user: 'u1' }, event: 'e', data: n }))
  const replay = await openStream(streamUrl(url, 'u1'), { t, headers: { 'last-event-id': ids[0] } })
  await replay.nextEvent('connected')
  t.same((await replay.take(3)).map((event) => event.id), ids.slice(1))
  let samples = await scrape(url)
  t.equal(metricValue(samples, 'sse_events_replayed_total'), 3, 'replayed 3')
  t.equal(metricValue(samples, 'sse_replay_resets_total'), 0, 'no reset yet')

  const malformed = await openStream(streamUrl(url, 'u1'), { t, headers: { 'last-event-id': 'not-an-id' } })
  await malformed.nextEvent('reset')
  const future = await openStream(streamUrl(url, 'u1'), { t, headers: { 'last-event-id': String(BigInt(ids[3]) + 60_000_000n) } })
  await future.nextEvent('reset')
  samples = await scrape(url)
  t.equal(metricValue(samples, 'sse_replay_resets_total'), 2, 'resets 2')
  const reasons = samples.filter((sample) => sample.name === 'sse_replay_resets_total' && sample.value > 0).map((sample) => sample.labels.reason)
  t.equal(new Set(reasons).size, 2, `by reason (${reasons.join(', ')})`)
  t.equal(metricValue(samples, 'sse_events_replayed_total'), 3, 'a reset replays nothing')
})

t.test('sse_auth_failures_total counts rejected tokens by reason', async (t) => {
  const { url } = await startGateway(t)
  t.equal((await openStream(`${url}/v1/stream`, { t })).status, 401)
  t.equal((await openStream(`${url}/v1/stream?token=${token({ sub: 'u1', exp: nowS() - 10 })}`, { t })).status, 401)
  t.equal((await openStream(`${url}/v1/stream?token=${token({ sub: 'u1' }, { secret: 'wrong' })}`, { t })).status, 401)
  t.equal((await openStream(`${url}/v1/stream?token=${token({ sub: 'u1' }, { secret: 'wrong' })}`, { t })).status, 401)
  t.equal((await openStream(`${url}/v1/stream?token=not-a-jwt`, { t })).status, 401)
  t.equal((await publish(url, userToken('u1'), { to: { user: 'u1' }, data: 1 })).status, 403)
  const samples = await scrape(url)
  const failures = samples.filter((sample) => sample.name === 'sse_auth_failures_total' && sample.value > 0)
  const byReason = Object.fromEntries(failures.map((sample) => [sample.labels.reason, sample.value]))
  t.equal(metricValue(samples, 'sse_auth_failures_total'), 6, `6 failures in all (${JSON.stringify(byReason)})`)
  t.equal(metricValue(samples, 'sse_auth_failures_total', { reason: 'expired' }), 1, 'expired: 1')
  t.same(byReason, { missing: 1, expired: 1, invalid: 2, malformed: 1, forbidden: 1 }, 'missing, expired, a bad signature, not a JWT and forbidden are told apart')
})

forEachMode(t, 'sse_redis_up is 1 while the store answers; event-loop lag and process memory are exported', async (t, mode) => {
  const [gateway] = await startCluster(t, mode, 1)
  const samples = await scrape(gateway.url)
  t.equal(metricValue(samples, 'sse_redis_up'), 1)
  t.ok(samples.some((sample) => /eventloop_lag/.test(sample.name)), 'an event-loop lag metric')
  t.ok(samples.some((sample) => /resident_memory_bytes$/.test(sample.name)), 'resident memory')
  t.ok(samples.some((sample) => /heap_(size_)?used_bytes$/.test(sample.name)), 'heap used')
  t.ok(hasMetric(samples, 'sse_users'), 'users now')
})

forEachMode(t, 'sse_ingress_rejected_total counts Redis ingress messages that do not parse or validate', async (t) => {
  // A Redis of its own: stream:* has no prefix, and other tests' messages there would reach its counters.
  const own = await startOwnRedis(t)
  const [gateway] = await startCluster(t, 'redis', 1, { REDIS_URL: own.url })
  const redis = redisClient(t, own.url)
  const prefix = gateway.app.config.redisPrefix
  // The durable form is read by a consumer group, so nothing is lost to timing.
  await redis.xadd(`${prefix}ingress`, '*', 'payload', 'this is not JSON')
  await redis.xadd(`${prefix}ingress`, '*', 'payload', JSON.stringify({ to: { user: 'u1' }, event: 'bad name', data: 1 }))
  await redis.xadd(`${prefix}ingress`, '*', 'payload', JSON.stringify({ to: { user: 'u1' }, event: 'fine', data: 1 }))
  await eventually(async () => metricValue(await scrape(gateway.url), 'sse_ingress_rejected_total') >= 2, 'two ingress rejects', 10_000)
  const samples = await scrape(gateway.url)
  t.equal(metricValue(samples, 'sse_ingress_rejected_total'), 2, 'two rejected')
  await eventually(async () => metricValue(await scrape(gateway.url), 'sse_events_published_total', { target: 'user' }) === 1, 'the valid one to be published', 10_000)
  t.pass('the valid entry is published')
}, ['redis'])

forEachMode(t, 'two instances: each exports its own sse_connections, labelled with its instance', async (t) => {
  const [a, b] = await startCluster(t, 'redis', 2)
  await openConnected(streamUrl(a.url, 'u1'), { t })
  await openConnected(streamUrl(a.url, 'u2'), { t })
  await openConnected(streamUrl(b.url, 'u1'), { t })
  const onA = await scrape(a.url)
  const onB = await scrape(b.url)
  t.not(a.app.registry.instanceId, b.app.registry.instanceId)
  t.equal(metricValue(onA, 'sse_connections', { gateway_instance: a.app.registry.instanceId }), 2)
  t.equal(metricValue(onB, 'sse_connections', { gateway_instance: b.app.registry.instanceId }), 1)
}, ['redis'])

forEachMode(t, 'sse_redis_up turns 0 while Redis is down and 1 again once it is back; /metrics keeps answering', async (t) => {
  const redis = await startOwnRedis(t)
  const gateway = await startGateway(t, { REDIS_URL: redis.url, REDIS_PREFIX: uniquePrefix('metrics') })
  t.equal(metricValue(await scrape(gateway.url), 'sse_redis_up'), 1, 'up')
  await redis.stop()
  await eventually(async () => metricValue(await scrape(gateway.url), 'sse_redis_up') === 0, 'sse_redis_up 0', 15_000, 100)
  t.pass('down: 0')
  await redis.start()
  await eventually(async () => metricValue(await scrape(gateway.url), 'sse_redis_up') === 1, 'sse_redis_up 1 again', 15_000, 100)
  t.pass('back: 1')
}, ['redis'])

t.test('the event-loop lag summary stays finite when a scrape follows another before the loop ran', async (t) => {
  const { app } = await startGateway(t)
  const lagOf = (text: string): Map<string, number> => new Map(parseMetrics(text)
    .filter((sample) => /^sse_gateway_nodejs_eventloop_lag_(min|max|mean|stddev|p50|p90|p99)_seconds$/.test(sample.name))
    .map((sample) => [sample.name, sample.value]))
  // A first scrape that read samples (each scrape empties the histogram).
  let first = new Map<string, number>()
  await eventually(async () => {
    first = lagOf(await app.metrics.registry.metrics())
    return (first.get('sse_gateway_nodejs_eventloop_lag_max_seconds') ?? 0) > 0
  }, 'a scrape with event-loop delay samples')
  // No timer can fire between the two: the delay histogram has no new sample.
  const second = lagOf(await app.metrics.registry.metrics())
  t.equal(second.size, 7, 'all seven lag gauges are there')
  for (const [name, value] of second) {
    t.ok(Number.isFinite(value) && value >= 0 && value < 60, `${name} is a delay (${value})`)
    t.equal(value, first.get(name), `${name} keeps the last scrape's value`)
  }
})

t.test('the event-loop lag leaves out the sampling timer\'s own period (an idle loop is not 10 ms late)', async (t) => {
  t.equal(lagOfInterval(10_000_000, 10), 0, 'a tick exactly on time: no lag')
  t.equal(lagOfInterval(12_500_000, 10), 2_500_000, 'a tick 2.5 ms late')
  t.equal(lagOfInterval(9_990_000, 10), 0, 'never below zero (the timer may fire early by its clock)')
})

forEachMode(t, 'a stream closed in the middle of its replay: the events it was written count as delivered as well as replayed', async (t, mode) => {
  const [{ url, port }] = await startCluster(t, mode, 1)
  const [cursor] = await publishOk(url, publisher, { to: { user: 'u1' }, data: 'before' })
  const big = 'x'.repeat(48 * 1024)
  for (let batch = 0; batch < 20; batch++) {
    await publishOk(url, publisher, Array.from({ length: 10 }, () => ({ to: { user: 'u1' }, data: big })))
  }
  // A reader that takes part of the replay (about 10 MB), then goes.
  const raw = await rawConnect(t, port)
  raw.write(getRequest(`/v1/stream?token=${userToken('u1')}`, port, { 'last-event-id': cursor }))
  await raw.until(() => raw.bytes > 1_000_000, 10_000, 'part of the replay')
  raw.destroy()

  await eventually(async () => metricValue(await scrape(url), 'sse_connections') === 0, 'the stream closed', 10_000, 50)
  const samples = await scrape(url)
  const replayed = metricValue(samples, 'sse_events_replayed_total')
  t.ok(replayed > 0 && replayed < 200, `part of the replay was written (${replayed} of 200)`)
  t.equal(metricValue(samples, 'sse_events_delivered_total'), replayed, 'delivered counts them too')
})

forEachMode(t, 'presence events count as published (target="presence"), once each however many members hear them', async (t, mode) => {
  const [gateway] = await startCluster(t, mode, 1, { PRESENCE_GRACE_MS: '100' })
  const { url } = gateway
  const answer = await request(`${url}/v1/conversations/c1/members`, { method: 'PUT', token: publisher, body: { members: ['u1', 'u2', 'u3'] } })
  t.equal(answer.status, 200)
  // Its own coming online goes to u1 and u3, not to itself.
  const { stream: watcher } = await openConnected(streamUrl(url, 'u2'), { t })
  const presence = async (): Promise<number> => metricValue(await scrape(url), 'sse_events_published_total', { target: 'presence' })
  await eventually(async () => await presence() === 1, 'u2 coming online counted once', 10_000, 50)
  const { stream } = await openConnected(streamUrl(url, 'u1'), { t })
  await watcher.nextEvent('user:online')
  stream.close()
  await watcher.nextEvent('user:offline')
  await eventually(async () => await presence() === 3, 'u1 online and offline counted', 10_000, 50)
  // Only the presence label: in Redis mode other test files' stream:* ingress messages may count under "connection".
  t.equal(metricValue(await scrape(url), 'sse_events_published_total', { target: 'user' }), 0, 'not counted as published to users')
})
