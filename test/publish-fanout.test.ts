/**
 * How many channels one publish may write to (MAX_PUBLISH_CHANNELS): each
 * channel of each event is a history append, in Redis inside one script
 * that holds every other client up. Past the limit the publish is refused
 * whole (413 on the POST, counted and dropped on Redis ingress); within it, a
 * batch to a large conversation goes out in Redis mode as in embedded mode.
 */
import t from 'tap'
import { eventually, publish, request, startGateway } from './helpers'
import { connect, pair, PUBLISHER, setMembers } from './helpers/channels'
import { forEachMode } from './helpers/modes'
import { metricValue, scrape } from './helpers/raw'
import { needRedis, redisClient, startOwnRedis, uniquePrefix } from './helpers/redis'

const memberList = (count: number): string[] => Array.from({ length: count }, (_, index) => `m${index}`)
const batchTo = (conversation: string, count: number): Array<Record<string, unknown>> =>
  Array.from({ length: count }, (_, index) => ({ to: { conversation }, event: 'seq', data: index }))

forEachMode(t, 'a publish past MAX_PUBLISH_CHANNELS is 413 and publishes nothing; one at the limit goes out', async (t, mode) => {
  const [a, b] = await pair(t, mode, { MAX_PUBLISH_CHANNELS: '100' })
  await setMembers(a, 'room', memberList(10))
  const member = await connect(t, b, 'm0')

  const over = await publish(a.url, PUBLISHER, batchTo('room', 11))
  t.equal(over.status, 413)
  t.match(over.json, { statusCode: 413, error: 'Payload Too Large', message: /110 channels .* more than the 100 one publish may \(MAX_PUBLISH_CHANNELS\)/ })
  const users = await publish(a.url, PUBLISHER, { to: { users: memberList(101) }, event: 'seq', data: 0 })
  t.equal(users.status, 413, 'one event to 101 users counts 101')

  const within = await publish(a.url, PUBLISHER, batchTo('room', 10))
  t.equal(within.status, 202, '10 events to 10 members: 100 channels')
  await member.stream.next((event) => event.event === 'seq' && event.data === '9', 10_000, 'the last of the batch')
  t.same(member.stream.events.filter((event) => event.event === 'seq').map((event) => event.data),
    ['0', '1', '2', '3', '4', '5', '6', '7', '8', '9'], 'only the batch within the limit arrived, in order')
})

t.test('Redis ingress: a message past MAX_PUBLISH_CHANNELS is counted and dropped, on pub/sub and on the durable stream; the next arrives', async (t) => {
  if (!(await needRedis(t))) return
  const prefix = uniquePrefix('fanoutcap')
  // A Redis of its own: stream:* has no prefix, and other tests' messages there would reach its counters.
  const own = await startOwnRedis(t)
  const gateway = await startGateway(t, { REDIS_URL: own.url, REDIS_PREFIX: prefix, MAX_PUBLISH_CHANNELS: '5' })
  await eventually(() => gateway.app.ingress?.isLeader === true, 'the lease taken')
  await setMembers(gateway, 'room', memberList(6))
  const member = await connect(t, gateway, 'm0')
  const redis = redisClient(t, own.url)
  await redis.publish(`${prefix}publish`, JSON.stringify({ to: { conversation: 'room' }, event: 'big', data: 1 }))
  await redis.xadd(`${prefix}ingress`, '*', 'payload', JSON.stringify({ to: { conversation: 'room' }, event: 'big', data: 2 }))
  await redis.xadd(`${prefix}ingress`, '*', 'payload', JSON.stringify({ to: { user: 'm0' }, event: 'after', data: 3 }))
  // Each path handles its messages in order: a marker after each shows it got past the one refused.
  await redis.publish(`${prefix}publish`, JSON.stringify({ to: { user: 'm0' }, event: 'after', data: 4 }))
  const markers = (): string[] => member.stream.events.filter((event) => event.event === 'after').map((event) => event.data)
  await member.stream.until(() => markers().includes('3') && markers().includes('4'), 10_000, 'the marker of each path')
  t.notOk(member.stream.events.some((event) => event.event === 'big'), 'neither message past the limit was published')
  await eventually(async () => metricValue(await scrape(gateway.url), 'sse_ingress_rejected_total') === 2, 'both counted as rejected')
  t.equal(await redis.xlen(`${prefix}ingress`), 0, 'the durable entries are handled and deleted')
})

t.test('Redis mode: a batch of 1000 events to a 150-member conversation (150,000 channels) is published and arrives', async (t) => {
  if (!(await needRedis(t))) return
  // A Redis of its own: the batch's one script runs for most of a second, and would hold up every other test's commands.
  const own = await startOwnRedis(t)
  const [a, b] = await pair(t, 'redis', { REDIS_URL: own.url, MAX_PUBLISH_CHANNELS: '200000', HISTORY_TTL_S: '60' })
  const members = memberList(150)
  await setMembers(a, 'crowd', members)
  const first = await connect(t, b, 'm0')
  const last = await connect(t, b, 'm149')
  const published = await request<{ ids: string[] }>(`${a.url}/v1/publish`, { method: 'POST', token: PUBLISHER, body: batchTo('crowd', 1000) })
  t.equal(published.status, 202, published.text.slice(0, 300))
  t.equal(published.json.ids?.length, 1000)
  for (const { stream } of [first, last]) {
    await stream.next((event) => event.event === 'seq' && event.data === '999', 20_000, 'the last event of the batch')
    const seen = stream.events.filter((event) => event.event === 'seq')
    t.equal(seen.length, 1000, 'every event, once')
    t.same(seen.map((event) => event.id), published.json.ids, 'with the ids the publish answered, in order')
  }
})
