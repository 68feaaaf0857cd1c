/**
 * A stream quiet for half the history window is sent an `id:` line alone,
 * which moves the client's cursor without an event, so that its reconnect
 * (after a drain, a network change) is not refused as `expired` when nothing
 * was missed. HISTORY_TTL_S=2: moved after 1 s of quiet, checked every second.
 */
import t from 'tap'
import type { SseClient } from './helpers/sse'
import { renderBody } from '../src/core/framing'
import { metricValue, scrape } from './helpers/raw'
import { join } from 'node:path'
import { eventually, forEachMode, openConnected, publishOk, publisherToken, spawnServer, startCluster, TEST_SECRET, userToken } from './helpers'
import { needRedis, REDIS_URL, uniquePrefix } from './helpers/redis'

// Its tests wait for events to grow old on the clock: about 80 s in all,
// two thirds of the suite's per-file 120 s, whatever the machine's load.
t.setTimeout(240_000)

const publisher = publisherToken()
const ENV = { HISTORY_TTL_S: '2', KEEPALIVE_MS: '60000' }
const WINDOW_US = 2_000_000

/** Waits until the client's cursor is past `id` (microseconds), moved by `id:` lines alone. */
async function cursorPast (stream: SseClient, id: number, what: string): Promise<number> {
  await stream.until(() => stream.lastEventId !== '' && Number(stream.lastEventId) > id, 10_000, what)
  return Number(stream.lastEventId)
}

forEachMode(t, 'a quiet stream\'s cursor is moved inside the window without an event; its reconnect then replays, where the last event\'s id gets reset', async (t, mode) => {
  const [gateway, other] = await startCluster(t, mode, mode === 'redis' ? 2 : 1, ENV)
  const { url } = gateway
  const streamUrl = `${url}/v1/stream?token=${userToken('quiet-u1')}`
  const { stream } = await openConnected(streamUrl, { t })
  const [first] = await publishOk(url, publisher, { to: { user: 'quiet-u1' }, event: 'first', data: 1 })
  t.equal((await stream.nextEvent('first')).id, first)

  // Past the window of the last event's id: that cursor now gets reset.
  const moved = await cursorPast(stream, Number(first) + WINDOW_US, 'the cursor to be moved past the first event\'s window')
  t.same(stream.events.map((event) => event.event), ['connected', 'first'], 'no event was dispatched for it')
  t.ok(stream.events.length === 2 && stream.comments.length === 0, 'and no comment either')
  stream.close()

  // Published while the client is away (to the other instance in Redis mode).
  const [missed] = await publishOk((other ?? gateway).url, publisher, { to: { user: 'quiet-u1' }, event: 'missed', data: 2 })
  t.ok(Number(missed) > moved, 'an event published later has a higher id than the moved cursor')

  const resumed = await openConnected(streamUrl, { t, headers: { 'last-event-id': String(moved) } })
  const replayed = await resumed.stream.nextEvent('missed')
  t.equal(replayed.id, missed, 'the moved cursor replays what was missed')
  t.same(resumed.stream.events.map((event) => event.event), ['connected', 'missed'], 'with no reset')

  const stale = await openConnected(streamUrl, { t, headers: { 'last-event-id': first } })
  const reset = await stale.stream.nextEvent('reset')
  t.match(JSON.parse(reset.data), { reason: 'expired' }, 'the last event\'s own id, out of the window: reset (expired)')
})

forEachMode(t, 'a stream that never had an event gets a cursor too, so its reconnect gets what was published meanwhile', async (t, mode) => {
  const [gateway] = await startCluster(t, mode, 1, ENV)
  const streamUrl = `${gateway.url}/v1/stream?token=${userToken('quiet-u2')}&topics=quiet-news`
  const { stream } = await openConnected(streamUrl, { t })
  const moved = await cursorPast(stream, 0, 'a cursor')
  t.same(stream.events.map((event) => event.event), ['connected'], 'no event was dispatched for it')
  t.ok(metricValue(await scrape(gateway.url), 'sse_cursors_moved_total') >= 1, 'counted in sse_cursors_moved_total')
  stream.close()
  const [missed] = await publishOk(gateway.url, publisher, { to: { topic: 'quiet-news' }, event: 'news', data: 'meanwhile' })
  t.ok(Number(missed) > moved)
  const resumed = await openConnected(streamUrl, { t, headers: { 'last-event-id': String(moved) } })
  t.equal((await resumed.stream.nextEvent('news')).id, missed, 'replayed from the cursor')
})

forEachMode(t, 'a moved cursor is never ahead of an event the stream still gets: ids stay increasing while events flow beside the moves', async (t, mode) => {
  const [gateway] = await startCluster(t, mode, 1, ENV)
  const { stream } = await openConnected(`${gateway.url}/v1/stream?token=${userToken('quiet-u3')}`, { t })
  // Its cursor moves once it is quiet; then events go on, one per move at least.
  let cursor = await cursorPast(stream, 0, 'the first move')
  const seen: number[] = [cursor]
  for (let round = 0; round < 3; round++) {
    const [id] = await publishOk(gateway.url, publisher, { to: { user: 'quiet-u3' }, event: 'tick', data: round })
    t.equal((await stream.nextEvent('tick')).id, id)
    t.ok(Number(id) > cursor, `event ${round} comes after the cursor it was moved to`)
    cursor = await cursorPast(stream, Number(id), `the move after event ${round}`)
    seen.push(Number(id), cursor)
  }
  t.same(seen, [...seen].sort((a, b) => a - b), 'every id the client read, event or move, is above the one before')
})

forEachMode(t, 'a watermark is issued only once every event with a lower id has reached the streams of this process', async (t, mode) => {
  const [gateway, other] = await startCluster(t, mode, mode === 'redis' ? 2 : 1)
  const { app } = gateway
  const { connected } = await openConnected(`${gateway.url}/v1/stream?token=${userToken('quiet-u4')}`, { t })
  const connection = app.registry.get(connected.connectionId)
  if (connection === undefined) throw new Error('the stream is not registered')
  const body = renderBody('burst', JSON.stringify({ pad: 'x'.repeat(1000) }))
  const items = Array.from({ length: 300 }, () => ({ channels: ['u:quiet-u4'], body }))
  // Straight to a bus, not awaited: in embedded mode the fan-out waits for
  // the next turn; in Redis mode the events come to this instance over its
  // subscriber while the watermark's answer comes over another connection.
  const publisher = mode === 'redis' ? other.app.bus : app.bus
  for (let round = 0; round < 20; round++) {
    const publishing = publisher.publish(items)
    const mark = await app.bus.watermark()
    if (mark === null) throw new Error('no watermark')
    const ids = await publishing
    const below = ids.filter((id) => id < mark)
    t.ok(ids.every((id) => id !== mark), `round ${round}: no event has the watermark's id`)
    t.ok(connection.lastId >= (below[below.length - 1] ?? 0), `round ${round}: every event below the watermark (${below.length} of ${ids.length}) had been handed to the stream`)
  }
})

t.test('a stream replayed from an old cursor is moved as soon as its last event is old, not once the stream itself is', async (t) => {
  // Moved after 10 s of quiet, checked every 2.5 s.
  const [gateway] = await startCluster(t, 'memory', 1, { HISTORY_TTL_S: '20', KEEPALIVE_MS: '60000' })
  const streamUrl = `${gateway.url}/v1/stream?token=${userToken('quiet-u5')}`
  const { stream: before } = await openConnected(streamUrl, { t })
  const [old] = await publishOk(gateway.url, publisher, { to: { user: 'quiet-u5' }, event: 'old', data: 1 })
  await before.nextEvent('old')
  before.close()
  await eventually(() => Date.now() * 1000 > Number(old) + 11_000_000, 'the event to be 11 s old', 15_000, 100)

  // Taken before the open: the time since is never less than the stream's own age.
  const openedAt = Date.now()
  const { stream } = await openConnected(streamUrl, { t, headers: { 'last-event-id': String(Number(old) - 1) } })
  t.equal((await stream.nextEvent('old')).id, old, 'replayed')
  // A stream's own age reaches the 10 s only after 10 s: a move before then is the last event's age.
  await cursorPast(stream, Number(old), 'the cursor to be moved')
  t.ok(Date.now() - openedAt < 10_000, `moved ${Date.now() - openedAt} ms after the open, before the stream was 10 s old`)
})

forEachMode(t, 'a gateway whose clock runs 5 s behind moves a quiet cursor by the bus\'s clock, inside the window', async (t, mode) => {
  // Ids follow the bus's clock (the Redis server's, or the monotonic one), not Date.now(), which a drifted host's is.
  const env: Record<string, string> = {
    JWT_SECRET: TEST_SECRET,
    HOST: '127.0.0.1',
    LOG_LEVEL: 'warn',
    HISTORY_TTL_S: '8',
    KEEPALIVE_MS: '60000',
    NODE_OPTIONS: `--require ${join(__dirname, 'helpers', 'clock-skew.js')}`,
    CLOCK_SKEW_MS: '-5000',
    ...(mode === 'redis' ? { REDIS_URL, REDIS_PREFIX: uniquePrefix('quietskew') } : {})
  }
  const gateway = await spawnServer(t, env)
  const { stream } = await openConnected(`${gateway.url}/v1/stream?token=${userToken('quiet-u6')}`, { t })
  const [first] = await publishOk(gateway.url, publisher, { to: { user: 'quiet-u6' }, event: 'first', data: 1 })
  await stream.nextEvent('first')
  const moved = await cursorPast(stream, Number(first), 'the cursor to be moved')
  t.ok(moved - Number(first) < 8_000_000, `moved ${((moved - Number(first)) / 1e6).toFixed(1)} s of the bus's clock after the event, inside the 8 s window`)
})

forEachMode(t, 'a stream sent reset has its cursor moved at once, so the next reconnect is not reset again for the same cursor', async (t, mode) => {
  // The default window: checks every minute, so only the reset can bring the move within this test.
  const [gateway] = await startCluster(t, mode, 1)
  const streamUrl = `${gateway.url}/v1/stream?token=${userToken('quiet-u7')}`
  const future = String(Date.now() * 1000 + 3_600_000_000)
  const { stream } = await openConnected(streamUrl, { t, headers: { 'last-event-id': future } })
  t.match(JSON.parse((await stream.nextEvent('reset')).data), { reason: 'future' })
  const moved = await cursorPast(stream, 0, 'the cursor to be moved after the reset')
  t.ok(moved < Number(future), 'to an id issued now, below the refused cursor')
  stream.close()
  const [missed] = await publishOk(gateway.url, publisher, { to: { user: 'quiet-u7' }, event: 'missed', data: 1 })
  const again = await openConnected(streamUrl, { t, headers: { 'last-event-id': String(moved) } })
  t.equal((await again.stream.nextEvent('missed')).id, missed, 'the reconnect replays')
  t.same(again.stream.events.map((event) => event.event), ['connected', 'missed'], 'no second reset')
})

t.test('a stream with no event gets a cursor once it has been open for a check, not only after half the window', async (t) => {
  // Checked every 5 s; half the window is 20 s.
  const [gateway] = await startCluster(t, 'memory', 1, { HISTORY_TTL_S: '40', KEEPALIVE_MS: '60000' })
  const { stream } = await openConnected(`${gateway.url}/v1/stream?token=${userToken('quiet-u8')}`, { t })
  await stream.until(() => stream.lastEventId !== '', 15_000, 'a cursor within two checks (20 s would be the half window)')
  t.same(stream.events.map((event) => event.event), ['connected'], 'and no event')
})

t.test('a drain gives a stream that has had no event a cursor before `shutdown`, so its reconnect elsewhere replays what was published meanwhile', async (t) => {
  // The default window: no check comes within this test, only the drain gives the cursor.
  if (!(await needRedis(t))) return
  const [leaving, staying] = await startCluster(t, 'redis', 2)
  const { stream: young } = await openConnected(`${leaving.url}/v1/stream?token=${userToken('quiet-u9')}`, { t })
  const { stream: served } = await openConnected(`${leaving.url}/v1/stream?token=${userToken('quiet-u10')}`, { t })
  const [served1] = await publishOk(staying.url, publisher, { to: { user: 'quiet-u10' }, event: 'served', data: 1 })
  t.equal((await served.nextEvent('served')).id, served1)
  t.equal(young.lastEventId, '', 'no cursor before the drain')

  const closing = leaving.app.close()
  await young.nextEvent('shutdown', 10_000)
  await served.nextEvent('shutdown', 10_000)
  await closing
  const cursor = young.lastEventId
  t.match(cursor, /^[1-9][0-9]*$/, `the stream without an event got a cursor before shutdown (${cursor})`)
  t.same(young.events.map((event) => event.event), ['connected', 'shutdown'], 'and no event for it')
  t.equal(served.lastEventId, served1, 'one that had an event keeps that event\'s id')

  // Published while the client is away, then its reconnect lands on the other instance.
  const [missed] = await publishOk(staying.url, publisher, { to: { user: 'quiet-u9' }, event: 'missed', data: 2 })
  const resumed = await openConnected(`${staying.url}/v1/stream?token=${userToken('quiet-u9')}`, { t, headers: { 'last-event-id': cursor } })
  t.equal((await resumed.stream.nextEvent('missed')).id, missed, 'the reconnect replays what was published meanwhile')
  t.same(resumed.stream.events.map((event) => event.event), ['connected', 'missed'], 'with no reset, nothing older')
})

t.test('the cursor a drain gives is inside the window even when nothing was published for longer than it', async (t) => {
  if (!(await needRedis(t))) return
  const [leaving, staying] = await startCluster(t, 'redis', 2, ENV)
  // The last id issued before the stream opens is older than the 2 s window.
  const [old] = await publishOk(staying.url, publisher, { to: { user: 'quiet-u11-other' }, event: 'old', data: 0 })
  await eventually(() => Date.now() * 1000 > Number(old) + 3_000_000, 'the last event to be 3 s old', 10_000, 100)
  const { stream } = await openConnected(`${leaving.url}/v1/stream?token=${userToken('quiet-u11')}`, { t })
  const closing = leaving.app.close()
  await stream.nextEvent('shutdown', 10_000)
  await closing
  t.ok(Number(stream.lastEventId) > Number(old) + 3_000_000, 'a cursor issued at the drain, not the last id issued before the stream opened')
  const [missed] = await publishOk(staying.url, publisher, { to: { user: 'quiet-u11' }, event: 'missed', data: 1 })
  const resumed = await openConnected(`${staying.url}/v1/stream?token=${userToken('quiet-u11')}`, { t, headers: { 'last-event-id': stream.lastEventId } })
  t.equal((await resumed.stream.nextEvent('missed')).id, missed, 'the reconnect replays what was published meanwhile')
  t.same(resumed.stream.events.map((event) => event.event), ['connected', 'missed'], 'with no reset')
})
