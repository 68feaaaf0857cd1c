/**
 * Redis mode: the catch-up after an instance's bus subscription is lost, in
 * the cases where a loss meets a stream's setup or another catch-up. One of
 * the instance's Redis connections is faulted at a time through a proxy
 * (test/helpers/proxy.ts), so the order of events is the test's to choose.
 */
import type Redis from 'ioredis'
import t, { type Test } from 'tap'
import { channel } from '../src/core/channels'
import { adminToken, eventually, openConnected, openStream, publishOk, publisherToken, request, userToken, type Gateway, type SseClient } from './helpers'
import { FaultyProxy, proxiedCluster } from './helpers/proxy'
import { needRedis, redisClient, subscriberCount, uniquePrefix } from './helpers/redis'

const publisher = publisherToken()
/** The names the gateway gives its two Redis connections (CLIENT SETNAME). */
const COMMANDS = 'sse-gateway'
const SUBSCRIBER = 'sse-gateway-sub'
const LOST = 'bus subscription lost'
const CATCHING_UP = 'bus subscription back'

/** How many captured log lines of `gateway` say `message`. */
function logged (gateway: Gateway, message: string): number {
  return gateway.logs.filter((line) => line.includes(message)).length
}

/** The ids of the stream's `seq` events, in the order received. */
function seqIds (stream: SseClient): Array<string | undefined> {
  return stream.events.filter((event) => event.event === 'seq').map((event) => event.id)
}

/** The types of the stream's other events. */
function otherEvents (stream: SseClient): string[] {
  return stream.events.filter((event) => event.event !== 'seq').map((event) => event.event)
}

interface Rig {
  prefix: string
  proxy: FaultyProxy
  /** The instance under test: it reaches Redis through `proxy`. */
  viaProxy: Gateway
  /** Publishes, reaching Redis directly. */
  direct: Gateway
}

async function startRig (t: Test, name: string, env: Record<string, string> = {}): Promise<Rig> {
  const prefix = uniquePrefix(name)
  const { proxy, viaProxy, direct } = await proxiedCluster(t, { ...env, REDIS_PREFIX: prefix }, { captureLogs: true })
  // Torn down first: a test that fails with a fault in place leaves none for the gateways' close to wait on.
  t.teardown(() => proxy.cut())
  return { prefix, proxy, viaProxy, direct }
}

/** The instance's subscriber is lost (the `count`th time) and stays out of reach; its commands connection is untouched. */
async function loseSubscription ({ proxy, viaProxy }: Rig, count: number): Promise<void> {
  proxy.cutOff(SUBSCRIBER)
  await eventually(() => logged(viaProxy, LOST) === count, `loss ${count} of the subscription`)
}

/**
 * The lost subscriber connects again. Resolves with the id of an event
 * published once its subscription to `u1`'s channel is back, after the
 * instance has heard it: the answer to the SUBSCRIBE came before it, so the
 * instance knows its subscription is restored.
 */
async function subscribeAgain ({ prefix, proxy, viaProxy, direct }: Rig, redis: Redis, data: number): Promise<string> {
  const userChannel = `${prefix}ch:${channel.user('u1')}`
  await eventually(async () => await subscriberCount(redis, userChannel) === 0, 'Redis to drop the lost subscriber')
  proxy.restore(SUBSCRIBER)
  await eventually(async () => await subscriberCount(redis, userChannel) === 1, 'the instance to subscribe again', 10_000)
  const [probe] = await publishOk(direct.url, publisher, { to: { user: 'u1' }, event: 'seq', data })
  await eventually(() => viaProxy.app.bus.deliveredUpTo() >= Number(probe), 'the instance to hear an event live')
  return probe
}

/** The lost subscriber back, with the commands connection's replies held: the first catch-up starts, its read unanswered. */
async function restoreWithReadHeld ({ proxy, viaProxy }: Rig): Promise<void> {
  proxy.holdReplies(COMMANDS)
  proxy.restore(SUBSCRIBER)
  await eventually(() => logged(viaProxy, CATCHING_UP) === 1, 'the catch-up to start', 10_000)
}

/**
 * `u1`'s stream on the instance under test, live: `send` publishes a `seq`
 * event to `u1` (through `url`, by default the instance that reaches Redis
 * directly); `before`, the first, has been received.
 */
async function liveStream (t: Test, { viaProxy, direct }: Rig): Promise<{ stream: SseClient, send: (data: number, url?: string) => Promise<string>, before: string }> {
  const { stream } = await openConnected(`${viaProxy.url}/v1/stream?token=${userToken('u1')}`, { t })
  const send = async (data: number, url = direct.url): Promise<string> => (await publishOk(url, publisher, { to: { user: 'u1' }, event: 'seq', data }))[0]
  const before = await send(0)
  await stream.next((event) => event.id === before, 5000, 'the first event, live')
  return { stream, send, before }
}

/**
 * `u1`'s live stream (see liveStream) whose subscription was lost once, with
 * `first` published meanwhile, then restored: its catch-up has started, and
 * the catch-up's read is held.
 */
async function catchUpHeld (t: Test, name: string): Promise<Awaited<ReturnType<typeof liveStream>> & { rig: Rig, redis: Redis, first: string }> {
  const rig = await startRig(t, name)
  const redis = redisClient(t)
  const live = await liveStream(t, rig)
  await loseSubscription(rig, 1)
  const first = await live.send(1)
  await restoreWithReadHeld(rig)
  return { ...live, rig, redis, first }
}

t.test('a stream that joins its channels while the subscription is down gets, once it is back, the events they published meanwhile: in order, none twice', async (t) => {
  if (!(await needRedis(t))) return
  const { proxy, viaProxy, direct } = await startRig(t, 'openloss')
  const { stream: first } = await openConnected(`${viaProxy.url}/v1/stream?token=${userToken('u1')}`, { t })
  const [before] = await publishOk(direct.url, publisher, { to: { user: 'u1' }, event: 'seq', data: 0 })
  await first.nextEvent('seq')

  // The subscriber drops and connects again, but its subscriptions do not reach Redis.
  proxy.holdSubscribes()
  proxy.cut(SUBSCRIBER)
  await eventually(() => proxy.heldSubscribers > 0, 'the instance to subscribe again')
  t.equal(logged(viaProxy, LOST), 1, 'the instance lost its subscription')
  const opening = openStream(`${viaProxy.url}/v1/stream?token=${userToken('u1')}`, { t, timeoutMs: 10_000 }).catch((error: Error) => error)
  await eventually(() => viaProxy.app.registry.ofUser('u1').filter((connection) => connection.channels.includes(channel.user('u1'))).length === 2,
    'the new stream to join its user\'s channel')
  const missed: string[] = []
  for (let n = 1; n <= 3; n++) missed.push(...await publishOk(direct.url, publisher, { to: { user: 'u1' }, event: 'seq', data: n }))

  proxy.releaseSubscribes()
  const second = await opening
  if (second instanceof Error) throw second
  await second.nextEvent('connected')
  const [marker] = await publishOk(direct.url, publisher, { to: { user: 'u1' }, event: 'seq', data: 4 })
  await second.next((event) => event.id === marker, 10_000, 'the marker on the new stream')
  await first.next((event) => event.id === marker, 10_000, 'the marker on the first stream')
  t.same(seqIds(second), [...missed, marker], 'the new stream: what its channel published once it had joined, then live, each once')
  t.same(otherEvents(second), ['connected'], 'no reset')
  t.same(seqIds(first), [before, ...missed, marker], 'the stream open before the loss: every event, each once')
  t.same(otherEvents(first), ['connected'], 'no reset')
  t.notOk(second.ended || first.ended, 'both streams stayed open')
})

t.test('a catch-up longer than a page is read a page at a time, each written before the next is read (a slow reader holds one page); events arriving meanwhile go out in order: every event once, no reset', async (t) => {
  if (!(await needRedis(t))) return
  const rig = await startRig(t, 'pagedcatchup')
  const redis = redisClient(t)
  const { stream, send, before } = await liveStream(t, rig)
  const [connection] = rig.viaProxy.app.registry.ofUser('u1')
  const bus = rig.viaProxy.app.bus
  let reads = 0
  let written = 0
  let mostAhead = 0
  const read = bus.replay.bind(bus)
  bus.replay = async (channels, after) => {
    if (channels.includes(channel.user('u1'))) mostAhead = Math.max(mostAhead, ++reads - written)
    return await read(channels, after)
  }
  let firstWritten = (): void => {}
  const firstPageWritten = new Promise<void>((resolve) => { firstWritten = resolve })
  const write = connection.replay.bind(connection)
  connection.replay = async (entries, withHeld) => {
    written++
    firstWritten()
    return await write(entries, withHeld)
  }

  await loseSubscription(rig, 1)
  // 20 events of 200 KB: a page each.
  const large = 'x'.repeat(200 * 1024)
  const missed: string[] = []
  for (let n = 1; n <= 20; n++) missed.push(...await publishOk(rig.direct.url, publisher, { to: { user: 'u1' }, event: 'seq', data: { n, large } }))
  stream.pause()
  const probe = await subscribeAgain(rig, redis, 21)
  await firstPageWritten
  const live = [await send(22), await send(23)]
  stream.resume()
  await stream.next((event) => event.id === live[1], 30_000, 'the last event')
  t.same(seqIds(stream), [before, ...missed, probe, ...live], 'every event once, in id order')
  t.same(otherEvents(stream), ['connected'], 'no reset')
  t.ok(reads >= 10, `read in pages (${reads} reads)`)
  t.equal(mostAhead, 1, 'never a page read before the one before it was written')
})

t.test('a catch-up reads history only up to what was issued when it began: a reader slower than its busy channel ends it (live, or closed as slow to replay on reconnect) instead of chasing the head of history for ever', async (t) => {
  if (!(await needRedis(t))) return
  const rig = await startRig(t, 'chase', { MAX_BUFFERED_BYTES: String(1024 * 1024), HISTORY_SIZE: '5000' })
  const redis = redisClient(t)
  await liveStream(t, rig)
  const [connection] = rig.viaProxy.app.registry.ofUser('u1')
  await loseSubscription(rig, 1)
  const large = 'x'.repeat(50 * 1024)
  for (let n = 1; n <= 40; n++) await publishOk(rig.direct.url, publisher, { to: { user: 'u1' }, event: 'seq', data: { n, large } })
  // A slow reader: each page of the catch-up takes 300 ms to be written.
  const write = connection.replay.bind(connection)
  connection.replay = async (entries, withHeld) => {
    await new Promise<void>((resolve) => setTimeout(resolve, 300))
    return await write(entries, withHeld)
  }
  // The channel keeps publishing, faster than that reader reads.
  let publishing = true
  const publisherLoop = (async () => {
    for (let n = 100; publishing && n < 2000; n++) {
      await publishOk(rig.direct.url, publisher, { to: { user: 'u1' }, event: 'seq', data: { n, large } })
      await new Promise<void>((resolve) => setTimeout(resolve, 20))
    }
  })()
  t.teardown(async () => {
    publishing = false
    await publisherLoop
  })
  await subscribeAgain(rig, redis, 99)
  await eventually(() => connection.catchUpFrom === null || connection.closed, 'the catch-up to end', 20_000)
  publishing = false
  await publisherLoop
  t.ok(connection.live || connection.closed, `ended: ${connection.closed ? 'closed' : 'live'}`)
})

t.test('a stream still replaying its history when the subscription is lost is closed; reconnecting with its Last-Event-ID, it gets what it missed', async (t) => {
  if (!(await needRedis(t))) return
  const { proxy, viaProxy, direct } = await startRig(t, 'setuploss')
  const { stream: first } = await openConnected(`${viaProxy.url}/v1/stream?token=${userToken('u1')}`, { t })
  const [cursor] = await publishOk(direct.url, publisher, { to: { user: 'u1' }, event: 'seq', data: 0 })
  const history: string[] = []
  for (let n = 1; n <= 2; n++) history.push(...await publishOk(direct.url, publisher, { to: { user: 'u1' }, event: 'seq', data: n }))
  await first.next((event) => event.id === history[1], 5000, 'the history live on the first stream')

  // The second stream reads its history from `cursor`; that read is answered only later.
  proxy.holdReplies(SUBSCRIBER)
  const opening = openStream(`${viaProxy.url}/v1/stream?token=${userToken('u1')}`, { t, headers: { 'last-event-id': cursor } }).catch((error: Error) => error)
  await eventually(() => viaProxy.app.registry.ofUser('u1').filter((connection) => connection.channels.includes(channel.user('u1'))).length === 2,
    'the second stream to join its channels')
  proxy.holdReplies(COMMANDS)
  proxy.releaseReplies(SUBSCRIBER)
  const second = await opening
  if (second instanceof Error) throw second
  await second.nextEvent('connected')

  proxy.cutOff(SUBSCRIBER)
  await second.waitEnd()
  t.equal(logged(viaProxy, LOST), 1, 'closed on the loss of the subscription')
  t.same(seqIds(second), [], 'before it sent any of its history')
  const missed: string[] = []
  for (let n = 3; n <= 4; n++) missed.push(...await publishOk(direct.url, publisher, { to: { user: 'u1' }, event: 'seq', data: n }))
  proxy.restore(SUBSCRIBER)
  await eventually(() => logged(viaProxy, CATCHING_UP) === 1, 'the catch-up to start', 10_000)
  // Its read is answered only now, with the subscription back: open still, it would go live past the gap.
  proxy.releaseReplies(COMMANDS)

  await eventually(async () => (await request(`${viaProxy.url}/ready`)).status === 200, 'the instance back on Redis', 10_000, 50)
  const { stream: third } = await openConnected(`${viaProxy.url}/v1/stream?token=${userToken('u1')}`, { t, headers: { 'last-event-id': cursor } })
  const [marker] = await publishOk(direct.url, publisher, { to: { user: 'u1' }, event: 'seq', data: 5 })
  await third.next((event) => event.id === marker, 10_000, 'the marker on the reconnected stream')
  await first.next((event) => event.id === marker, 10_000, 'the marker on the first stream')
  t.same(seqIds(third), [...history, ...missed, marker], 'reconnected from its Last-Event-ID: its history, what it missed, then live, each once')
  t.same(otherEvents(third), ['connected'], 'no reset')
  t.same(seqIds(first), [cursor, ...history, ...missed, marker], 'the stream live at the loss is caught up')
  t.same(otherEvents(first), ['connected'], 'no reset')
})

t.test('a catch-up asked for again while one runs waits while the subscription is down again: after the last restore every event arrives once, in order, no reset', async (t) => {
  if (!(await needRedis(t))) return
  // Back after the first loss, with the catch-up's read answered only later.
  const { rig, redis, stream, send, before, first } = await catchUpHeld(t, 'queued')
  const { proxy, viaProxy } = rig

  // Lost and back while it runs: another catch-up is asked for.
  await loseSubscription(rig, 2)
  const probe = await subscribeAgain(rig, redis, 2)
  // Lost again before the one asked for can run; then the running one ends.
  await loseSubscription(rig, 3)
  // The running one's read is answered after that loss: it is dropped, and
  // its streams stay held for the next restore.
  proxy.releaseReplies(COMMANDS)
  // Through the instance's commands connection: answered after the held read
  // and after any read a catch-up started meanwhile, so the running one is over.
  const during = await send(3, viaProxy.url)

  proxy.restore(SUBSCRIBER)
  await eventually(async () => (await request(`${viaProxy.url}/ready`)).status === 200, 'the instance back on Redis', 10_000, 50)
  const marker = await send(4)
  await stream.next((event) => event.id === marker, 10_000, 'the marker')
  t.same(seqIds(stream), [before, first, probe, during, marker], 'every event, in order, each once')
  t.same(otherEvents(stream), ['connected'], 'no reset')
  t.notOk(stream.ended, 'the stream stayed open')
})

t.test('the subscription lost twice during one catch-up, the second time with the commands connection that reads the history: no reset, no gap, no duplicate', async (t) => {
  if (!(await needRedis(t))) return
  const rig = await startRig(t, 'twice')
  const { proxy, viaProxy, direct } = rig
  const redis = redisClient(t)
  const { stream } = await openConnected(`${viaProxy.url}/v1/stream?token=${userToken('u1')}`, { t })
  const { stream: other } = await openConnected(`${viaProxy.url}/v1/stream?token=${userToken('u2')}&topics=news`, { t })
  const send = async (to: object, data: number): Promise<string> => (await publishOk(direct.url, publisher, { to, event: 'seq', data }))[0]
  const user = { user: 'u1' }
  const topic = { topic: 'news' }
  const before = await send(user, 0)
  await stream.next((event) => event.id === before, 5000, 'the first event, live')

  await loseSubscription(rig, 1)
  const gap1 = [await send(user, 1), await send(topic, 1)]
  await restoreWithReadHeld(rig)

  await loseSubscription(rig, 2)
  const gap2 = [await send(user, 2), await send(topic, 2)]
  const probe = await subscribeAgain(rig, redis, 3)
  // Lost again, and the commands connection with it: the catch-up's reads fail.
  await loseSubscription(rig, 3)
  proxy.cut(COMMANDS)
  const gap3 = [await send(user, 4), await send(topic, 4)]

  proxy.restore(SUBSCRIBER)
  await eventually(async () => (await request(`${viaProxy.url}/ready`)).status === 200, 'the instance back on Redis', 10_000, 50)
  const marker = await send({ broadcast: true }, 5)
  await stream.next((event) => event.id === marker, 10_000, 'the marker on the user\'s stream')
  await other.next((event) => event.id === marker, 10_000, 'the marker on the topic\'s stream')
  t.same(seqIds(stream), [before, gap1[0], gap2[0], probe, gap3[0], marker], 'the user\'s stream: every event, in order, each once')
  t.same(otherEvents(stream), ['connected'], 'no reset')
  t.same(seqIds(other), [gap1[1], gap2[1], gap3[1], marker], 'the topic\'s stream: every event, in order, each once')
  t.same(otherEvents(other), ['connected'], 'no reset')
  t.notOk(stream.ended || other.ended, 'both streams stayed open')
})

t.test('a catch-up read answered after a new loss is not merged: the events published between that loss and its restore still arrive', async (t) => {
  if (!(await needRedis(t))) return
  // Back after the first loss: the catch-up's read reaches Redis; its answer is held.
  const { rig, redis, stream, send, before, first } = await catchUpHeld(t, 'mergegap')
  const { proxy, viaProxy } = rig

  await loseSubscription(rig, 2)
  const second = await send(2)
  // Heard live and held: newer than the gap's event, which the held read does not have.
  const live = await subscribeAgain(rig, redis, 3)

  proxy.releaseReplies(COMMANDS)
  await eventually(async () => (await request(`${viaProxy.url}/ready`)).status === 200, 'the instance ready', 10_000, 50)
  const marker = await send(4)
  await stream.next((event) => event.id === marker, 10_000, 'the marker')
  t.same(seqIds(stream), [before, first, second, live, marker], 'every event, in order, each once')
  t.same(otherEvents(stream), ['connected'], 'no reset')
})

t.test('a stream held since an earlier outage, its read dropped by a new loss, whose missed event aged out of the window: reset, not a silent hole', async (t) => {
  if (!(await needRedis(t))) return
  const historyTtlS = 5
  const rig = await startRig(t, 'agedgap', { HISTORY_TTL_S: String(historyTtlS) })
  const { proxy, viaProxy } = rig
  const redis = redisClient(t)
  // Here the condition is time itself: how old an event or an outage is against the window.
  const olderThan = async (since: number, ms: number, what: string): Promise<void> => await eventually(() => Date.now() - since > ms, what, ms + 5000, 50)
  const { stream, send } = await liveStream(t, rig)

  await loseSubscription(rig, 1)
  const missed = await send(1)
  const missedAt = Date.now()
  await olderThan(missedAt, 3000, 'the first outage to age')
  await restoreWithReadHeld(rig)
  // Its read is dropped: answered after this loss.
  await loseSubscription(rig, 2)
  // The event is now past the window; the second outage is not.
  await olderThan(missedAt, historyTtlS * 1000 + 700, 'the missed event to leave the window')
  await subscribeAgain(rig, redis, 2)

  proxy.releaseReplies(COMMANDS)
  await eventually(async () => (await request(`${viaProxy.url}/ready`)).status === 200, 'the instance ready', 10_000, 50)
  const marker = await send(3)
  await stream.next((event) => event.id === marker, 10_000, 'the marker')
  const resets = stream.events.filter((event) => event.event === 'reset')
  t.ok(seqIds(stream).includes(missed) || resets.length > 0, 'the missed event arrived, or a reset says it cannot')
  t.same(resets.map((event) => JSON.parse(event.data)), [{ reason: 'expired' }])
})

t.test('a subscriber connection that goes silent without closing is taken for lost by itself: its streams get what they missed, no reset', async (t) => {
  if (!(await needRedis(t))) return
  // A window of 20 s: PINGs every 2 s, a connection silent for 6 s is lost.
  const rig = await startRig(t, 'halfopen', { HISTORY_TTL_S: '20' })
  const { proxy, viaProxy } = rig
  const { stream, send, before } = await liveStream(t, rig)

  // The socket stays open; nothing comes through it any more.
  proxy.holdReplies(SUBSCRIBER)
  const missed = await send(1)
  await eventually(() => logged(viaProxy, LOST) === 1, 'the instance to notice the silence', 15_000, 50)
  t.ok(logged(viaProxy, 'bus subscriber does not answer') >= 1, 'it says why')
  proxy.releaseReplies(SUBSCRIBER)

  await eventually(async () => (await request(`${viaProxy.url}/ready`)).status === 200, 'the instance ready', 10_000, 50)
  const marker = await send(2)
  await stream.next((event) => event.id === marker, 10_000, 'the marker')
  t.same(seqIds(stream), [before, missed, marker], 'the missed event between the others')
  t.same(otherEvents(stream), ['connected'], 'no reset, no reconnect')
})

t.test('a stream opened without a cursor while the subscription is down gets nothing published before it existed', async (t) => {
  if (!(await needRedis(t))) return
  const { proxy, viaProxy, direct } = await startRig(t, 'freshloss')
  // Another user's stream: the instance has something to lose.
  const { stream: other } = await openConnected(`${viaProxy.url}/v1/stream?token=${userToken('u2')}`, { t })
  const [live] = await publishOk(direct.url, publisher, { to: { user: 'u2' }, event: 'seq', data: 0 })
  await other.next((event) => event.id === live, 5000, 'u2 live')
  // Published while u1 has no stream: nothing of u1's.
  const [old] = await publishOk(direct.url, publisher, { to: { user: 'u1' }, event: 'old', data: 1 })

  proxy.holdSubscribes()
  proxy.cut(SUBSCRIBER)
  await eventually(() => proxy.heldSubscribers > 0, 'the resubscription held')
  const opening = openStream(`${viaProxy.url}/v1/stream?token=${userToken('u1')}`, { t, timeoutMs: 10_000 }).catch((error: Error) => error)
  await eventually(() => viaProxy.app.registry.ofUser('u1').some((connection) => connection.channels.includes(channel.user('u1'))), 'u1 to join its channel')
  proxy.releaseSubscribes()
  const fresh = await opening
  if (fresh instanceof Error) throw fresh
  await fresh.nextEvent('connected')
  const [marker] = await publishOk(direct.url, publisher, { to: { user: 'u1' }, event: 'seq', data: 2 })
  await fresh.next((event) => event.id === marker, 10_000, 'the marker')
  t.notOk(fresh.events.some((event) => event.id === old), 'not the event from before it opened')
  t.same(otherEvents(fresh), ['connected'], 'no reset either')
})

t.test('a stream with no event yet when the subscription is lost catches up from its own opening, not the instance\'s older mark: nothing from before it opened, no reset', async (t) => {
  if (!(await needRedis(t))) return
  const rig = await startRig(t, 'quietloss', { HISTORY_SIZE: '5' })
  const { viaProxy, direct } = rig
  const redis = redisClient(t)
  // The instance hears one event, then nothing: its mark stays there.
  const { stream: other } = await openConnected(`${viaProxy.url}/v1/stream?token=${userToken('u2')}`, { t })
  const [heard] = await publishOk(direct.url, publisher, { to: { user: 'u2' }, event: 'seq', data: 0 })
  await other.next((event) => event.id === heard, 5000, 'u2 live')
  // More than HISTORY_SIZE for u1 while it has no stream anywhere: old, and trimmed.
  const old: string[] = []
  for (let n = 0; n < 8; n++) old.push(...await publishOk(direct.url, publisher, { to: { user: 'u1' }, event: 'old', data: n }))

  const { stream: fresh } = await openConnected(`${viaProxy.url}/v1/stream?token=${userToken('u1')}`, { t })
  await loseSubscription(rig, 1)
  const [missed] = await publishOk(direct.url, publisher, { to: { user: 'u1' }, event: 'seq', data: 1 })
  const marker = await subscribeAgain(rig, redis, 2)
  await fresh.next((event) => event.id === marker, 10_000, 'the marker')
  t.same(seqIds(fresh), [missed, marker], 'what it missed during the outage, then live')
  t.notOk(fresh.events.some((event) => old.includes(event.id ?? '')), 'nothing from before it opened')
  t.same(otherEvents(fresh), ['connected'], 'no reset (its channel was trimmed, but before it opened)')
})

t.test('a reconnect to an instance whose subscriber lags gets nothing at or below its cursor: the events still on their way to that instance are not sent again', async (t) => {
  if (!(await needRedis(t))) return
  const { proxy, viaProxy, direct } = await startRig(t, 'laggingreopen')
  // Keeps the lagging instance subscribed to u1's channel.
  const { stream: resident } = await openConnected(`${viaProxy.url}/v1/stream?token=${userToken('u1')}`, { t })
  const { stream: first } = await openConnected(`${direct.url}/v1/stream?token=${userToken('u1')}`, { t })

  proxy.holdReplies(SUBSCRIBER)
  const [held] = await publishOk(direct.url, publisher, { to: { user: 'u1' }, event: 'seq', data: 1 })
  await first.next((event) => event.id === held, 5000, 'the event, on the up-to-date instance')
  first.close()
  // Its own channel's SUBSCRIBE is answered after the held event: the open waits for it, the event then reaches it first.
  const opening = openConnected(`${viaProxy.url}/v1/stream?token=${userToken('u1')}`, { t, headers: { 'last-event-id': held }, timeoutMs: 10_000 })
  await eventually(() => viaProxy.app.registry.ofUser('u1').length === 2, 'the reconnect to join its channels on the lagging instance')
  proxy.releaseReplies(SUBSCRIBER)
  const { stream: second } = await opening
  await resident.next((event) => event.id === held, 5000, 'the held event, once it reached the lagging instance')

  const [marker] = await publishOk(direct.url, publisher, { to: { user: 'u1' }, event: 'seq', data: 2 })
  await second.next((event) => event.id === marker, 5000, 'the marker')
  t.same(seqIds(second), [marker], 'the event it had before it reconnected is not sent again')
  t.same(otherEvents(second), ['connected'], 'no reset')
})

t.test('user-wide changes answered while the instance\'s control channel was down reach its streams once it is back: a topic left is left, a topic added is joined', async (t) => {
  if (!(await needRedis(t))) return
  const rig = await startRig(t, 'realign')
  const { proxy, viaProxy, direct } = rig
  const token = userToken('u1')
  const { stream } = await openConnected(`${viaProxy.url}/v1/stream?token=${token}`, { t })
  t.equal((await request(`${direct.url}/v1/subscriptions`, { method: 'POST', token, body: { topics: ['rl-left'] } })).status, 200)
  await loseSubscription(rig, 1)
  // Answered without the cut-off instance's acknowledgement (at most 3 s later, README).
  t.same((await request(`${direct.url}/v1/subscriptions`, { method: 'DELETE', token, body: { topics: ['rl-left'] } })).json, { topics: [] })
  t.same((await request(`${direct.url}/v1/subscriptions`, { method: 'POST', token, body: { topics: ['rl-added'] } })).json, { topics: ['rl-added'] })
  proxy.restore(SUBSCRIBER)
  const listed = async (): Promise<readonly string[] | undefined> => {
    const answer = await request<{ connections: Array<{ userId: string, topics: string[] }> }>(`${direct.url}/v1/connections?userId=u1`, { token: adminToken() })
    return answer.json.connections.find((connection) => connection.userId === 'u1')?.topics
  }
  await eventually(async () => JSON.stringify(await listed()) === '["rl-added"]', 'the stream to hold the topics the user holds', 10_000, 50)
  const [left] = await publishOk(direct.url, publisher, { to: { topic: 'rl-left' }, event: 'left', data: 1 })
  const [added] = await publishOk(direct.url, publisher, { to: { topic: 'rl-added' }, event: 'added', data: 2 })
  t.equal((await stream.nextEvent('added')).id, added, 'the added topic\'s event arrives')
  t.notOk(stream.events.some((event) => event.id === left), 'the left topic\'s, published before it, did not')
})
