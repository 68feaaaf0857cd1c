import t from 'tap'
import type { Test } from 'tap'
import {
  eventually, forEachMode, openConnected, openStream, publishOk, publisherToken, spawnServer, startCluster, TEST_SECRET, userToken,
  type SseClient
} from './helpers'
import { DESCRIPTORS_KEPT, openFileLimit, streamCapacity } from '../src/open-files'
import { freePort, type ServerProcess } from './helpers/process'
import { interceptNextAdmission, loggedAs, startGateway, type Gateway } from './helpers/gateway'
import { modeEnv } from './helpers/modes'
import { uniquePrefix } from './helpers/redis'
import { gate } from './helpers/drain'
import { EVICTED_RETRY_MS } from '../src/core/streams'
import { RawClient } from './helpers/raw'
import { REFUSE_MARGIN, SPARED_MS } from '../src/connection-reserve'

const publisher = publisherToken()

function streamUrl (url: string, userId: string): string {
  return `${url}/v1/stream?token=${userToken(userId)}`
}

/** A stream of `userId` opened once its slot is free: in Redis mode a close is recorded asynchronously. */
async function openWhenFree (t: Test, url: string, userId: string): Promise<SseClient> {
  let opened: SseClient | null = null
  await eventually(async () => {
    const stream = await openStream(streamUrl(url, userId), { t })
    if (stream.status === 200) opened = stream
    else stream.close()
    return stream.status === 200
  }, `a slot for ${userId} again`)
  return opened as unknown as SseClient
}

/** A refused stream: the status, `Retry-After` (whole seconds) and the JSON error shape. */
function assertRefused (t: Test, stream: SseClient, status: number, error: string): void {
  t.equal(stream.status, status, `answered ${status}`)
  t.match(stream.headers['retry-after'], /^\d+$/, 'Retry-After in whole seconds')
  t.ok(Number(stream.headers['retry-after']) >= 1, 'Retry-After at least 1')
  t.match(stream.headers['content-type'], /^application\/json/)
  t.match(stream.json(), { statusCode: status, error, message: String })
  t.notMatch(stream.text, /event: connected/, 'no stream was opened')
}

/** The `evicted` event (no id line), then the end of the stream. */
async function assertEvicted (t: Test, stream: SseClient): Promise<void> {
  const event = await stream.nextEvent('evicted')
  t.equal(event.id, undefined, '`evicted` carries no id line')
  t.doesNotThrow(() => JSON.parse(event.data), '`evicted` data is JSON')
  t.equal(stream.retries.at(-1), EVICTED_RETRY_MS, 'and a retry of a day before it: a page that does not close its EventSource leaves the slot be')
  await stream.waitEnd()
  t.ok(stream.ended, 'the evicted stream is closed')
}

forEachMode(t, 'MAX_CONNECTIONS: past it a new stream gets 503 with Retry-After; a freed slot opens again', async (t, mode) => {
  const [gateway] = await startCluster(t, mode, 1, { MAX_CONNECTIONS: '2' })
  const { url, app } = gateway
  const { stream: first } = await openConnected(streamUrl(url, 'u1'), { t })
  await openConnected(streamUrl(url, 'u2'), { t })
  const refused = await openStream(streamUrl(url, 'u3'), { t })
  assertRefused(t, refused, 503, 'Service Unavailable')
  t.equal(app.registry.size, 2, 'the refused stream holds no slot')

  first.close()
  await eventually(() => app.registry.size === 1, 'the closed stream to free its slot')
  const { connected } = await openConnected(streamUrl(url, 'u3'), { t })
  t.equal(connected.userId, 'u3', 'a freed slot takes a new stream')
})

t.test('the open-file limit is read from /proc/self/limits: a number, or none when unlimited or unreadable', async (t) => {
  const limits = (soft: string): string => `Limit                     Soft Limit           Hard Limit           Units     \nMax processes             95403                95403                processes \nMax open files            ${soft}                 1048576              files     \n`
  t.equal(openFileLimit(limits('1024')), 1024)
  t.equal(openFileLimit(limits('unlimited')), null)
  t.equal(openFileLimit(''), null)
  t.equal(streamCapacity(100_000, null), 100_000, 'no limit known: MAX_CONNECTIONS')
  t.equal(streamCapacity(500, 1_048_576), 500, 'a limit far above: MAX_CONNECTIONS')
  t.equal(streamCapacity(100_000, 100), 1, 'a limit below what is kept: one stream, not none')
  t.type(openFileLimit(), 'number', 'this machine\'s own')
})

/** The open-file limit the tests of the descriptor reserve run the gateway under. */
const FILE_LIMIT = 300

/**
 * A gateway run under `prlimit --nofile=FILE_LIMIT`, its public port, and a
 * list for the raw connections the test opens, destroyed at its end.
 */
async function underFileLimit (t: Test, env: Record<string, string> = {}): Promise<{ server: ServerProcess, port: number, raw: RawClient[] }> {
  const server = await spawnServer(t, { JWT_SECRET: TEST_SECRET, HOST: '127.0.0.1', LOG_LEVEL: 'info', ...env }, 20_000, { prefix: ['prlimit', `--nofile=${FILE_LIMIT}:${FILE_LIMIT}`, '--'] })
  const raw: RawClient[] = []
  t.teardown(() => { for (const client of raw) client.destroy() })
  return { server, port: Number(new URL(server.url).port), raw }
}

t.test('an open-file limit below MAX_CONNECTIONS caps streams below it: past the cap 503, while probes, publishes and the streams held go on', async (t) => {
  const cap = streamCapacity(100_000, FILE_LIMIT)
  t.equal(cap, FILE_LIMIT - DESCRIPTORS_KEPT)
  const { server } = await underFileLimit(t)
  const capLines = (): Array<Record<string, unknown>> => loggedAs(server.stdout(), 'streams capped below MAX_CONNECTIONS by the open-file limit (raise it: ulimit -n, docker run --ulimit nofile=N, systemd LimitNOFILE)')
  await eventually(() => capLines().length > 0, 'the cap to be logged')
  const [line] = capLines()
  t.match(line, { openFileLimit: FILE_LIMIT, maxConnections: 100_000, streams: cap }, 'the start says so, with the figures')
  const held: SseClient[] = []
  for (let n = 0; n < cap; n++) held.push((await openConnected(streamUrl(server.url, `cap-${n}`), { t })).stream)
  const refused = await openStream(streamUrl(server.url, 'one-more'), { t })
  assertRefused(t, refused, 503, 'Service Unavailable')
  t.match(refused.json(), { message: /open-file limit/ }, 'saying why')
  t.equal((await fetch(`${server.url}/health`)).status, 200, 'the health probe is answered')
  const [id] = await publishOk(server.url, publisherToken(), { to: { user: `cap-${cap - 1}` }, event: 'still', data: 1 })
  t.equal((await held[cap - 1].nextEvent('still')).id, id, 'a publish reaches a stream held')
})

/** Resolves after the reserve's spared time: only connections doing nothing for longer are closed. */
async function pastSparedTime (): Promise<void> {
  await new Promise((resolve) => setTimeout(resolve, SPARED_MS + 200))
}

/** `count` connections to `port` that send nothing (past the limit, some are closed on arrival). */
async function silentConnections (port: number, raw: RawClient[], count: number): Promise<void> {
  for (let n = 0; n < count; n++) {
    const client = new RawClient(port)
    raw.push(client)
    await client.connected()
  }
}

/** A raw connection to `port` that sends `request`, and resolves once its whole answer is read. */
async function answeredOn (port: number, raw: RawClient[], request = 'GET /health HTTP/1.1\r\nHost: gateway\r\n\r\n'): Promise<RawClient> {
  const client = new RawClient(port)
  raw.push(client)
  client.write(request)
  await client.until(() => client.response().complete && client.response().body.length > 0, 10_000, 'an answer')
  return client
}

t.test('near the open-file limit, connections doing nothing give way: public ones that never sent a request and kept-alive ones are closed; streams, the internal listener\'s connections and new arrivals are kept', async (t) => {
  const cap = streamCapacity(100_000, FILE_LIMIT)
  const internalPort = await freePort()
  const { server, port, raw } = await underFileLimit(t, { INTERNAL_PORT: String(internalPort) })
  const held: SseClient[] = []
  for (let n = 0; n < cap; n++) held.push((await openConnected(streamUrl(server.url, `full-${n}`), { t })).stream)
  // Kept-alive connections left idle after one request each, on both listeners.
  const keptAlive: RawClient[] = []
  for (let n = 0; n < 30; n++) keptAlive.push(await answeredOn(port, raw))
  const publisherKeptAlive = await answeredOn(internalPort, raw)
  await pastSparedTime()
  // Then more connections that send nothing than the limit leaves room for.
  await silentConnections(port, raw, FILE_LIMIT)
  await Promise.all(keptAlive.map(async (client) => await client.waitClose(10_000)))
  t.pass('the public kept-alive connections idle between requests were closed')
  await pastSparedTime()

  // On a new connection: it comes past the threshold, and those that never sent a request give way to it.
  const probe = await answeredOn(port, raw)
  t.equal(probe.response().status, 200, 'the health probe is answered')
  t.notOk(publisherKeptAlive.closed, 'the internal listener\'s kept-alive connection is kept')
  publisherKeptAlive.write('GET /health HTTP/1.1\r\nHost: gateway\r\n\r\n')
  await publisherKeptAlive.until(() => (publisherKeptAlive.text().match(/HTTP\/1\.1 200 /g) ?? []).length === 2, 5000, 'the second answer')
  const [id] = await publishOk(`http://127.0.0.1:${internalPort}`, publisherToken(), { to: { user: `full-${cap - 1}` }, event: 'still', data: 1 })
  t.equal((await held[cap - 1].nextEvent('still')).id, id, 'a publish reaches a stream held')
  t.equal(held.filter((stream) => stream.ended).length, 0, 'every stream is kept')
  const reclaims = (): Array<Record<string, unknown>> => loggedAs(server.stdout(), 'connections near the open-file limit: idle ones closed')
  // (Lines are written in batches.)
  await eventually(() => reclaims().length > 0, 'the reclaim to be logged')
  t.match(reclaims()[0], { openFileLimit: FILE_LIMIT, closedBetweenRequests: Number, closedBeforeFirstRequest: Number }, 'with the figures')
  // (The start's own probe may have left one more kept alive.)
  t.ok(Number(reclaims()[0].closedBetweenRequests) >= 30, 'the kept-alive ones among them')
})

t.test('near the open-file limit, an answer still being written to a slow reader, and the requests pipelined behind it, are kept', async (t) => {
  const { server, port, raw } = await underFileLimit(t, { LOG_LEVEL: 'warn' })
  const result = 'x'.repeat(250_000)
  const stored = await fetch(`${server.url}/v1/jobs/big`, {
    method: 'PUT',
    headers: { authorization: `Bearer ${publisher}`, 'content-type': 'application/json' },
    body: JSON.stringify({ userId: 'u1', status: 'completed', result })
  })
  t.equal(stored.status, 200, 'a job with a large result')
  // 40 answers of 250 KB: more than the kernel's buffers hold for a reader that does not read.
  const count = 40
  const slow = new RawClient(port)
  raw.push(slow)
  slow.pause()
  slow.write(`GET /v1/jobs/big HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer ${publisher}\r\n\r\n`.repeat(count))
  await silentConnections(port, raw, FILE_LIMIT)
  await pastSparedTime()
  const probe = await answeredOn(port, raw)
  t.equal(probe.response().status, 200, 'a new connection is answered (the silent ones gave way)')
  slow.resume()
  await slow.until(() => (slow.text().match(/HTTP\/1\.1 200 /g) ?? []).length === count && slow.bytes > count * result.length, 30_000, 'every answer')
  t.notOk(slow.closed, 'the slow reader got every answer, on a connection still open')
})

t.test('near the open-file limit, a connection still sending is kept, and one whose last request the router refused is closed when idle', async (t) => {
  const { port, raw } = await underFileLimit(t, { LOG_LEVEL: 'warn' })
  // Answered, then the next request's head sent a byte at a time, every 200 ms.
  const sending = await answeredOn(port, raw)
  const nextHead = 'GET /health HTTP/1.1\r\nHost: gateway\r\nX-Padding: ' + 'p'.repeat(200)
  let sent = 0
  const dribble = setInterval(() => { if (sent < nextHead.length) sending.write(nextHead[sent++]) }, 200)
  t.teardown(() => clearInterval(dribble))
  // Its second request refused by the router (a malformed escape), before any hook.
  const refused = await answeredOn(port, raw, 'GET /health HTTP/1.1\r\nHost: gateway\r\n\r\nGET /v1/jobs/%zz HTTP/1.1\r\nHost: gateway\r\n\r\n')
  await refused.until(() => /HTTP\/1\.1 400 /.test(refused.text()), 5000, 'the router\'s 400')
  await silentConnections(port, raw, FILE_LIMIT)
  await pastSparedTime()
  const probe = await answeredOn(port, raw)
  t.equal(probe.response().status, 200, 'a new connection is answered')
  await refused.waitClose(5000)
  t.pass('the connection idle after the router\'s refusal was closed')
  t.notOk(sending.closed, 'the connection still sending its next head is kept')
})

t.test('64 connections short of the open-file limit, with none idle to close, the public listener closes new ones on arrival', async (t) => {
  const { server, port, raw } = await underFileLimit(t)
  // Requests under way (a publish whose body has not come), which are not
  // idle: more than the listener takes. (The start's own probe may hold one
  // more connection, kept alive, until a reclaim closes it.)
  const limit = FILE_LIMIT - REFUSE_MARGIN
  const busy: RawClient[] = []
  for (let n = 0; n < limit + 5; n++) {
    const client = new RawClient(port)
    raw.push(client)
    busy.push(client)
    client.write(`POST /v1/publish HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer ${publisher}\r\nContent-Type: application/json\r\nContent-Length: 10\r\n\r\n`)
    await client.connected()
  }
  await eventually(() => busy.filter((client) => client.closed).length >= 4, 'the last arrivals to be closed')
  t.ok(busy.filter((client) => client.closed).every((client) => client.bytes === 0), 'closed without a word')
  t.equal(busy.slice(0, limit - 2).filter((client) => client.closed).length, 0, 'the requests under way are kept')
  await eventually(() => server.stdout().includes('new ones closed on arrival'), 'the refusal to be logged')
})

forEachMode(t, 'MAX_CONNECTIONS holds when many streams open at once: concurrent opens cannot all pass the check while admission waits', async (t, mode) => {
  const [gateway] = await startCluster(t, mode, 1, { MAX_CONNECTIONS: '2' })
  // Admission made slow on purpose (the real one, delayed), so all 40 requests
  // are in while the first ones wait on it: the window a Redis round trip opens.
  const state = gateway.app.state
  const admit = state.admit.bind(state)
  state.admit = async (request) => {
    await new Promise((resolve) => setTimeout(resolve, 100))
    return await admit(request)
  }
  const streams = await Promise.all(Array.from({ length: 40 }, async (_, index) => await openStream(streamUrl(gateway.url, `storm${index}`), { t })))
  const statuses = streams.map((stream) => stream.status)
  t.equal(statuses.filter((status) => status === 200).length, 2, 'two streams opened')
  t.equal(statuses.filter((status) => status === 503).length, 38, 'the other 38 got 503')
  t.equal(gateway.app.registry.size, 2, 'the registry holds two')
  for (const stream of streams) if (stream.status === 503) assertRefused(t, stream, 503, 'Service Unavailable')
})

forEachMode(t, 'MAX_CONNECTIONS is per instance: a full instance refuses while another of the cluster accepts', async (t) => {
  const [a, b] = await startCluster(t, 'redis', 2, { MAX_CONNECTIONS: '1' })
  await openConnected(streamUrl(a.url, 'u1'), { t })
  assertRefused(t, await openStream(streamUrl(a.url, 'u2'), { t }), 503, 'Service Unavailable')
  const { connected } = await openConnected(streamUrl(b.url, 'u2'), { t })
  t.equal(connected.userId, 'u2', 'the other instance still has room')
}, ['redis'])

forEachMode(t, 'MAX_CONNECTIONS_PER_USER with reject: the third tab gets 429 with Retry-After; other users are not affected; a closed tab frees a slot', async (t, mode) => {
  const [gateway] = await startCluster(t, mode, 1, { MAX_CONNECTIONS_PER_USER: '2', CONNECTION_LIMIT_POLICY: 'reject' })
  const { url, app } = gateway
  const { stream: first } = await openConnected(streamUrl(url, 'u1'), { t })
  const { stream: second } = await openConnected(streamUrl(url, 'u1'), { t })
  const refused = await openStream(streamUrl(url, 'u1'), { t })
  assertRefused(t, refused, 429, 'Too Many Requests')
  t.notOk(first.ended || second.ended, 'reject leaves the open tabs alone')
  t.equal(first.events.filter((event) => event.event === 'evicted').length, 0, 'nobody is evicted')

  await openConnected(streamUrl(url, 'u2'), { t })
  t.pass('another user opens')

  // Job streams are streams: they count against the user too.
  assertRefused(t, await openStream(`${url}/v1/jobs/stream?token=${userToken('u1')}`, { t }), 429, 'Too Many Requests')

  first.close()
  await eventually(() => app.registry.ofUser('u1').length === 1, 'the closed tab to leave')
  // In Redis mode the release is recorded asynchronously: the slot frees shortly after.
  t.equal((await openWhenFree(t, url, 'u1')).status, 200, 'a closed tab frees its slot')
})

forEachMode(t, 'MAX_CONNECTIONS_PER_USER counts every tab of the user cluster-wide: a tab on A and a tab on B fill a limit of 2', async (t) => {
  const [a, b] = await startCluster(t, 'redis', 2, { MAX_CONNECTIONS_PER_USER: '2', CONNECTION_LIMIT_POLICY: 'reject' })
  await openConnected(streamUrl(a.url, 'u1'), { t })
  await openConnected(streamUrl(b.url, 'u1'), { t })
  assertRefused(t, await openStream(streamUrl(a.url, 'u1'), { t }), 429, 'Too Many Requests')
  assertRefused(t, await openStream(streamUrl(b.url, 'u1'), { t }), 429, 'Too Many Requests')
  await openConnected(streamUrl(b.url, 'u2'), { t })
  t.pass('another user opens on either instance')
}, ['redis'])

forEachMode(t, 'evict-oldest: the oldest tab gets `evicted` then closes, the new one opens, the others keep receiving', async (t, mode) => {
  const [gateway] = await startCluster(t, mode, 1, { MAX_CONNECTIONS_PER_USER: '2', CONNECTION_LIMIT_POLICY: 'evict-oldest' })
  const { url, app } = gateway
  const { stream: oldest, connected: oldestInfo } = await openConnected(streamUrl(url, 'u1'), { t })
  const { stream: middle } = await openConnected(streamUrl(url, 'u1'), { t })
  const { stream: newest, connected } = await openConnected(streamUrl(url, 'u1'), { t })
  t.equal(newest.status, 200, 'the new tab opens')
  t.equal(connected.userId, 'u1')
  await assertEvicted(t, oldest)
  t.notOk(middle.ended, 'the middle tab stays')
  await eventually(() => app.registry.get(oldestInfo.connectionId) === undefined, 'the evicted stream to leave the registry')
  t.equal(app.registry.ofUser('u1').length, 2)

  const [id] = await publishOk(url, publisher, { to: { user: 'u1' }, event: 'after', data: 'x' })
  t.equal((await middle.nextEvent('after')).id, id)
  t.equal((await newest.nextEvent('after')).id, id)
  t.notOk(oldest.events.some((event) => event.event === 'after'), 'the evicted tab gets nothing more')

  // And again: now the middle one is the oldest.
  await openConnected(streamUrl(url, 'u1'), { t })
  await assertEvicted(t, middle)
  t.notOk(newest.ended, 'the newer tab stays')
})

forEachMode(t, 'evict-oldest across instances: the oldest tab, on A, is evicted by a new tab on B', async (t) => {
  const [a, b] = await startCluster(t, 'redis', 2, { MAX_CONNECTIONS_PER_USER: '2', CONNECTION_LIMIT_POLICY: 'evict-oldest' })
  const { stream: onA, connected: infoA } = await openConnected(streamUrl(a.url, 'u1'), { t })
  const { stream: onB } = await openConnected(streamUrl(b.url, 'u1'), { t })
  const { stream: newest } = await openConnected(streamUrl(b.url, 'u1'), { t })
  t.equal(newest.status, 200)
  await assertEvicted(t, onA)
  await eventually(() => a.app.registry.get(infoA.connectionId) === undefined, 'A to drop the evicted stream')
  t.notOk(onB.ended, 'the younger tab on B stays')

  // Later the oldest is on B, the new tab on A.
  await openConnected(streamUrl(a.url, 'u1'), { t })
  await assertEvicted(t, onB)
  t.notOk(newest.ended)
}, ['redis'])

forEachMode(t, 'seed 004: MAX_CONNECTIONS_PER_USER=1 with evict-oldest keeps exactly one stream per user, the latest', async (t, mode) => {
  const [gateway] = await startCluster(t, mode, 1, { MAX_CONNECTIONS_PER_USER: '1', CONNECTION_LIMIT_POLICY: 'evict-oldest' })
  const { url, app } = gateway
  const { stream: first } = await openConnected(`${streamUrl(url, 'u1')}&topics=news`, { t })
  const { stream: other } = await openConnected(`${streamUrl(url, 'u2')}&topics=news`, { t })
  const { stream: second } = await openConnected(`${streamUrl(url, 'u1')}&topics=news`, { t })
  await assertEvicted(t, first)
  t.notOk(other.ended, 'another user is not affected')
  await eventually(() => app.registry.ofUser('u1').length === 1, 'one stream for u1')

  const [id] = await publishOk(url, publisher, { to: { topic: 'news' }, event: 'headline', data: { n: 1 } })
  t.equal((await second.nextEvent('headline')).id, id, 'the latest stream receives')
  t.equal((await other.nextEvent('headline')).id, id)

  const { stream: third } = await openConnected(`${streamUrl(url, 'u1')}&topics=news`, { t })
  await assertEvicted(t, second)
  t.equal(third.status, 200)
  await eventually(() => app.registry.ofUser('u1').length === 1, 'still one stream for u1')
})

forEachMode(t, 'seed 004 across instances: one stream per user cluster-wide', async (t) => {
  const [a, b] = await startCluster(t, 'redis', 2, { MAX_CONNECTIONS_PER_USER: '1', CONNECTION_LIMIT_POLICY: 'evict-oldest' })
  const { stream: onA } = await openConnected(streamUrl(a.url, 'u1'), { t })
  const { stream: onB } = await openConnected(streamUrl(b.url, 'u1'), { t })
  await assertEvicted(t, onA)
  await eventually(() => a.app.registry.size + b.app.registry.size === 1, 'one stream left in the cluster')
  const [id] = await publishOk(a.url, publisher, { to: { user: 'u1' }, event: 'ping', data: 1 })
  t.equal((await onB.nextEvent('ping')).id, id, 'the surviving stream on B receives what A accepted')
}, ['redis'])

forEachMode(t, 'evict-oldest, one stream per user, six opens at once across two instances: one stream lives, on the limit, and only it receives', async (t) => {
  const [a, b] = await startCluster(t, 'redis', 2, { MAX_CONNECTIONS_PER_USER: '1', CONNECTION_LIMIT_POLICY: 'evict-oldest' })
  // A stream is registered before it has joined its channels (its user-wide
  // topics are read from Redis first): slowed down on purpose, as a loaded
  // machine slows it, so that the publish below would come in that window
  // if it did not wait for the survivor's `connected`.
  for (const { app: { state } } of [a, b]) {
    const userTopics = state.userTopics.bind(state)
    state.userTopics = async (userId) => {
      await new Promise((resolve) => setTimeout(resolve, 100))
      return await userTopics(userId)
    }
  }
  // A stream evicted while its own open still waits on Redis must end too,
  // once it is registered; rounds make that window likely to be hit.
  for (let round = 0; round < 3; round++) {
    const user = `race-${round}`
    const streams = await Promise.all([a, b, a, b, a, b].map(async (gateway) => await openStream(streamUrl(gateway.url, user), { t })))
    t.same(streams.map((stream) => stream.status), [200, 200, 200, 200, 200, 200], `round ${round}: every open answered 200`)
    await eventually(() => streams.filter((stream) => !stream.ended).length <= 1, `round ${round}: all but one stream ended`, 10_000)
    await eventually(() => a.app.registry.ofUser(user).length + b.app.registry.ofUser(user).length === 1, `round ${round}: one stream registered in the cluster`)
    const survivors = streams.filter((stream) => !stream.ended)
    t.equal(survivors.length, 1, `round ${round}: one stream left open`)
    // Registered is not yet subscribed: `connected` comes once its channels
    // are joined, and what is published before that a stream opened without
    // a cursor never sees.
    await survivors[0].nextEvent('connected')
    const [id] = await publishOk(a.url, publisher, { to: { user }, event: 'ping', data: round })
    t.equal((await survivors[0].nextEvent('ping')).id, id, `round ${round}: the survivor receives`)
    for (const stream of streams) stream.close()
  }
}, ['redis'])

/**
 * u1's stream on `holderAt`, then a reopen of its id on `reopenAt` whose
 * real admission is run `order` the opening of a new stream of u1 (awaited
 * by `openNewcomer`), so that the new stream's open falls in that window.
 */
async function reopenWithNewcomer (t: Test, holderAt: Gateway, reopenAt: Gateway, order: 'before' | 'after', openNewcomer: () => Promise<SseClient>): Promise<{
  holder: SseClient, reopened: SseClient, newcomer: SseClient
}> {
  const { stream: holder, connected } = await openConnected(streamUrl(holderAt.url, 'u1'), { t })
  let newcomer: SseClient | null = null
  interceptNextAdmission(t, reopenAt, async (admit) => {
    if (order === 'before') newcomer = await openNewcomer()
    const admission = await admit()
    if (order === 'after') newcomer = await openNewcomer()
    return admission
  })
  const reopened = await openStream(`${reopenAt.url}/v1/stream/${connected.connectionId}?token=${userToken('u1')}`, { t })
  if (newcomer === null) throw new Error(`the reopen answered ${reopened.status} without being admitted`)
  return { holder, reopened, newcomer }
}

/**
 * A new stream of the user opened while a reopen of a live id waits on its
 * admission (the real one, held until that open has been answered): the
 * id's holder keeps its slot until the reopen is admitted, so the new stream
 * is refused and the reopen takes the id. Were the holder closed first, the
 * new stream would take its slot and the reopen would be refused, leaving
 * the user without the stream it reopened.
 */
forEachMode(t, 'reject at the limit: a reopen of a live id keeps the holder\'s slot against a new stream opened while it is admitted', async (t, mode) => {
  const gateways = await startCluster(t, mode, mode === 'redis' ? 2 : 1, { MAX_CONNECTIONS_PER_USER: '1', CONNECTION_LIMIT_POLICY: 'reject' })
  const holderGateway = gateways[0]
  const { holder, reopened, newcomer } = await reopenWithNewcomer(t, holderGateway, gateways[gateways.length - 1], 'before', async () => await openStream(streamUrl(holderGateway.url, 'u1'), { t }))
  t.equal(reopened.status, 200, 'the reopen is admitted')
  assertRefused(t, newcomer, 429, 'Too Many Requests')
  await assertEvicted(t, holder)
  const [id] = await publishOk(holderGateway.url, publisher, { to: { user: 'u1' }, event: 'after', data: 'x' })
  t.equal((await reopened.nextEvent('after')).id, id, 'the reopened stream receives')
  await eventually(() => gateways.reduce((sum, gateway) => sum + gateway.app.registry.ofUser('u1').length, 0) === 1, 'one stream of u1 left')
})

forEachMode(t, 'a reopen refused by the limit leaves the id\'s holder on another instance open and receiving', async (t) => {
  // Two instances with different limits: the holder and another tab fit A's
  // limit of 2, the reopen on B is held to B's limit of 1.
  const prefix = uniquePrefix('reopenrefused')
  const a = await startGateway(t, modeEnv('redis', prefix, { MAX_CONNECTIONS_PER_USER: '2', CONNECTION_LIMIT_POLICY: 'reject' }))
  const b = await startGateway(t, modeEnv('redis', prefix, { MAX_CONNECTIONS_PER_USER: '1', CONNECTION_LIMIT_POLICY: 'reject' }))
  const { stream: holder, connected } = await openConnected(streamUrl(a.url, 'u1'), { t })
  const { stream: other } = await openConnected(streamUrl(a.url, 'u1'), { t })
  const refused = await openStream(`${b.url}/v1/stream/${connected.connectionId}?token=${userToken('u1')}`, { t })
  assertRefused(t, refused, 429, 'Too Many Requests')
  const [id] = await publishOk(b.url, publisher, { to: { user: 'u1' }, event: 'after', data: 'x' })
  t.equal((await holder.nextEvent('after')).id, id, 'the holder still receives')
  t.equal((await other.nextEvent('after')).id, id)
  t.notOk(holder.ended, 'the holder stays open')
  t.notOk(holder.events.some((event) => event.event === 'evicted'), 'the holder was not evicted')
  t.equal(a.app.registry.ofUser('u1').length, 2)
}, ['redis'])

forEachMode(t, 'a holder that closes while a reopen of its id is refused gives its slot back', async (t, mode) => {
  const [gateway] = await startCluster(t, mode, 1, { MAX_CONNECTIONS_PER_USER: '1', CONNECTION_LIMIT_POLICY: 'reject' })
  const { url, app } = gateway
  const { stream: holder, connected } = await openConnected(streamUrl(url, 'u1'), { t })
  // The holder's tab goes away while the reopen waits, and the reopen is refused.
  interceptNextAdmission(t, gateway, async () => {
    holder.close()
    await eventually(() => app.registry.get(connected.connectionId) === undefined, 'the holder to close')
    return { admitted: false }
  })
  const refused = await openStream(`${url}/v1/stream/${connected.connectionId}?token=${userToken('u1')}`, { t })
  assertRefused(t, refused, 429, 'Too Many Requests')
  t.equal((await openWhenFree(t, url, 'u1')).status, 200, 'the closed holder\'s slot is free')
})

/**
 * evict-oldest, one stream per user: a new stream opens after a reopen of a
 * live id was admitted and before it registered (its admission's answer held
 * back). The new stream's admission evicts the id; the holder, still
 * registered until the reopen replaces it, is found first, and the reopen
 * must end too, or it would live on outside the limit.
 */
forEachMode(t, 'evict-oldest: a reopen evicted while it registers ends, with the holder it was replacing', async (t, mode) => {
  const gateways = await startCluster(t, mode, mode === 'redis' ? 2 : 1, { MAX_CONNECTIONS_PER_USER: '1', CONNECTION_LIMIT_POLICY: 'evict-oldest' })
  const holderGateway = gateways[0]
  const newcomerGateway = gateways[gateways.length - 1]
  // The new stream's open has evicted the reopened id (and told every instance) once it is connected.
  const { holder, reopened, newcomer: survivor } = await reopenWithNewcomer(t, holderGateway, holderGateway, 'after', async () => (await openConnected(streamUrl(newcomerGateway.url, 'u1'), { t })).stream)
  t.equal(reopened.status, 200, 'the reopen was admitted')
  await assertEvicted(t, reopened)
  await holder.waitEnd()
  await eventually(() => gateways.reduce((sum, gateway) => sum + gateway.app.registry.ofUser('u1').length, 0) === 1, 'one stream of u1 registered')
  const [id] = await publishOk(newcomerGateway.url, publisher, { to: { user: 'u1' }, event: 'after', data: 'x' })
  t.equal((await survivor.nextEvent('after')).id, id, 'the newest stream receives')
  t.notOk(reopened.events.some((event) => event.event === 'after'), 'the evicted reopen does not')
})

forEachMode(t, 'evict-oldest: a stream evicted while it still joins its channels answers 200 with `retry` and `connected` first, then `evicted`', async (t, mode) => {
  const [gateway] = await startCluster(t, mode, 1, { MAX_CONNECTIONS_PER_USER: '1', CONNECTION_LIMIT_POLICY: 'evict-oldest' })
  const { url, app } = gateway
  // The user's channel is listened to once its first stream joins it: held there, that stream is still opening.
  const joining = gate(app.bus, 'listen', (args) => args[0] === 'u:joining')
  const opening = openStream(streamUrl(url, 'joining'), { t, timeoutMs: 15_000 })
  await joining.entered
  // Its head is written only when it ends: when the second one's admission evicts it.
  const second = openStream(streamUrl(url, 'joining'), { t, timeoutMs: 15_000 })
  const first = await opening
  await eventually(() => first.ended, 'the first stream to end', 10_000)
  joining.open()
  await second
  t.equal(first.status, 200)
  t.same(first.events.map((event) => event.event), ['connected', 'evicted'], 'connected, then evicted')
  t.same(first.retries, [app.config.retryMs, EVICTED_RETRY_MS], 'with its retry, then the evicted stream\'s day-long one')
  t.match(JSON.parse(first.events[0]?.data ?? '{}'), { userId: 'joining' })
})
