import t from 'tap'
import { readFileSync } from 'node:fs'
import {
  eventually, forEachMode, openConnected, openStream, publishOk, publisherToken, spawnServer, startCluster,
  TEST_SECRET, userToken
} from './helpers'
import {
  flood, FLOOD_EVENT_BYTES as EVENT_BYTES, FLOOD_MIN_BYTES, FLOOD_PER_REQUEST as PER_REQUEST, floodData as bigData,
  floodMaxBytes, getRequest, metricValue, neverReadingStream, rawConnect, scrape, serverSendQueue
} from './helpers/raw'
import { connect, dataOf, presence, setMembers } from './helpers/channels'

const publisher = publisherToken()

forEachMode(t, 'a client that never reads while 2 MiB (and more, as long as the kernel absorbs it) are published to it is dropped as a slow consumer, another user gets everything in order, and a reconnect replays what it missed', async (t, mode) => {
  const maxBuffered = 1024 * 1024
  const [gateway] = await startCluster(t, mode, 1, { MAX_BUFFERED_BYTES: String(maxBuffered), KEEPALIVE_MS: '60000' })
  const { url, port, app } = gateway
  const { raw, connectionId, markerId } = await neverReadingStream(t, url, port, 'slow')
  const { stream: other } = await openConnected(`${url}/v1/stream?token=${userToken('fast')}`, { t })

  const maxBytes = floodMaxBytes(maxBuffered)
  const ids = await flood(url, { users: ['slow', 'fast'] }, () => app.registry.get(connectionId) === undefined, maxBytes)
  const count = ids.length
  t.ok(count * EVENT_BYTES >= FLOOD_MIN_BYTES, `published ${((count * EVENT_BYTES) / 1048576).toFixed(2)} MiB (at most ${(maxBytes / 1048576).toFixed(2)} MiB)`)

  // The gateway drops the slow stream on its own: its registry and its metrics say so.
  await eventually(() => app.registry.get(connectionId) === undefined, 'the slow stream to leave the registry', 10_000)
  const samples = await scrape(url)
  t.equal(metricValue(samples, 'sse_slow_consumer_drops_total'), 1, 'sse_slow_consumer_drops_total is 1')
  t.equal(metricValue(samples, 'sse_connections_closed_total', { reason: 'slow' }), 1, 'closed with reason slow')
  t.equal(metricValue(samples, 'sse_connections'), 1, 'only the reading stream is left')

  // The other user's stream got every event, in order, with the ids the publisher got.
  const received = await other.take(count, 20_000)
  t.same(received.map((event) => event.id), ids, 'the reader got every id in order')
  t.ok(received.every((event, n) => event.event === 'chunk' && event.data === bigData(n)), 'and every payload intact')
  t.notOk(other.ended, 'the reading stream is still open')

  // Reading again, the dropped client finds the server closed the socket part-way.
  // The server's end of the connection is gone at once, with what was unsent
  // (reset): closed behind those bytes, it stayed in the kernel holding them
  // (megabytes) for as long as the client kept its end open without reading.
  await eventually(() => serverSendQueue(port, raw.socket.localPort ?? 0) === null, 'the server\'s end of the dropped connection to go, unsent bytes and all', 5000)
  raw.resume()
  await raw.waitClose(10_000)
  const got = raw.events().filter((event) => event.event === 'chunk')
  t.ok(got.length < count, `the dropped client got only part of the flood (${got.length} of ${count})`)
  t.same(got.map((event) => event.id), ids.slice(0, got.length), 'what it got is a prefix of the flood, in order')
  const cursor = got.at(-1)?.id ?? markerId

  // A reconnect with its cursor replays exactly the rest (HISTORY_SIZE 1000 holds it all).
  const replay = await openStream(`${url}/v1/stream?token=${userToken('slow')}`, { t, headers: { 'last-event-id': cursor } })
  t.equal(replay.status, 200)
  await replay.nextEvent('connected')
  const missed = ids.slice(got.length)
  const replayed = await replay.take(missed.length, 20_000)
  t.same(replayed.map((event) => event.id), missed, 'every missed id, in order, no duplicate, no gap')
  t.notOk(replayed.some((event) => event.event === 'reset'), 'no reset')
  t.ok(replayed.every((event, n) => event.data === bigData(got.length + n)), 'payloads intact')
  await eventually(async () => metricValue(await scrape(url), 'sse_events_replayed_total') >= missed.length, 'the replayed counter')
  t.equal(metricValue(await scrape(url), 'sse_slow_consumer_drops_total'), 1, 'the replaying stream was paced, not dropped')
})

t.test('a lower MAX_BUFFERED_BYTES (128 KiB) also drops a never-reading client; a reader of the same broadcasts stays', async (t) => {
  const maxBuffered = 128 * 1024
  const [gateway] = await startCluster(t, 'memory', 1, { MAX_BUFFERED_BYTES: String(maxBuffered) })
  const { url, port, app } = gateway
  const { connectionId } = await neverReadingStream(t, url, port, 'slow')
  const { stream: other } = await openConnected(`${url}/v1/stream?token=${userToken('fast')}`, { t })
  const ids = await flood(url, { broadcast: true }, () => app.registry.get(connectionId) === undefined, floodMaxBytes(maxBuffered))
  await eventually(() => app.registry.get(connectionId) === undefined, 'the slow stream to be dropped', 10_000)
  const received = await other.take(ids.length, 20_000)
  t.same(received.map((event) => event.id), ids)
  t.equal(metricValue(await scrape(url), 'sse_slow_consumer_drops_total'), 1)
})

t.test('a user dropped as a slow consumer stays online until RETRY_MS + PRESENCE_GRACE_MS: its contacts hear nothing while its browser waits out the retry', async (t) => {
  const maxBuffered = 128 * 1024
  const [gateway] = await startCluster(t, 'memory', 1, { MAX_BUFFERED_BYTES: String(maxBuffered), PRESENCE_GRACE_MS: '300', RETRY_MS: '60000' })
  const { url, port, app } = gateway
  await setMembers(gateway, 'c1', ['watcher', 'slow', 'quiet'])
  const watcher = await connect(t, gateway, 'watcher')
  const { connectionId } = await neverReadingStream(t, url, port, 'slow')
  const quiet = await connect(t, gateway, 'quiet')
  await flood(url, { users: ['slow'] }, () => app.registry.get(connectionId) === undefined, floodMaxBytes(maxBuffered))
  await eventually(() => app.registry.get(connectionId) === undefined, 'the slow stream to be dropped', 10_000)

  quiet.stream.close()
  // Timers of one length fire in the order they were set: a grace of
  // PRESENCE_GRACE_MS from the drop would have ended before quiet's.
  const offline = await watcher.stream.nextEvent('user:offline', 10_000)
  t.same(dataOf(offline), { userId: 'quiet' }, 'quiet, which its client closed, went offline after PRESENCE_GRACE_MS')
  t.same(await presence(gateway, 'slow'), { userId: 'slow', online: true, connections: 0 }, 'the dropped user is still in its grace')
  t.notOk(watcher.stream.events.some((event) => event.event === 'user:offline' && dataOf(event).userId === 'slow'), 'no user:offline for it')
})

forEachMode(t, 'one event that renders larger than MAX_BUFFERED_BYTES (a string of many short lines) reaches readers that keep up; they stay open', async (t, mode) => {
  const maxBuffered = 64 * 1024
  const [gateway] = await startCluster(t, mode, 1, { MAX_BUFFERED_BYTES: String(maxBuffered) })
  const { url } = gateway
  const readers = await Promise.all(['a', 'b'].map(async (user) => (await openConnected(`${url}/v1/stream?token=${userToken(user)}`, { t })).stream))
  // 60 000 bytes of data, within MAX_EVENT_BYTES; each line gets `data: `, so the frame is ~420 KB.
  const lines = '\n'.repeat(60_000)
  const [big] = await publishOk(url, publisher, { to: { users: ['a', 'b'] }, event: 'lines', data: lines })
  const [after] = await publishOk(url, publisher, { to: { users: ['a', 'b'] }, event: 'after', data: 'x' })
  for (const [index, reader] of readers.entries()) {
    const received = await reader.take(2, 10_000)
    t.same(received.map((event) => event.id), [big, after], `reader ${index} got both events`)
    t.equal(received[0].data, lines, 'the lines intact')
    t.notOk(reader.ended, 'still open')
  }
  t.equal(metricValue(await scrape(url), 'sse_slow_consumer_drops_total'), 0, 'nobody dropped as slow')
})

forEachMode(t, 'one publish that brings a reader more than MAX_BUFFERED_BYTES at once (an array of events; several large events) reaches readers that keep up; they stay open', async (t, mode) => {
  const maxBuffered = 64 * 1024
  const [gateway] = await startCluster(t, mode, 1, { MAX_BUFFERED_BYTES: String(maxBuffered) })
  const { url } = gateway
  const readers = await Promise.all(['a', 'b'].map(async (user) => (await openConnected(`${url}/v1/stream?token=${userToken(user)}`, { t })).stream))
  // 200 events of 1 KB in one array: ~3× the bound, due on each stream before its next write.
  const array = Array.from({ length: 200 }, (_, n) => ({ to: { users: ['a', 'b'] }, event: 'batch', data: `${n}:${'x'.repeat(1000)}` }))
  const ids = await publishOk(url, publisher, array)
  // Three frames of ~420 KB each in one array, each larger than the bound by itself.
  const lines = '\n'.repeat(60_000)
  const large = await publishOk(url, publisher, [0, 1, 2].map(() => ({ to: { users: ['a', 'b'] }, event: 'lines', data: lines })))
  for (const [index, reader] of readers.entries()) {
    const received = await reader.take(ids.length + large.length, 20_000)
    t.same(received.map((event) => event.id), [...ids, ...large], `reader ${index} got every event in order`)
    t.ok(received.slice(0, ids.length).every((event, n) => event.data === array[n].data), 'the batch intact')
    t.ok(received.slice(ids.length).every((event) => event.data === lines), 'the lines intact')
    t.notOk(reader.ended, 'still open')
  }
  t.equal(metricValue(await scrape(url), 'sse_slow_consumer_drops_total'), 0, 'nobody dropped as slow')
})

/** The resident set of a process (or its peak so far, VmHWM), in bytes. */
function rssOf (pid: number, field: 'VmRSS' | 'VmHWM' = 'VmRSS'): number {
  const match = new RegExp(`^${field}:\\s+(\\d+)\\s+kB$`, 'm').exec(readFileSync(`/proc/${pid}/status`, 'utf8'))
  if (match === null) throw new Error(`no ${field} for ${pid}`)
  return Number(match[1]) * 1024
}

t.test('the gateway process (a child) drops a never-reading client and its RSS returns near its earlier level', {
  skip: process.platform !== 'linux' ? 'reads /proc' : false
}, async (t) => {
  const server = await spawnServer(t, { JWT_SECRET: TEST_SECRET, HOST: '127.0.0.1', LOG_LEVEL: 'silent', HISTORY_SIZE: '16' })
  const pid = server.child.pid
  if (pid === undefined) throw new Error('no child pid')
  // Warm up every path the measured part uses, so the baseline is not the cold process.
  for (let round = 0; round < 3; round++) {
    const { stream } = await openConnected(`${server.url}/v1/stream?token=${userToken('warm')}`, { t })
    await publishOk(server.url, publisher, Array.from({ length: PER_REQUEST }, (_, n) => ({ to: { user: 'warm' }, data: bigData(n) })))
    await stream.take(PER_REQUEST, 10_000)
    stream.close()
  }
  await scrape(server.url)
  const before = rssOf(pid)

  const { raw } = await neverReadingStream(t, server.url, server.port, 'slow')
  const { stream: other } = await openConnected(`${server.url}/v1/stream?token=${userToken('fast')}`, { t })
  const dropped = async (): Promise<boolean> => metricValue(await scrape(server.url), 'sse_slow_consumer_drops_total') === 1
  const ids = await flood(server.url, { users: ['slow', 'fast'] }, dropped, floodMaxBytes(1024 * 1024))
  await eventually(dropped, 'the child to drop the slow consumer', 10_000)
  const received = await other.take(ids.length, 20_000)
  t.same(received.map((event) => event.id), ids, 'the other stream got every event in order')
  raw.resume()
  await raw.waitClose(10_000)
  t.pass('the child closed the slow socket')

  // Generous: the point is that nothing of the flood stays held for the dead reader.
  const bound = before + 48 * 1024 * 1024
  let after = rssOf(pid)
  await eventually(() => {
    after = rssOf(pid)
    return after <= bound
  }, 'the RSS to come back near its earlier level', 15_000, 250).catch(() => {})
  t.ok(after <= bound, `RSS ${(after / 1048576).toFixed(1)} MiB, at most ${(bound / 1048576).toFixed(1)} MiB (before: ${(before / 1048576).toFixed(1)} MiB, flood ${((ids.length * EVENT_BYTES) / 1048576).toFixed(1)} MiB)`)
})

t.test('a burst to many clients that stopped reading: each is dropped, and none gets a copy of the burst of its own (the process\'s peak RSS stays near the burst\'s size, not a multiple of it)', {
  skip: process.platform !== 'linux' ? 'reads /proc' : false
}, async (t) => {
  const server = await spawnServer(t, { JWT_SECRET: TEST_SECRET, HOST: '127.0.0.1', LOG_LEVEL: 'silent', MAX_CONNECTIONS_PER_USER: '1000', HISTORY_SIZE: '16' })
  const pid = server.child.pid
  if (pid === undefined) throw new Error('no child pid')
  const stalled = 300
  for (let n = 0; n < stalled; n++) {
    const raw = await rawConnect(t, server.port)
    raw.write(getRequest(`/v1/stream?token=${userToken('stalled')}`, server.port))
    await raw.until(() => raw.events().some((event) => event.event === 'connected'), 5000, 'connected')
    raw.pause()
  }
  const peakBefore = rssOf(pid, 'VmHWM')
  // 16 arrays of 4 events of 240 KB at once: 15 MB, too large for any one
  // stream, in pieces that lie in separate buffers.
  const burst = Array.from({ length: 4 }, (_, n) => ({ to: { user: 'stalled' }, event: 'big', data: String(n).repeat(240_000) }))
  // The child writes the burst to 300 sockets (~1 GB into the kernel's socket
  // buffers before the drops) in the turns that also answer these publishes:
  // on a loaded machine the last 202 comes well past the usual 15 s.
  await Promise.all(Array.from({ length: 16 }, async () => await publishOk(server.url, publisher, burst, { timeoutMs: 60_000 })))
  await eventually(async () => metricValue(await scrape(server.url), 'sse_slow_consumer_drops_total') === stalled, 'every stalled stream dropped', 30_000, 100)
  const growth = rssOf(pid, 'VmHWM') - peakBefore
  // A copy of its due bytes per stream came to ~1 GB here; shared, ~60 MB.
  t.ok(growth < 200 * 1024 * 1024, `peak RSS grew ${(growth / 1048576).toFixed(0)} MiB`)
})

forEachMode(t, 'a reader catching up on a backlog longer than the socket buffers is not dropped for the live events that arrive meanwhile: they are read back from history, and it gets everything in order', async (t, mode) => {
  const maxBuffered = 64 * 1024
  const [gateway] = await startCluster(t, mode, 1, { MAX_BUFFERED_BYTES: String(maxBuffered), KEEPALIVE_MS: '60000' })
  const { url, port } = gateway
  const [cursor] = await publishOk(url, publisher, { to: { user: 'behind' }, event: 'marker', data: 'the cursor' })
  // Twice what the kernel absorbs on loopback: its replay is still being
  // paced, well short of its end, when the live events come.
  const backlog = await flood(url, { user: 'behind' }, () => false, 2 * floodMaxBytes(maxBuffered))
  const raw = await rawConnect(t, port)
  let tail = ''
  // Ahead of the client's own listener, which wakes the wait below.
  raw.socket.prependListener('data', (chunk: Buffer) => { tail = (tail + chunk.toString('latin1')).slice(-4 * EVENT_BYTES) })
  raw.write(getRequest(`/v1/stream?token=${userToken('behind')}`, port, { 'Last-Event-ID': cursor }))
  await raw.until(() => raw.bytes > 4 * EVENT_BYTES, 10_000, 'the replay to begin')
  raw.pause()
  // Ten times the bound of live events while the replay waits on the reader.
  const live: string[] = []
  for (let n = 0; n < 40; n += PER_REQUEST) {
    const items = Array.from({ length: PER_REQUEST }, (_, offset) => ({ to: { user: 'behind' }, event: 'chunk', data: bigData(backlog.length + n + offset) }))
    live.push(...await publishOk(url, publisher, items))
  }
  raw.resume()
  const last = live[live.length - 1]
  // The last id line seen (cheap to check per read), then the events parsed whole.
  await raw.until(() => tail.includes(`id: ${last}\n`) || raw.closed, 30_000, 'the last live event, or the close')
  const chunkCount = (): number => raw.events().filter((event) => event.event === 'chunk').length
  await raw.until(() => raw.closed || chunkCount() >= backlog.length + live.length, 10_000, 'the last live event whole')
  t.notOk(raw.closed, 'the stream is still open')
  const events = raw.events()
  t.notOk(events.some((event) => event.event === 'reset'), 'no reset')
  const chunks = events.filter((event) => event.event === 'chunk')
  t.same(chunks.map((event) => event.id), [...backlog, ...live], `every backlog and live id, in order, once (${backlog.length} + ${live.length})`)
  t.ok(chunks.every((event, n) => event.data === bigData(n)), 'payloads intact')
  t.equal(metricValue(await scrape(url), 'sse_slow_consumer_drops_total'), 0, 'no stream was dropped as slow')
})
