/**
 * Redis mode: a user's user-wide topics and the streams that hold them stay
 * in line through racing changes, a control channel that drops (the streams
 * are brought back in line once it is back) and Redis losing its data (the
 * topics are written back from the streams).
 */
import t, { type Test } from 'tap'
import { eventually, openConnected, openStream, publishOk, publisherToken, request, startGateway, userToken, type Gateway, type SseClient } from './helpers'
import { proxiedCluster, type FaultyProxy } from './helpers/proxy'
import { needRedis, redisClient, REDIS_URL, uniquePrefix } from './helpers/redis'
import type { ControlMissedListener } from '../src/core/state'

const publisher = publisherToken()
const SUBSCRIBER = 'sse-gateway-sub'

/** The parts of the Redis state these tests watch or hold. */
interface StateInternals {
  controlMissedListener: ControlMissedListener
  commands: { run: (name: string, args: unknown[]) => Promise<unknown> }
  subscriber: { disconnect: (reconnect: boolean) => void }
  resync: () => Promise<void>
}

function internals (gateway: Gateway): StateInternals {
  return gateway.app.state as unknown as StateInternals
}

/** Counts the realignments of `gateway` that have finished, failed ones too. */
function watchRealignments (gateway: Gateway): { done: (count: number) => Promise<void> } {
  const state = internals(gateway)
  const listener = state.controlMissedListener
  let finished = 0
  state.controlMissedListener = async (read, retrying) => {
    try {
      await listener(read, retrying)
    } finally {
      finished++
    }
  }
  return { done: async (count) => await eventually(() => finished >= count, `realignment ${count} to finish`, 15_000, 20) }
}

/** Runs `before` once, ahead of the first run of the script `name` on `gateway`'s commands connection. */
function beforeScript (t: Test, gateway: Gateway, name: string, before: () => Promise<void>): () => boolean {
  const commands = internals(gateway).commands
  const run = commands.run.bind(commands)
  let ran = false
  commands.run = async (script, args) => {
    if (script === name && !ran) {
      ran = true
      await before()
    }
    return await run(script, args)
  }
  t.teardown(() => { commands.run = run })
  return () => ran
}

/**
 * Two instances of one cluster, the first reaching Redis through a proxy
 * that can cut its control channel, its logs captured and its realignments
 * counted.
 */
async function realigningCluster (t: Test, name: string): Promise<{ proxy: FaultyProxy, viaProxy: Gateway, direct: Gateway, realignments: ReturnType<typeof watchRealignments> }> {
  const { proxy, viaProxy, direct } = await proxiedCluster(t, { REDIS_PREFIX: uniquePrefix(name) }, { captureLogs: true })
  t.teardown(() => proxy.cut())
  return { proxy, viaProxy, direct, realignments: watchRealignments(viaProxy) }
}

/** Cuts `gateway`'s control channel off without closing it, and waits until the gateway has noticed. */
async function cutControlOff (proxy: FaultyProxy, gateway: Gateway): Promise<void> {
  proxy.cutOff(SUBSCRIBER)
  await eventually(() => gateway.logs.some((line) => line.includes('bus subscription lost')), 'the subscription to be lost')
}

/** Runs `before` ahead of every read of a user's topics on `gateway` (script USER_TOPICS_CHECKED); a rejection fails the read. */
function beforeEachRead (t: Test, gateway: Gateway, before: (userId: string) => Promise<void>): void {
  const commands = internals(gateway).commands
  const run = commands.run.bind(commands)
  commands.run = async (script, args) => {
    if (script === 'USER_TOPICS_CHECKED') await before(String(args[1]))
    return await run(script, args)
  }
  t.teardown(() => { commands.run = run })
}

function topicsOf (gateway: Gateway, connectionId: string): readonly string[] | undefined {
  return gateway.app.registry.get(connectionId)?.topics
}

/** Whether `stream` got an event of `topic` published now, told by a marker to its user published after it. */
async function getsEventsOf (gateway: Gateway, stream: SseClient, topic: string, userId: string): Promise<boolean> {
  const [id] = await publishOk(gateway.url, publisher, { to: { topic }, event: 'probe', data: topic })
  const [marker] = await publishOk(gateway.url, publisher, { to: { user: userId }, event: 'marker', data: 0 })
  await stream.next((event) => event.id === marker, 5000, 'the marker')
  return stream.events.some((event) => event.id === id)
}

async function emptyRedisOf (t: Test, prefix: string): Promise<void> {
  await redisClient(t).eval("for _, key in ipairs(redis.call('KEYS', ARGV[1])) do redis.call('DEL', key) end return 0", 0, `${prefix}*`)
}

t.test('a user-wide subscribe and unsubscribe of one topic, racing on one instance with two streams of the user: both streams end as the user\'s topics', async (t) => {
  if (!(await needRedis(t))) return
  const gateway = await startGateway(t, { REDIS_URL, REDIS_PREFIX: uniquePrefix('uworder1') })
  const token = userToken('ro-u1')
  const streams = [await openConnected(`${gateway.url}/v1/stream?token=${token}`, { t }), await openConnected(`${gateway.url}/v1/stream?token=${token}`, { t })]
  const diverged: string[] = []
  for (let trial = 0; trial < 10; trial++) {
    const topic = `ro-${trial}`
    await Promise.all([
      request(`${gateway.url}/v1/subscriptions`, { method: 'POST', token, body: { topics: [topic] } }),
      request(`${gateway.url}/v1/subscriptions`, { method: 'DELETE', token, body: { topics: [topic] } })
    ])
    const held = (await gateway.app.state.userTopics('ro-u1')).includes(topic)
    const holders = streams.map(({ connected }) => topicsOf(gateway, connected.connectionId)?.includes(topic) === true)
    if (holders.some((holds) => holds !== held)) diverged.push(`${topic}: user ${held ? 'holds' : 'lacks'} it, streams ${JSON.stringify(holders)}`)
  }
  t.same(diverged, [], 'no trial leaves a stream apart from the user')
})

t.test('the control channel back: a user-wide topic a stream left on its own stays left', async (t) => {
  if (!(await needRedis(t))) return
  const { proxy, viaProxy, direct, realignments } = await realigningCluster(t, 'realign1')
  const token = userToken('rl-u1')
  const { stream, connected } = await openConnected(`${viaProxy.url}/v1/stream?token=${token}`, { t })
  t.equal((await request(`${direct.url}/v1/subscriptions`, { method: 'POST', token, body: { topics: ['rl-x', 'rl-y'] } })).status, 200)
  t.same((await request(`${direct.url}/v1/subscriptions`, { method: 'DELETE', token, body: { topics: ['rl-x'], connectionId: connected.connectionId } })).json, { topics: ['rl-y'] })
  proxy.cut(SUBSCRIBER)
  await realignments.done(1)
  t.same(topicsOf(viaProxy, connected.connectionId), ['rl-y'], 'the stream holds what it held')
  t.notOk(await getsEventsOf(direct, stream, 'rl-x', 'rl-u1'), 'and gets no event of the topic it left')
})

t.test('the control channel back: a change of the user\'s arriving while their topics are read has them read again, so the change missed is still made', async (t) => {
  if (!(await needRedis(t))) return
  const { proxy, viaProxy, direct, realignments } = await realigningCluster(t, 'realign2')
  const token = userToken('rl-u2')
  const { stream, connected } = await openConnected(`${viaProxy.url}/v1/stream?token=${token}`, { t })
  t.equal((await request(`${direct.url}/v1/subscriptions`, { method: 'POST', token, body: { topics: ['rl-a'] } })).status, 200)
  await cutControlOff(proxy, viaProxy)
  // Made while the instance cannot hear it.
  t.same((await request(`${direct.url}/v1/subscriptions`, { method: 'DELETE', token, body: { topics: ['rl-a'] } })).json, { topics: [] })
  const raced = beforeScript(t, viaProxy, 'USER_TOPICS_CHECKED', async () => {
    t.equal((await request(`${direct.url}/v1/subscriptions`, { method: 'POST', token, body: { topics: ['rl-b'] } })).status, 200)
  })
  proxy.restore(SUBSCRIBER)
  await realignments.done(1)
  t.ok(raced(), 'a change came while the topics were read')
  t.same(topicsOf(viaProxy, connected.connectionId), ['rl-b'], 'the stream holds the user\'s topics')
  t.notOk(await getsEventsOf(direct, stream, 'rl-a', 'rl-u2'), 'and gets no event of the one left while the channel was down')
})

t.test('the control channel back: one user whose topics cannot be read holds up no other user\'s, past the 100 read at once', async (t) => {
  if (!(await needRedis(t))) return
  const { proxy, viaProxy, direct, realignments } = await realigningCluster(t, 'realign-each')
  // The failing user's read is among the first 100, the missed change's user the 102nd.
  await openConnected(`${viaProxy.url}/v1/stream?token=${userToken('rl-unread')}`, { t })
  for (let n = 0; n < 100; n++) await openConnected(`${viaProxy.url}/v1/stream?token=${userToken(`rl-quiet-${n}`)}`, { t })
  const token = userToken('rl-last')
  const { stream, connected } = await openConnected(`${viaProxy.url}/v1/stream?token=${token}`, { t })
  await cutControlOff(proxy, viaProxy)
  t.equal((await request(`${direct.url}/v1/subscriptions`, { method: 'POST', token, body: { topics: ['rl-missed'] } })).status, 200)
  const readsOf: string[] = []
  let unreadable = true
  beforeEachRead(t, viaProxy, async (userId) => {
    readsOf.push(userId)
    if (unreadable && userId === 'rl-unread') throw new Error('this user\'s topics cannot be read')
  })
  proxy.restore(SUBSCRIBER)
  await realignments.done(1)
  t.equal(readsOf.length, 102, 'every user read once')
  t.same(topicsOf(viaProxy, connected.connectionId), ['rl-missed'], 'the last user\'s stream holds the topic subscribed while the channel was down')
  t.ok(await getsEventsOf(direct, stream, 'rl-missed', 'rl-last'), 'and gets its events')
  t.ok(viaProxy.logs.some((line) => line.includes('streams not brought back in line') && line.includes('cannot be read')), 'the failure is logged, to be tried again')
  // The next beat tries again, reading only the user that failed.
  await realignments.done(2)
  t.same(readsOf.slice(102), ['rl-unread'], 'a retry reads the user that failed, not the others again')
  unreadable = false
  await realignments.done(3)
  t.same(readsOf.slice(103), ['rl-unread'], 'the run after reads it alone too, and gets through')
})

t.test('the control channel back: a user whose every read is overtaken by a change of theirs is read again by the next run, and the change missed is made', async (t) => {
  if (!(await needRedis(t))) return
  const { proxy, viaProxy, direct, realignments } = await realigningCluster(t, 'realign-busy')
  const token = userToken('rl-busy')
  const { connected } = await openConnected(`${viaProxy.url}/v1/stream?token=${token}`, { t })
  await cutControlOff(proxy, viaProxy)
  t.equal((await request(`${direct.url}/v1/subscriptions`, { method: 'POST', token, body: { topics: ['rl-missed'] } })).status, 200)
  let reads = 0
  beforeEachRead(t, viaProxy, async (userId) => {
    // Each of the first run's 5 reads comes after a change the instance hears.
    if (userId === 'rl-busy' && ++reads <= 5) {
      t.equal((await request(`${direct.url}/v1/subscriptions`, { method: 'POST', token, body: { topics: [`rl-noise-${reads}`] } })).status, 200)
    }
  })
  proxy.restore(SUBSCRIBER)
  await realignments.done(2)
  t.equal(reads, 6, 'five reads overtaken, then one more by the next run')
  t.ok(topicsOf(viaProxy, connected.connectionId)?.includes('rl-missed'), 'the stream holds the topic subscribed while the channel was down')
})

t.test('the control channel back, and Redis emptied while the topics are read: the streams keep them, and the next resync writes them back', async (t) => {
  if (!(await needRedis(t))) return
  const prefix = uniquePrefix('realign3')
  const gateway = await startGateway(t, { REDIS_URL, REDIS_PREFIX: prefix, INSTANCE_TTL_MS: '60000' })
  const realignments = watchRealignments(gateway)
  const token = userToken('rl-u3')
  const { stream, connected } = await openConnected(`${gateway.url}/v1/stream?token=${token}`, { t })
  t.equal((await request(`${gateway.url}/v1/subscriptions`, { method: 'POST', token, body: { topics: ['rl-kept'] } })).status, 200)
  beforeScript(t, gateway, 'USER_TOPICS_CHECKED', async () => await emptyRedisOf(t, prefix))
  internals(gateway).subscriber.disconnect(true)
  await realignments.done(1)
  t.same(topicsOf(gateway, connected.connectionId), ['rl-kept'], 'the stream keeps its topic')
  // What the next beat runs (the instance finds itself unlisted).
  await internals(gateway).resync()
  const { connected: later } = await openConnected(`${gateway.url}/v1/stream?token=${token}`, { t })
  t.same(later.topics, ['rl-kept'], 'a later stream joins the topic written back')
  t.ok(await getsEventsOf(gateway, stream, 'rl-kept', 'rl-u3'), 'and the open one still gets its events')
})

t.test('an open while the streams are brought back in line is not held up by it', async (t) => {
  if (!(await needRedis(t))) return
  const gateway = await startGateway(t, { REDIS_URL, REDIS_PREFIX: uniquePrefix('realign4'), INSTANCE_TTL_MS: '60000' })
  await openConnected(`${gateway.url}/v1/stream?token=${userToken('rl-u4')}`, { t })
  let reading = false
  let release = (): void => {}
  const held = new Promise<void>((resolve) => { release = resolve })
  t.teardown(() => release())
  beforeScript(t, gateway, 'USER_TOPICS_CHECKED', async () => {
    reading = true
    await held
  })
  internals(gateway).subscriber.disconnect(true)
  await eventually(() => reading, 'the realignment to read', 10_000)
  const opened = await openStream(`${gateway.url}/v1/stream?token=${userToken('rl-u5')}`, { t })
  t.equal(opened.status, 200, 'the open is served while the read is held')
  release()
})

t.test('the topics a user removed are kept for the write-back after a loss, the latest MAX_TOPICS of them', async (t) => {
  if (!(await needRedis(t))) return
  const prefix = uniquePrefix('utrcap')
  const gateway = await startGateway(t, { REDIS_URL, REDIS_PREFIX: prefix, MAX_TOPICS: '50' })
  const token = userToken('rl-u6')
  for (let round = 0; round < 3; round++) {
    const topics = Array.from({ length: 40 }, (_, index) => `cap-${round}-${index}`)
    t.equal((await request(`${gateway.url}/v1/subscriptions`, { method: 'DELETE', token, body: { topics } })).status, 200)
  }
  const kept = await redisClient(t).zrange(`${prefix}utr:rl-u6`, 0, -1)
  t.equal(kept.length, 50, 'no more than MAX_TOPICS')
  t.ok(kept.includes('cap-2-39') && !kept.includes('cap-0-0'), 'the latest')
})

t.test('Redis emptied: a write-back answered late does not overtake an unsubscribe the user made after it', async (t) => {
  if (!(await needRedis(t))) return
  const prefix = uniquePrefix('wbover')
  const env = { REDIS_URL, REDIS_PREFIX: prefix, INSTANCE_TTL_MS: '60000' }
  const a = await startGateway(t, env)
  const b = await startGateway(t, env)
  const token = userToken('rl-u7')
  const { stream: onA } = await openConnected(`${a.url}/v1/stream?token=${token}`, { t })
  const { stream: onB, connected: onBConnected } = await openConnected(`${b.url}/v1/stream?token=${token}`, { t })
  t.equal((await request(`${a.url}/v1/subscriptions`, { method: 'POST', token, body: { topics: ['wb-x'] } })).status, 200)
  // The stream on b leaves the topic on its own: only a's writes it back.
  t.equal((await request(`${a.url}/v1/subscriptions`, { method: 'DELETE', token, body: { topics: ['wb-x'], connectionId: onBConnected.connectionId } })).status, 200)
  await emptyRedisOf(t, prefix)
  await internals(b).resync()
  // a's write-back is answered only after the user's unsubscribe.
  const commands = internals(a).commands
  const run = commands.run.bind(commands)
  let answered = (): void => {}
  const writtenBack = new Promise<void>((resolve) => { answered = resolve })
  let release = (): void => {}
  const held = new Promise<void>((resolve) => { release = resolve })
  t.teardown(() => { commands.run = run; release() })
  commands.run = async (script, args) => {
    const answer = await run(script, args)
    if (script === 'USER_TOPICS_AGAIN') {
      answered()
      await held
    }
    return answer
  }
  const resyncing = internals(a).resync()
  await writtenBack
  t.same((await request(`${b.url}/v1/subscriptions`, { method: 'DELETE', token, body: { topics: ['wb-x'] } })).json, { topics: [] }, 'the user leaves the topic')
  release()
  await resyncing
  t.notOk(await getsEventsOf(a, onA, 'wb-x', 'rl-u7'), 'a\'s stream gets no event of it')
  t.notOk(await getsEventsOf(a, onB, 'wb-x', 'rl-u7'), 'nor does b\'s')
})

t.test('Redis emptied, one instance: the topics written back do not return to a stream that left one on its own', async (t) => {
  if (!(await needRedis(t))) return
  const prefix = uniquePrefix('wbleft')
  const gateway = await startGateway(t, { REDIS_URL, REDIS_PREFIX: prefix, INSTANCE_TTL_MS: '60000' })
  const token = userToken('rl-u8')
  const { connected: first } = await openConnected(`${gateway.url}/v1/stream?token=${token}`, { t })
  const { stream, connected: second } = await openConnected(`${gateway.url}/v1/stream?token=${token}`, { t })
  t.equal((await request(`${gateway.url}/v1/subscriptions`, { method: 'POST', token, body: { topics: ['wl-x'] } })).status, 200)
  t.same((await request(`${gateway.url}/v1/subscriptions`, { method: 'DELETE', token, body: { topics: ['wl-x'], connectionId: second.connectionId } })).json, { topics: [] })
  await emptyRedisOf(t, prefix)
  await internals(gateway).resync()
  // A user-wide change published after the write-back's, so applied after it.
  t.equal((await request(`${gateway.url}/v1/subscriptions`, { method: 'POST', token, body: { topics: ['wl-after'] } })).status, 200)
  t.same(topicsOf(gateway, first.connectionId), ['wl-x', 'wl-after'], 'the stream that held the topic holds it')
  t.same(topicsOf(gateway, second.connectionId), ['wl-after'], 'the one that left it stays without')
  t.notOk(await getsEventsOf(gateway, stream, 'wl-x', 'rl-u8'), 'and gets none of its events')
})

t.test('the control channel back: a user-wide subscribe missed meanwhile reaches a stream that had left the same topic of its own (?topics=) before', async (t) => {
  if (!(await needRedis(t))) return
  const { proxy, viaProxy, direct, realignments } = await realigningCluster(t, 'realign5')
  const token = userToken('rl-u9')
  const { stream, connected } = await openConnected(`${viaProxy.url}/v1/stream?token=${token}&topics=rl-own`, { t })
  t.same((await request(`${direct.url}/v1/subscriptions`, { method: 'DELETE', token, body: { topics: ['rl-own'], connectionId: connected.connectionId } })).json, { topics: [] })
  await cutControlOff(proxy, viaProxy)
  t.same((await request(`${direct.url}/v1/subscriptions`, { method: 'POST', token, body: { topics: ['rl-own'] } })).json, { topics: ['rl-own'] })
  proxy.restore(SUBSCRIBER)
  await realignments.done(1)
  t.same(topicsOf(viaProxy, connected.connectionId), ['rl-own'], 'the stream joins the user\'s topic')
  t.ok(await getsEventsOf(direct, stream, 'rl-own', 'rl-u9'), 'and gets its events')
})

t.test('a resync that starts bringing the streams back in line settles without waiting for it (another instance\'s admission waits for that resync)', async (t) => {
  if (!(await needRedis(t))) return
  const gateway = await startGateway(t, { REDIS_URL, REDIS_PREFIX: uniquePrefix('realign6'), INSTANCE_TTL_MS: '60000' })
  await openConnected(`${gateway.url}/v1/stream?token=${userToken('rl-u10')}`, { t })
  let release = (): void => {}
  const held = new Promise<void>((resolve) => { release = resolve })
  t.teardown(() => release())
  let reading = false
  beforeScript(t, gateway, 'USER_TOPICS_CHECKED', async () => {
    reading = true
    await held
  })
  const state = internals(gateway) as unknown as StateInternals & { controlMissed: boolean }
  state.controlMissed = true
  let settled = false
  const resyncing = state.resync().then(() => { settled = true })
  await eventually(() => reading, 'the realignment to read')
  await eventually(() => settled, 'the resync to settle while the read is held')
  release()
  await resyncing
})

t.test('a topic a stream held of its own and for its user, left by its own DELETE, stays left when the streams are brought back in line and when the topics are written back', async (t) => {
  if (!(await needRedis(t))) return
  const prefix = uniquePrefix('realign7')
  const gateway = await startGateway(t, { REDIS_URL, REDIS_PREFIX: prefix, INSTANCE_TTL_MS: '60000' })
  const realignments = watchRealignments(gateway)
  const token = userToken('rl-u11')
  const { connected: holder } = await openConnected(`${gateway.url}/v1/stream?token=${token}`, { t })
  t.equal((await request(`${gateway.url}/v1/subscriptions`, { method: 'POST', token, body: { topics: ['both-t'] } })).status, 200)
  // Of its own at open, and its user's: the read finds it held.
  const { stream: atOpen, connected: openedWith } = await openConnected(`${gateway.url}/v1/stream?token=${token}&topics=both-t`, { t })
  // Its user's, then of its own by a subscription of its own.
  const { stream: bySubscription, connected: subscribed } = await openConnected(`${gateway.url}/v1/stream?token=${token}`, { t })
  t.equal((await request(`${gateway.url}/v1/subscriptions`, { method: 'POST', token, body: { topics: ['both-t'], connectionId: subscribed.connectionId } })).status, 200)
  for (const { connectionId } of [openedWith, subscribed]) {
    t.same((await request(`${gateway.url}/v1/subscriptions`, { method: 'DELETE', token, body: { topics: ['both-t'], connectionId } })).json, { topics: [] })
  }
  internals(gateway).subscriber.disconnect(true)
  await realignments.done(1)
  t.same([topicsOf(gateway, openedWith.connectionId), topicsOf(gateway, subscribed.connectionId)], [[], []], 'both stay without it after the realignment')
  await emptyRedisOf(t, prefix)
  await internals(gateway).resync()
  // A user-wide change published after the write-back's, so applied after it.
  t.equal((await request(`${gateway.url}/v1/subscriptions`, { method: 'POST', token, body: { topics: ['both-after'] } })).status, 200)
  t.same(topicsOf(gateway, holder.connectionId), ['both-t', 'both-after'], 'the stream that held it for its user holds it after the write-back')
  t.same([topicsOf(gateway, openedWith.connectionId), topicsOf(gateway, subscribed.connectionId)], [['both-after'], ['both-after']], 'the two that left it stay without')
  t.notOk(await getsEventsOf(gateway, atOpen, 'both-t', 'rl-u11'), 'and get none of its events')
  t.notOk(await getsEventsOf(gateway, bySubscription, 'both-t', 'rl-u11'))
})
