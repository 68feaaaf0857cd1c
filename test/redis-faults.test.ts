/**
 * Redis mode under network faults between a gateway and Redis, made with a
 * proxy the test controls (test/helpers/proxy.ts): replies held back, then
 * every connection cut.
 */
import t, { type Test } from 'tap'
import { eventually, openConnected, openStream, publish, publishOk, publisherToken, request, startGateway, userToken, type Gateway, type SseClient } from './helpers'
import { FaultyProxy, proxiedCluster } from './helpers/proxy'
import { metricValue, scrape } from './helpers/raw'
import { needRedis, redisClient, REDIS_URL, startOwnRedis, uniquePrefix } from './helpers/redis'
import { StoreUnavailableError, type ScriptedRedis } from '../src/core/redis/client'
import { USER_TOPICS } from '../src/core/redis/scripts'

const publisher = publisherToken()
const redisPort = Number(new URL(REDIS_URL).port || 6379)

/**
 * Two contacts (members of one conversation): `user` with a stream on an
 * instance that reaches Redis through a fault proxy, `friend` on one that
 * reaches it directly, once it has heard `user` come online.
 */
async function contactsAcrossProxy (t: Test, user: string, env: Record<string, string>): Promise<{
  proxy: FaultyProxy
  viaProxy: Gateway
  direct: Gateway
  friend: SseClient
  stream: Awaited<ReturnType<typeof openConnected>>
}> {
  const { proxy, viaProxy, direct } = await proxiedCluster(t, env)
  await request(`${direct.url}/v1/conversations/c1/members`, { method: 'PUT', token: publisher, body: { members: [user, 'friend'] } })
  const friend = (await openConnected(`${direct.url}/v1/stream?token=${userToken('friend')}`, { t })).stream
  const stream = await openConnected(`${viaProxy.url}/v1/stream?token=${userToken(user)}`, { t })
  await friend.nextEvent('user:online')
  return { proxy, viaProxy, direct, friend, stream }
}

t.test('a publish whose reply is lost when the connection drops is not run again: the event goes out once, and the publisher hears it may not have', async (t) => {
  if (!(await needRedis(t))) return
  const prefix = uniquePrefix('resend')
  const { proxy, viaProxy, direct } = await proxiedCluster(t, { REDIS_PREFIX: prefix })
  const { stream } = await openConnected(`${direct.url}/v1/stream?token=${userToken('u1')}`, { t })

  proxy.holdReplies()
  const answer = publish(viaProxy.url, publisher, { to: { user: 'u1' }, event: 'once', data: 1 }).catch((error: Error) => error)
  await stream.nextEvent('once')
  t.pass('Redis ran the publish; its reply is held back')
  proxy.cut()
  const answered = await answer
  if (answered instanceof Error) throw answered
  t.equal(answered.status, 503, 'the publisher is told the store failed (it cannot know the event went out)')

  await eventually(async () => (await request(`${viaProxy.url}/ready`)).status === 200, 'the gateway back on Redis', 10_000, 50)
  // Sent on the same connection as any re-sent command, so it arrives after it.
  await publishOk(viaProxy.url, publisher, { to: { user: 'u1' }, event: 'marker', data: 2 })
  await stream.nextEvent('marker')
  t.equal(stream.events.filter((event) => event.event === 'once').length, 1, 'the event went out once')
})

t.test('events published while an instance\'s bus subscription is down reach its open streams once it is back: in order, none twice, no reconnect', async (t) => {
  if (!(await needRedis(t))) return
  const prefix = uniquePrefix('gap')
  const { proxy, viaProxy, direct } = await proxiedCluster(t, { REDIS_PREFIX: prefix }, { captureLogs: true })
  const { stream } = await openConnected(`${viaProxy.url}/v1/stream?token=${userToken('u1')}&topics=news`, { t })
  const [before] = await publishOk(direct.url, publisher, { to: { user: 'u1' }, event: 'seq', data: 0 })
  t.equal((await stream.nextEvent('seq')).id, before, 'live before the fault')

  // Published while the instance hears nothing: its subscriber's traffic is held, then cut.
  proxy.holdReplies()
  const missed: string[] = []
  for (let n = 1; n <= 5; n++) {
    const body = n % 2 === 0 ? { to: { topic: 'news' }, event: 'seq', data: n } : { to: { user: 'u1' }, event: 'seq', data: n }
    missed.push(...await publishOk(direct.url, publisher, body))
  }
  proxy.cut()
  await eventually(async () => (await request(`${viaProxy.url}/ready`)).status === 200, 'the instance back on Redis', 10_000, 50)
  const [after] = await publishOk(direct.url, publisher, { to: { user: 'u1' }, event: 'seq', data: 6 })

  await stream.next((event) => event.id === after, 10_000, 'the event published after the fault')
  const ids = stream.events.filter((event) => event.event === 'seq').map((event) => event.id)
  t.same(ids, [before, ...missed, after], 'every event, in order, each once')
  t.same(stream.events.filter((event) => event.event !== 'seq').map((event) => event.event), ['connected'], 'no reset, no other event')
  t.notOk(stream.ended, 'the stream stayed open')
  t.match(viaProxy.logText(), /bus subscription lost/, 'the loss is logged')
})

t.test('a stream that closes while its instance cannot reach Redis is released once Redis is back: its id expires, its contacts hear user:offline', async (t) => {
  if (!(await needRedis(t))) return
  const prefix = uniquePrefix('release')
  const historyTtlS = 30
  const { proxy, viaProxy, friend, stream: leaver } = await contactsAcrossProxy(t, 'leaver', { REDIS_PREFIX: prefix, HISTORY_TTL_S: String(historyTtlS), PRESENCE_GRACE_MS: '100' })
  const subscribed = await request(`${viaProxy.url}/v1/subscriptions`, { method: 'POST', token: userToken('leaver'), body: { topics: ['kept'] } })
  t.equal(subscribed.status, 200, 'a user-wide subscription')

  // The instance cannot reach Redis (every connection cut, replies held) while the stream closes.
  proxy.cutOff()
  await eventually(() => !viaProxy.app.bus.isReady(), 'the instance to lose Redis')
  leaver.stream.close()
  await eventually(() => viaProxy.app.registry.size === 0, 'the stream to close')
  proxy.restore()

  const offline = await friend.nextEvent('user:offline', 10_000)
  t.same(JSON.parse(offline.data), { userId: 'leaver' }, 'the contact hears user:offline once the release goes through')
  const redis = redisClient(t)
  const ttl = await redis.ttl(`${prefix}conn:${leaver.connected.connectionId}`)
  t.ok(ttl > 0 && ttl <= historyTtlS, `the stream id expires in ${ttl} s`)
  const topicsTtl = await redis.ttl(`${prefix}ut:leaver`)
  t.ok(topicsTtl > 0 && topicsTtl <= historyTtlS, `the user-wide topics expire in ${topicsTtl} s`)
})

t.test('an instance cut off longer than INSTANCE_TTL_MS is taken for dead (user:offline); when it is back with the stream still open, the contacts hear user:online', async (t) => {
  if (!(await needRedis(t))) return
  const prefix = uniquePrefix('rejoin')
  const { proxy, direct, friend, stream: away } = await contactsAcrossProxy(t, 'away', { REDIS_PREFIX: prefix, INSTANCE_TTL_MS: '2000', PRESENCE_GRACE_MS: '100' })

  proxy.cutOff()
  const offline = await friend.nextEvent('user:offline', 15_000)
  t.same(JSON.parse(offline.data), { userId: 'away' }, 'taken for dead, its user goes offline')
  proxy.restore()

  const online = await friend.nextEvent('user:online', 15_000)
  t.same(JSON.parse(online.data), { userId: 'away' }, 'back with the stream open: user:online again')
  t.notOk(away.stream.ended, 'the stream stayed open')
  const presence = await request<{ online: boolean, connections: number }>(`${direct.url}/v1/presence/away`, { token: publisher })
  t.match(presence.json, { online: true, connections: 1 }, 'presence agrees')
})

t.test('a stream closed while Redis was unreachable, beside another of its user that stays open: its id expires once Redis is back', async (t) => {
  if (!(await needRedis(t))) return
  const prefix = uniquePrefix('release2')
  const historyTtlS = 30
  const proxy = await FaultyProxy.start(t, redisPort)
  const viaProxy = await startGateway(t, { REDIS_PREFIX: prefix, HISTORY_TTL_S: String(historyTtlS), REDIS_URL: proxy.url })
  const staying = await openConnected(`${viaProxy.url}/v1/stream?token=${userToken('two-tabs')}`, { t })
  const closing = await openConnected(`${viaProxy.url}/v1/stream?token=${userToken('two-tabs')}`, { t })

  proxy.cutOff()
  await eventually(() => !viaProxy.app.bus.isReady(), 'the instance to lose Redis')
  closing.stream.close()
  await eventually(() => viaProxy.app.registry.size === 1, 'the stream to close')
  proxy.restore()
  await eventually(async () => (await request(`${viaProxy.url}/ready`)).status === 200, 'the instance back on Redis', 10_000, 50)

  const redis = redisClient(t)
  await eventually(async () => await redis.ttl(`${prefix}conn:${closing.connected.connectionId}`) > 0, 'the closed stream\'s id to get its TTL')
  const ttl = await redis.ttl(`${prefix}conn:${closing.connected.connectionId}`)
  t.ok(ttl > 0 && ttl <= historyTtlS, `the closed stream's id expires in ${ttl} s`)
  t.equal(await redis.ttl(`${prefix}conn:${staying.connected.connectionId}`), -1, 'the open one\'s does not')
  t.notOk(staying.stream.ended, 'the other stream stayed open')
})

t.test('events keep coming while the subscription is restored: with those missed in the gap, each arrives once and in order', async (t) => {
  if (!(await needRedis(t))) return
  const prefix = uniquePrefix('gaplive')
  const { proxy, viaProxy, direct } = await proxiedCluster(t, { REDIS_PREFIX: prefix })
  // Enough channels that resubscribing takes more than one batch.
  const topics = Array.from({ length: 100 }, (_, n) => `t${n}`).join(',')
  const { stream } = await openConnected(`${viaProxy.url}/v1/stream?token=${userToken('u1')}&topics=${topics}`, { t })
  for (let n = 0; n < 12; n++) await openConnected(`${viaProxy.url}/v1/stream?token=${userToken(`other${n}`)}&topics=${topics.replace(/t/g, `o${n}-`)}`, { t })

  const published: string[] = []
  let n = 0
  const send = async (): Promise<void> => { published.push(...await publishOk(direct.url, publisher, { to: { user: 'u1' }, event: 'seq', data: n++ })) }
  await send()
  proxy.holdReplies()
  for (let i = 0; i < 5; i++) await send()
  proxy.cut()
  // Publishing on, as fast as the publisher is answered, until the instance is back.
  let back = false
  const ready = eventually(async () => (await request(`${viaProxy.url}/ready`)).status === 200, 'the instance back on Redis', 10_000, 20).then(() => { back = true })
  while (!back) await send()
  await ready
  for (let i = 0; i < 20; i++) await send()
  const last = published[published.length - 1]

  await stream.next((event) => event.id === last, 10_000, 'the last event')
  t.same(stream.events.filter((event) => event.event === 'seq').map((event) => event.id), published, `all ${published.length} events, in order, each once`)
})

t.test('a job stream whose terminal update came in the gap ends after it, as live', async (t) => {
  if (!(await needRedis(t))) return
  const prefix = uniquePrefix('gapjob')
  const { proxy, viaProxy, direct } = await proxiedCluster(t, { REDIS_PREFIX: prefix })
  const put = async (status: string): Promise<number> => (await request(`${direct.url}/v1/jobs/gapjob`, { method: 'PUT', token: publisher, body: { userId: 'u1', status } })).status
  t.equal(await put('active'), 200)
  const job = await openStream(`${viaProxy.url}/v1/jobs/gapjob/stream`, { t, headers: { authorization: `Bearer ${userToken('u1')}` } })
  await job.nextEvent('initial_status')

  proxy.holdReplies()
  t.equal(await put('completed'), 200, 'completed while the instance hears nothing')
  proxy.cut()
  const update = await job.nextEvent('job_update', 10_000)
  t.match(JSON.parse(update.data), { status: 'completed' })
  await job.waitEnd(10_000)
  t.ok(job.ended, 'the job stream ended after its terminal update')
})

t.test('a stream quiet for longer than the history window, whose channel trimmed events it missed in the gap, gets reset, not a silent hole', async (t) => {
  if (!(await needRedis(t))) return
  const prefix = uniquePrefix('gaptrim')
  const historyTtlS = 2
  const env = { REDIS_PREFIX: prefix, HISTORY_SIZE: '3', HISTORY_TTL_S: String(historyTtlS) }
  const { proxy, viaProxy, direct } = await proxiedCluster(t, env)
  const { stream } = await openConnected(`${viaProxy.url}/v1/stream?token=${userToken('quiet')}`, { t })
  const busy = await openConnected(`${viaProxy.url}/v1/stream?token=${userToken('busy')}`, { t })
  // The scenario is time itself: the quiet stream's opening falls out of the window.
  await new Promise<void>((resolve) => setTimeout(resolve, historyTtlS * 1000 + 500))
  const [seen] = await publishOk(direct.url, publisher, { to: { user: 'busy' }, event: 'seq', data: 0 })
  t.equal((await busy.stream.nextEvent('seq')).id, seen, 'the instance had delivered an event')

  proxy.cutOff()
  await eventually(() => !viaProxy.app.bus.isReady(), 'the instance to lose Redis')
  for (let n = 1; n <= 6; n++) await publishOk(direct.url, publisher, { to: { user: 'quiet' }, event: 'seq', data: n })
  proxy.restore()
  await eventually(async () => (await request(`${viaProxy.url}/ready`)).status === 200, 'the instance back on Redis', 10_000, 50)
  const [marker] = await publishOk(direct.url, publisher, { to: { user: 'quiet' }, event: 'marker', data: 7 })
  await stream.next((event) => event.id === marker, 10_000, 'the marker')
  const reset = stream.events.find((event) => event.event === 'reset')
  t.ok(reset !== undefined, 'the stream is told it missed events it cannot get')
  t.match(JSON.parse(reset?.data ?? '{}'), { reason: 'trimmed' })
})

t.test('an instance that heard nothing for longer than the history window loses Redis briefly: its stream gets what it missed, no reset', async (t) => {
  if (!(await needRedis(t))) return
  const prefix = uniquePrefix('gapquiet')
  const historyTtlS = 2
  const env = { REDIS_PREFIX: prefix, HISTORY_TTL_S: String(historyTtlS) }
  const { proxy, viaProxy, direct } = await proxiedCluster(t, env)
  const { stream } = await openConnected(`${viaProxy.url}/v1/stream?token=${userToken('u1')}`, { t })
  const [first] = await publishOk(direct.url, publisher, { to: { user: 'u1' }, event: 'seq', data: 0 })
  await stream.nextEvent('seq')
  // The scenario is time itself: the last delivery falls out of the window.
  await new Promise<void>((resolve) => setTimeout(resolve, historyTtlS * 1000 + 500))

  proxy.cutOff()
  await eventually(() => !viaProxy.app.bus.isReady(), 'the instance to lose Redis')
  const [missed] = await publishOk(direct.url, publisher, { to: { user: 'u1' }, event: 'seq', data: 1 })
  proxy.restore()
  await eventually(async () => (await request(`${viaProxy.url}/ready`)).status === 200, 'the instance back on Redis', 10_000, 50)
  const [marker] = await publishOk(direct.url, publisher, { to: { user: 'u1' }, event: 'seq', data: 2 })
  await stream.next((event) => event.id === marker, 10_000, 'the marker')
  t.same(stream.events.filter((event) => event.event !== 'connected').map((event) => [event.event, event.id]),
    [['seq', first], ['seq', missed], ['seq', marker]], 'the missed event between the others, no reset')
})

t.test('streams closing while Redis is unreachable, in two outages, then a shutdown: a line at most a minute, and one at the shutdown, not one per stream', async (t) => {
  if (!(await needRedis(t))) return
  const { proxy, viaProxy } = await proxiedCluster(t, { REDIS_PREFIX: uniquePrefix('unrecorded'), LOG_LEVEL: 'warn' }, { captureLogs: true })
  const streams = await Promise.all(['a', 'b', 'c', 'd', 'e'].map(async (user) => (await openConnected(`${viaProxy.url}/v1/stream?token=${userToken(user)}`, { t })).stream))
  const aboutCloses = (): string[] => viaProxy.logs.map((line) => JSON.parse(line) as { msg: string }).filter((line) => /stream close/.test(line.msg)).map((line) => line.msg)
  const recordedLater = 'stream closes are recorded once Redis is back'

  proxy.cutOff()
  await eventually(() => !viaProxy.app.bus.isReady(), 'the instance to lose Redis')
  streams[0].close()
  streams[1].close()
  await eventually(() => viaProxy.app.registry.size === 3, 'two streams to close')
  proxy.restore()
  await eventually(() => viaProxy.app.bus.isReady(), 'Redis back')
  t.same(aboutCloses(), [recordedLater], 'one line for the first outage\'s two closes')

  proxy.cutOff()
  await eventually(() => !viaProxy.app.bus.isReady(), 'the instance to lose Redis again')
  streams[2].close()
  await eventually(() => viaProxy.app.registry.size === 2, 'a third stream to close')
  await viaProxy.app.close()
  t.same(aboutCloses(), [
    recordedLater,
    'stream closes not recorded before stopping (Redis unavailable): this instance\'s streams are reaped once it has been silent for INSTANCE_TTL_MS'
  ], 'none more within the minute, and one for the two closed by the shutdown')
})

t.test('a receiver of control messages that is not a live instance (a frozen process keeps its subscription) does not hold up the others\' answers', async (t) => {
  if (!(await needRedis(t))) return
  const prefix = uniquePrefix('frozen')
  const a = await startGateway(t, { REDIS_URL, REDIS_PREFIX: prefix })
  const b = await startGateway(t, { REDIS_URL, REDIS_PREFIX: prefix })
  // A subscriber that never answers: what a stopped or cut-off instance's subscription is.
  const frozen = redisClient(t)
  await frozen.subscribe(`${prefix}ctl`)
  // Longer than the test waits: only the live instances' replies can end it.
  const state = a.app.state as unknown as { options: { controlTimeoutMs?: number } }
  state.options.controlTimeoutMs = 600_000
  const tab = await openConnected(`${b.url}/v1/stream?token=${userToken('u1')}`, { t })
  const answer = await Promise.race([
    request<{ topics: string[] }>(`${a.url}/v1/subscriptions`, { method: 'POST', token: userToken('u1'), body: { topics: ['news'], connectionId: tab.connected.connectionId } }),
    new Promise<null>((resolve) => { const timer = setTimeout(resolve, 20_000, null); t.teardown(() => clearTimeout(timer)) })
  ])
  t.not(answer, null, 'answered before the frozen receiver\'s control timeout')
  t.same(answer?.json, { topics: ['news'] }, 'with the answer of the instance holding the stream')
})

t.test('a command on a connection whose socket has just gone, before ioredis has noticed: StoreUnavailableError (503), not a plain error (500)', async (t) => {
  if (!(await needRedis(t))) return
  const { ScriptedRedis, StoreUnavailableError } = await import('../src/core/redis/client')
  const commands = new ScriptedRedis(REDIS_URL)
  commands.redis.on('error', () => {})
  t.teardown(() => commands.redis.disconnect())
  await commands.redis.connect()
  t.equal(commands.redis.status, 'ready')
  commands.redis.stream.destroy()
  // Its status still says ready: the close is noticed on a later turn.
  t.equal(commands.redis.status, 'ready')
  const error = await commands.run('INIT', [uniquePrefix('lost')]).then(() => null, (caught: unknown) => caught)
  t.ok(error instanceof StoreUnavailableError, `refused as unavailable (${String(error)})`)
})

t.test('the subscriber dropped again before Redis answers its resubscription: nothing is left unhandled (an unhandled rejection would end the process), and delivery resumes', async (t) => {
  if (!(await needRedis(t))) return
  const { proxy, viaProxy, direct } = await proxiedCluster(t, { REDIS_PREFIX: uniquePrefix('resub') })
  const { stream } = await openConnected(`${viaProxy.url}/v1/stream?token=${userToken('u1')}`, { t })
  const unhandled: string[] = []
  const note = (reason: unknown): void => { unhandled.push(String(reason)) }
  process.on('unhandledRejection', note)
  t.teardown(() => { process.off('unhandledRejection', note) })

  proxy.holdSubscribes()
  proxy.cut('sse-gateway-sub')
  await eventually(() => proxy.heldSubscribers > 0, 'a resubscription held back from Redis')
  proxy.cut('sse-gateway-sub')
  proxy.releaseSubscribes()
  await eventually(() => viaProxy.app.bus.isReady(), 'the subscription back')
  const [id] = await publishOk(direct.url, publisher, { to: { user: 'u1' }, event: 'after', data: 1 })
  t.equal((await stream.nextEvent('after', 10_000)).id, id, 'delivered after the two drops')
  t.same(unhandled, [], 'no rejection left unhandled')
})

/** Deletes every key of the cluster `prefix` names, at once: for that cluster, a FLUSHALL. */
async function emptyRedisOf (t: Test, prefix: string): Promise<void> {
  await redisClient(t).eval("for _, key in ipairs(redis.call('KEYS', ARGV[1])) do redis.call('DEL', key) end return 0", 0, `${prefix}*`)
}

/**
 * A gateway whose user u1 holds its limit of 2 streams, then its cluster
 * emptied. It beats every 20 s: none comes during a test, so only an open
 * can notice.
 */
async function atLimitThenEmptied (t: Test, prefix: string): Promise<Gateway> {
  const gateway = await startGateway(t, { REDIS_URL, REDIS_PREFIX: prefix, MAX_CONNECTIONS_PER_USER: '2', INSTANCE_TTL_MS: '60000' })
  for (let n = 0; n < 2; n++) await openConnected(`${gateway.url}/v1/stream?token=${userToken('u1')}`, { t })
  await emptyRedisOf(t, prefix)
  return gateway
}

t.test('a Redis that stops answering without dropping the connection: a publish and a stream open get 503 after REDIS_COMMAND_TIMEOUT_MS, not an answer held until Redis is back; the admission Redis ran meanwhile is given back', async (t) => {
  if (!(await needRedis(t))) return
  const prefix = uniquePrefix('hung')
  // A Redis of its own: with commands given 300 ms, a long script of another test's on a shared one would fail them.
  const own = await startOwnRedis(t)
  const { proxy, viaProxy, direct } = await proxiedCluster(t, { REDIS_PREFIX: prefix, REDIS_COMMAND_TIMEOUT_MS: '300', MAX_CONNECTIONS_PER_USER: '1', INSTANCE_TTL_MS: '1500' }, {}, own.url)
  const { stream } = await openConnected(`${direct.url}/v1/stream?token=${userToken('u1')}`, { t })

  proxy.holdReplies()
  const refused = await publish(viaProxy.url, publisher, { to: { user: 'u1' }, event: 'in-gap', data: 1 })
  t.equal(refused.status, 503, 'the publish is refused in words')
  t.match(refused.json, { statusCode: 503, code: 'GW_UNAVAILABLE', error: 'Service Unavailable' })
  const open = await openStream(`${viaProxy.url}/v1/stream?token=${userToken('u2')}`, { t })
  t.equal(open.status, 503, 'so is a stream open')
  // Its connections look up; its silence must still take the instance out of a load balancer's rotation.
  const ready = await request<{ status: string }>(`${viaProxy.url}/ready`)
  t.same([ready.status, ready.json], [503, { statusCode: 503, code: 'GW_UNAVAILABLE', error: 'Service Unavailable', message: 'Redis does not answer', status: 'store unavailable' }], '/ready says the store does not answer, in the error shape')
  t.equal(metricValue(await scrape(viaProxy.url), 'sse_redis_up'), 0, 'so does sse_redis_up')
  // Redis ran the publish; only its reply was lost. It was told it may not have.
  await stream.nextEvent('in-gap')

  proxy.releaseReplies()
  await eventually(async () => (await request(`${viaProxy.url}/ready`)).status === 200, '/ready back to 200 once Redis answers', 10_000, 50)
  await eventually(async () => (await publish(viaProxy.url, publisher, { to: { user: 'u1' }, event: 'after', data: 2 })).status === 202, 'publishes answered again', 10_000, 50)
  await stream.nextEvent('after')
  t.equal(stream.events.filter((event) => event.event === 'in-gap').length, 1, 'the event in the gap went out once')
  // Redis admitted u2's refused stream; its one slot must not stay taken by no stream.
  await eventually(async () => (await request<{ connections: number, online: boolean }>(`${direct.url}/v1/presence/u2`, { token: publisher })).json.online === false, 'the refused stream\'s entry given back', 10_000, 50)
  const { stream: u2 } = await openConnected(`${viaProxy.url}/v1/stream?token=${userToken('u2')}`, { t })
  t.notOk(u2.ended, 'u2 opens its one stream')
})

t.test('Redis emptied under a connection that stays up (FLUSHALL): the instance records its open streams again, so the per-user limit and presence hold', async (t) => {
  if (!(await needRedis(t))) return
  const prefix = uniquePrefix('flushed')
  const gateway = await startGateway(t, { REDIS_URL, REDIS_PREFIX: prefix, MAX_CONNECTIONS_PER_USER: '2', INSTANCE_TTL_MS: '1500' })
  for (let n = 0; n < 2; n++) await openConnected(`${gateway.url}/v1/stream?token=${userToken('u1')}`, { t })
  t.equal((await openStream(`${gateway.url}/v1/stream?token=${userToken('u1')}`, { t })).status, 429, 'a third stream is over the limit')

  await emptyRedisOf(t, prefix)
  const presence = async (): Promise<unknown> => (await request(`${gateway.url}/v1/presence/u1`, { token: publisher })).json
  await eventually(async () => JSON.stringify(await presence()) === JSON.stringify({ userId: 'u1', online: true, connections: 2 }), 'the two streams recorded again', 10_000, 50)
  t.equal((await openStream(`${gateway.url}/v1/stream?token=${userToken('u1')}`, { t })).status, 429, 'the limit holds again')
})

t.test('a resync of more streams than one batch (2500, of 2500 users) records every one again', async (t) => {
  if (!(await needRedis(t))) return
  const prefix = uniquePrefix('batches')
  const gateway = await startGateway(t, { REDIS_URL, REDIS_PREFIX: prefix, INSTANCE_TTL_MS: '1500', RATE_LIMIT_STREAMS_PER_MIN: '0' })
  const count = 2500
  for (let start = 0; start < count; start += 100) {
    await Promise.all(Array.from({ length: 100 }, async (_, n) => await openConnected(`${gateway.url}/v1/stream?token=${userToken(`b${start + n}`)}`, { t })))
  }
  const redis = redisClient(t)
  const conns = `${prefix}i:${gateway.app.state.instanceId}:conns`
  t.equal(await redis.hlen(conns), count, 'all listed')
  await emptyRedisOf(t, prefix)
  await eventually(async () => await redis.hlen(conns) === count, 'every stream listed again', 20_000, 100)
  // The users' records come after the list, user by user.
  const counted = async (): Promise<number[]> => await Promise.all([0, 999, 1000, 1999, 2000, 2499].map(async (n) => (await request<{ connections: number }>(`${gateway.url}/v1/presence/b${n}`, { token: publisher })).json.connections))
  await eventually(async () => (await counted()).every((connections) => connections === 1), 'users on either side of each batch counted again', 20_000, 100)
  t.same(await counted(), [1, 1, 1, 1, 1, 1], 'users on either side of each batch count their stream')
})

t.test('Redis emptied under a connection that stays up: an open before the next heartbeat does not get past the per-user limit (its instance records its streams again first)', async (t) => {
  if (!(await needRedis(t))) return
  const gateway = await atLimitThenEmptied(t, uniquePrefix('flushed-open'))
  t.equal((await openStream(`${gateway.url}/v1/stream?token=${userToken('u1')}`, { t })).status, 429, 'a third stream is still over the limit')
  t.match((await request(`${gateway.url}/v1/presence/u1`, { token: publisher })).json, { online: true, connections: 2 }, 'the two streams are recorded again')
})

t.test('Redis emptied under connections that stay up: an open on another instance than the user\'s streams does not get past the per-user limit either (that instance records its streams again when asked)', async (t) => {
  if (!(await needRedis(t))) return
  const prefix = uniquePrefix('flushed-other')
  const holder = await atLimitThenEmptied(t, prefix)
  const other = await startGateway(t, { REDIS_URL, REDIS_PREFIX: prefix, MAX_CONNECTIONS_PER_USER: '2', INSTANCE_TTL_MS: '60000' })
  // The other instance started after the emptying, so it is listed; make it notice as an open would.
  await emptyRedisOf(t, prefix)
  t.equal((await openStream(`${other.url}/v1/stream?token=${userToken('u1')}`, { t })).status, 429, 'a third stream, on the other instance, is over the limit')
  t.match((await request(`${holder.url}/v1/presence/u1`, { token: publisher })).json, { online: true, connections: 2 }, 'the holder recorded its two streams again')
})

t.test('Redis emptied, and the resync an open started fails part-way: the open gets 503, not a slot counted against records without the instance\'s streams', async (t) => {
  if (!(await needRedis(t))) return
  const gateway = await atLimitThenEmptied(t, uniquePrefix('flushed-failed'))
  // The resync's REJOIN of the user's streams fails once, after the instance is listed again.
  const commands = (gateway.app.state as unknown as { commands: ScriptedRedis }).commands
  const run = commands.run.bind(commands)
  let failed = 0
  commands.run = async (name, args) => {
    if (name === 'REJOIN' && failed++ === 0) throw new StoreUnavailableError(new Error('injected'))
    return await run(name, args)
  }
  t.teardown(() => { commands.run = run })
  t.equal((await openStream(`${gateway.url}/v1/stream?token=${userToken('u1')}`, { t })).status, 503, 'the open is refused for now')
  t.equal(failed, 1, 'the injected failure happened')
  t.equal((await openStream(`${gateway.url}/v1/stream?token=${userToken('u1')}`, { t })).status, 429, 'the next open has the resync tried again, and counts both streams')
})

t.test('a stream closed after Redis lost its data can still be reopened by its id within the window (its id is recorded again at its close)', async (t) => {
  if (!(await needRedis(t))) return
  const prefix = uniquePrefix('lostid')
  // Beats every 20 s: no resync comes during the test, only the close.
  const gateway = await startGateway(t, { REDIS_URL, REDIS_PREFIX: prefix, INSTANCE_TTL_MS: '60000' })
  const { stream, connected } = await openConnected(`${gateway.url}/v1/stream?token=${userToken('lost-u1')}`, { t })
  await emptyRedisOf(t, prefix)
  stream.close()
  const redis = redisClient(t)
  await eventually(async () => await redis.get(`${prefix}conn:${connected.connectionId}`) === 'lost-u1', 'the closed id to be recorded again', 5000, 50)
  const ttl = await redis.ttl(`${prefix}conn:${connected.connectionId}`)
  t.ok(ttl > 0 && ttl <= 3600, `to expire with the window (${ttl} s)`)
  const reopened = await openStream(`${gateway.url}/v1/stream/${connected.connectionId}?token=${userToken('lost-u1')}`, { t })
  t.equal(reopened.status, 200, 'the reopen by id is served, not 404')
})

t.test('Redis emptied: a user\'s user-wide topics are written again from the streams that hold them, so a stream the user opens later joins them too', async (t) => {
  if (!(await needRedis(t))) return
  const prefix = uniquePrefix('lostut')
  const gateway = await startGateway(t, { REDIS_URL, REDIS_PREFIX: prefix, INSTANCE_TTL_MS: '60000' })
  const { stream: first } = await openConnected(`${gateway.url}/v1/stream?token=${userToken('uw-u1')}`, { t })
  const subscribed = await request(`${gateway.url}/v1/subscriptions`, { method: 'POST', token: userToken('uw-u1'), body: { topics: ['uw-news'] } })
  t.equal(subscribed.status, 200)
  await emptyRedisOf(t, prefix)
  // Its admission finds the instance unlisted and waits for its streams to be recorded again.
  const { stream: later, connected } = await openConnected(`${gateway.url}/v1/stream?token=${userToken('uw-u1')}`, { t })
  t.same(connected.topics, ['uw-news'], 'the later stream joined the user-wide topic')
  const [id] = await publishOk(gateway.url, publisher, { to: { topic: 'uw-news' }, event: 'news', data: 1 })
  t.equal((await later.nextEvent('news')).id, id, 'and gets its events')
  t.equal((await first.nextEvent('news')).id, id, 'as the open one does')
})

t.test('Redis intact: a resync does not write back a user-wide set that is missing (it expired, maybe after the user removed what this instance\'s streams hold)', async (t) => {
  if (!(await needRedis(t))) return
  const prefix = uniquePrefix('keptut')
  const gateway = await startGateway(t, { REDIS_URL, REDIS_PREFIX: prefix, INSTANCE_TTL_MS: '60000' })
  const token = userToken('uw-u2')
  await openConnected(`${gateway.url}/v1/stream?token=${token}`, { t })
  t.equal((await request(`${gateway.url}/v1/subscriptions`, { method: 'POST', token, body: { topics: ['uw-gone'] } })).status, 200)
  const redis = redisClient(t)
  // As when the set expired while this instance was cut off and reaped.
  await redis.del(`${prefix}ut:uw-u2`, `${prefix}utk:uw-u2`)
  await (gateway.app.state as unknown as { resync: () => Promise<void> }).resync()
  t.same(await redis.smembers(`${prefix}ut:uw-u2`), [], 'nothing written back')
  const { connected } = await openConnected(`${gateway.url}/v1/stream?token=${token}`, { t })
  t.same(connected.topics, [], 'a later stream joins nothing')
})

t.test('Redis emptied, then the user\'s last user-wide topic removed elsewhere before this instance records its streams: the topic is not brought back', async (t) => {
  if (!(await needRedis(t))) return
  const prefix = uniquePrefix('lostrm')
  const gateway = await startGateway(t, { REDIS_URL, REDIS_PREFIX: prefix, INSTANCE_TTL_MS: '60000' })
  const token = userToken('uw-u5')
  await openConnected(`${gateway.url}/v1/stream?token=${token}`, { t })
  t.equal((await request(`${gateway.url}/v1/subscriptions`, { method: 'POST', token, body: { topics: ['uw-left'] } })).status, 200)
  await emptyRedisOf(t, prefix)
  // The removal as another instance makes it, its control message not heard
  // here: this instance's stream still holds the topic.
  const redis = redisClient(t)
  t.same(await redis.eval(USER_TOPICS, 0, prefix, 'uw-u5', '3600', 'remove', '256', `${prefix}unheard`, '{}', 'uw-left'), [0], 'removed in Redis')
  await (gateway.app.state as unknown as { resync: () => Promise<void> }).resync()
  const { connected } = await openConnected(`${gateway.url}/v1/stream?token=${token}`, { t })
  t.same(connected.topics, [], 'a later stream does not join the removed topic')
})

t.test('a user-wide change made while the user has no stream: a subscribe expires with the window, a removal keeps the expiry the set has, and the topics removed are kept for the window', async (t) => {
  if (!(await needRedis(t))) return
  const prefix = uniquePrefix('utttl')
  const gateway = await startGateway(t, { REDIS_URL, REDIS_PREFIX: prefix, HISTORY_TTL_S: '120' })
  const redis = redisClient(t)
  const change = async (method: 'POST' | 'DELETE', topics: string[]): Promise<number> => {
    t.equal((await request(`${gateway.url}/v1/subscriptions`, { method, token: userToken('uw-u3'), body: { topics } })).status, 200)
    return await redis.ttl(`${prefix}ut:uw-u3`)
  }
  const subscribed = await change('POST', ['uw-a', 'uw-b'])
  t.ok(subscribed > 60 && subscribed <= 120, `a subscribe: expires in ${subscribed} s`)
  await redis.expire(`${prefix}ut:uw-u3`, 30)
  const removed = await change('DELETE', ['uw-a'])
  t.ok(removed > 0 && removed <= 30, `a removal does not put off the expiry the set had (${removed} s)`)
  t.equal(await change('DELETE', ['uw-b']), -2, 'the last removal leaves no set')
  t.same((await redis.zrange(`${prefix}utr:uw-u3`, 0, -1)).sort(), ['uw-a', 'uw-b'], 'the topics removed are kept')
  const kept = await redis.ttl(`${prefix}utr:uw-u3`)
  t.ok(kept > 60 && kept <= 120, `for the window (${kept} s)`)
  await change('POST', ['uw-a'])
  t.same(await redis.zrange(`${prefix}utr:uw-u3`, 0, -1), ['uw-b'], 'a topic subscribed again is no longer among them')
})

t.test('Redis emptied, the instances\' streams of one user holding different user-wide topics: what one writes back to the set another wrote first reaches the other\'s stream', async (t) => {
  if (!(await needRedis(t))) return
  const prefix = uniquePrefix('lostbc')
  const env = { REDIS_URL, REDIS_PREFIX: prefix, INSTANCE_TTL_MS: '60000' }
  const a = await startGateway(t, env)
  const b = await startGateway(t, env)
  const token = userToken('uw-u7')
  await openConnected(`${a.url}/v1/stream?token=${token}`, { t })
  const { stream: onB, connected } = await openConnected(`${b.url}/v1/stream?token=${token}`, { t })
  t.equal((await request(`${a.url}/v1/subscriptions`, { method: 'POST', token, body: { topics: ['uw-both'] } })).status, 200)
  // A user-wide add only the first instance applied, as if its write was lost with Redis's data.
  await a.app.applyTopics({ type: 'topics', userId: 'uw-u7', connectionId: null, add: ['uw-only-a'], remove: [] })
  await emptyRedisOf(t, prefix)
  const resync = async (gateway: Gateway): Promise<void> => await (gateway.app.state as unknown as { resync: () => Promise<void> }).resync()
  await resync(b)
  await resync(a)
  const redis = redisClient(t)
  t.same((await redis.smembers(`${prefix}ut:uw-u7`)).sort(), ['uw-both', 'uw-only-a'], 'the set holds what both wrote back')
  await eventually(() => b.app.registry.get(connected.connectionId)?.topics.includes('uw-only-a') === true, 'the stream on the other instance to join the topic it lacked')
  const [id] = await publishOk(a.url, publisher, { to: { topic: 'uw-only-a' }, event: 'spread', data: 1 })
  t.equal((await onB.nextEvent('spread')).id, id, 'and it gets its events')
})

t.test('Redis restarted empty (both connections drop): the user-wide topics written back stay on the open stream, and a later stream joins them', async (t) => {
  if (!(await needRedis(t))) return
  const own = await startOwnRedis(t)
  const gateway = await startGateway(t, { REDIS_URL: own.url, REDIS_PREFIX: uniquePrefix('restartut') })
  const token = userToken('uw-u6')
  const { stream } = await openConnected(`${gateway.url}/v1/stream?token=${token}`, { t })
  t.equal((await request(`${gateway.url}/v1/subscriptions`, { method: 'POST', token, body: { topics: ['uw-kept'] } })).status, 200)
  await own.stop()
  await own.start()
  await eventually(async () => (await request(`${gateway.url}/ready`)).status === 200, 'the gateway to be back on Redis', 15_000, 50)
  // The open waits for the instance to have recorded its streams again.
  const { stream: later, connected } = await openConnected(`${gateway.url}/v1/stream?token=${token}`, { t })
  t.same(connected.topics, ['uw-kept'], 'a later stream joins the topic written back')
  const [id] = await publishOk(gateway.url, publisher, { to: { topic: 'uw-kept' }, event: 'kept', data: 1 })
  t.equal((await stream.nextEvent('kept')).id, id, 'the open stream still holds it')
  t.equal((await later.nextEvent('kept')).id, id)
})

t.test('a user-wide subscribe whose answer from Redis is late, and an unsubscribe made meanwhile on another instance: the streams end as the user\'s topics do', async (t) => {
  if (!(await needRedis(t))) return
  const prefix = uniquePrefix('uworder')
  const { proxy, viaProxy, direct } = await proxiedCluster(t, { REDIS_PREFIX: prefix })
  t.teardown(() => proxy.cut())
  const token = userToken('uw-u8')
  const { stream, connected } = await openConnected(`${direct.url}/v1/stream?token=${token}`, { t })
  const redis = redisClient(t)
  proxy.holdReplies('sse-gateway')
  const subscribing = request(`${viaProxy.url}/v1/subscriptions`, { method: 'POST', token, body: { topics: ['uw-race'] } })
  await eventually(async () => (await redis.smembers(`${prefix}ut:uw-u8`)).includes('uw-race'), 'the subscribe to be made in Redis')
  t.same((await request(`${direct.url}/v1/subscriptions`, { method: 'DELETE', token, body: { topics: ['uw-race'] } })).json, { topics: [] })
  proxy.releaseReplies('sse-gateway')
  t.same((await subscribing).json, { topics: ['uw-race'] }, 'the subscribe is answered as it was made')
  t.same(await redis.smembers(`${prefix}ut:uw-u8`), [], 'the user holds no topic')
  t.same(direct.app.registry.get(connected.connectionId)?.topics, [], 'nor does the stream')
  await publishOk(direct.url, publisher, { to: { topic: 'uw-race' }, event: 'race', data: 1 })
  const [marker] = await publishOk(direct.url, publisher, { to: { user: 'uw-u8' }, event: 'marker', data: 2 })
  t.equal((await stream.nextEvent('marker')).id, marker)
  t.notOk(stream.events.some((event) => event.event === 'race'), 'and it gets no event of the topic')
})

t.test('a stream\'s own subscribe held up joining its topic, and an unsubscribe sent meanwhile: each is answered with the topics it left', async (t) => {
  if (!(await needRedis(t))) return
  const { proxy, viaProxy, direct } = await proxiedCluster(t, { REDIS_PREFIX: uniquePrefix('psanswer') })
  t.teardown(() => proxy.cut())
  const token = userToken('ps-u1')
  const { connected } = await openConnected(`${viaProxy.url}/v1/stream?token=${token}&topics=ps-own`, { t })
  const connectionId = connected.connectionId
  proxy.holdSubscribes()
  const subscribing = request(`${direct.url}/v1/subscriptions`, { method: 'POST', token, body: { topics: ['ps-new'], connectionId } })
  await eventually(() => viaProxy.app.registry.get(connectionId)?.topics.includes('ps-new') === true, 'the subscribe to be applied, its join waiting')
  const unsubscribing = request(`${direct.url}/v1/subscriptions`, { method: 'DELETE', token, body: { topics: ['ps-new'], connectionId } })
  proxy.releaseSubscribes()
  t.same((await subscribing).json, { topics: ['ps-own', 'ps-new'] }, 'the subscribe is answered with the topic it added')
  t.same((await unsubscribing).json, { topics: ['ps-own'] }, 'the unsubscribe with the topic it removed')
  t.same(viaProxy.app.registry.get(connectionId)?.topics, ['ps-own'], 'and the stream holds what the later unsubscribe left')
})

t.test('a user-wide subscription change while Redis answers later than the control wait: answered as made once Redis answers, not 409', async (t) => {
  if (!(await needRedis(t))) return
  const prefix = uniquePrefix('slowsub')
  const { proxy, viaProxy } = await proxiedCluster(t, { REDIS_PREFIX: prefix })
  // The wait for the instances' answers, short here: Redis answers after it.
  const state = viaProxy.app.state as unknown as { options: { controlTimeoutMs?: number } }
  state.options.controlTimeoutMs = 200
  const redis = redisClient(t)
  for (const [method, expected] of [['POST', ['late']], ['DELETE', []]] as const) {
    proxy.holdReplies('sse-gateway')
    const answer = request<{ topics: string[] }>(`${viaProxy.url}/v1/subscriptions`, { method, token: userToken('slow-u1'), body: { topics: ['late'] } })
    // Made in Redis; its answer is held back.
    await eventually(async () => (await redis.smembers(`${prefix}ut:slow-u1`)).includes('late') === (method === 'POST'), `the ${method} made in Redis`)
    const early = await Promise.race([answer, new Promise<null>((resolve) => { const timer = setTimeout(resolve, 1000, null); t.teardown(() => clearTimeout(timer)) })])
    t.equal(early?.status ?? null, null, `${method}: no answer before Redis answers (${early?.status ?? ''} ${JSON.stringify(early?.json ?? '')})`)
    proxy.releaseReplies('sse-gateway')
    const { status, json } = await answer
    t.equal(status, 200, `${method}: 200 once it has`)
    t.same(json, { topics: expected }, `${method}: the topics as changed`)
  }
})

t.test('an admission that ran but whose answer was lost with its connection is given back: the id and the user\'s topics expire as after a close', async (t) => {
  if (!(await needRedis(t))) return
  const prefix = uniquePrefix('lostadmit')
  const { proxy, viaProxy } = await proxiedCluster(t, { REDIS_PREFIX: prefix, INSTANCE_TTL_MS: '1500' })
  const redis = redisClient(t)
  const user = 'lost-admit-u1'
  // User-wide topics without a stream: they expire with HISTORY_TTL_S.
  t.equal((await request(`${viaProxy.url}/v1/subscriptions`, { method: 'POST', token: userToken(user), body: { topics: ['t1'] } })).status, 200)
  t.ok(await redis.ttl(`${prefix}ut:${user}`) > 0, 'the topics expire')
  proxy.holdReplies('sse-gateway')
  const opening = openStream(`${viaProxy.url}/v1/stream?token=${userToken(user)}`, { t }).catch((error: Error) => error)
  // The admission has run in Redis (the user counts a stream); its answer is held back, then lost.
  await eventually(async () => await redis.zcard(`${prefix}uc:${user}`) === 1, 'the admission to run')
  proxy.cut('sse-gateway')
  const answered = await opening
  t.equal(answered instanceof Error ? 'reset' : answered.status, 503, 'the open is refused')
  const ids = (await redis.keys(`${prefix}conn:*`))
  t.equal(ids.length, 1, 'the admission recorded its id')
  // Given back once the connection is back: as after a close, with nothing left that never expires.
  await eventually(async () => await redis.ttl(`${prefix}ut:${user}`) > 0 && await redis.ttl(ids[0]) > 0 && await redis.zcard(`${prefix}uc:${user}`) === 0, 'the topics and the id to expire again', 15_000, 100)
  t.pass('the topics and the id expire, and the user counts no stream')
})
