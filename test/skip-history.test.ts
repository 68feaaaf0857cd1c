import t from 'tap'
import type { Test } from 'tap'
import { forEachMode, openConnected, openStream, publish as post, publishOk, publisherToken, startCluster, userToken, type SseClient } from './helpers'
import { redisClient } from './helpers/redis'
import { flood, FLOOD_EVENT_BYTES, floodMaxBytes, getRequest, rawConnect } from './helpers/raw'

// `skipHistory: true` (a typing indicator, a cursor position): the event is
// delivered live with an id like any other, but no reconnect replays it,
// it takes no place in a channel's window, and a cursor below it is not
// told of a gap. Both engines alike, and across instances in Redis mode.

const publisher = publisherToken()
const streamUrl = (url: string, user: string): string => `${url}/v1/stream?token=${userToken(user)}`

async function publish (url: string, user: string, data: string, skipHistory?: boolean): Promise<string> {
  const [id] = await publishOk(url, publisher, { to: { user }, event: skipHistory === true ? 'typing' : 'msg', data, ...(skipHistory === undefined ? {} : { skipHistory }) })
  return id
}

/** Reconnects `user` with `cursor`; the events after `connected` before a live marker published then (earlier markers left out). */
async function replayed (t: Test, url: string, user: string, cursor: string): Promise<Array<{ event: string, id: string | undefined, data: string }>> {
  const stream: SseClient = await openStream(streamUrl(url, user), { headers: { 'last-event-id': cursor }, t })
  t.equal(stream.status, 200)
  const [first] = await stream.take(1)
  t.equal(first.event, 'connected')
  const marker = await publish(url, user, 'marker')
  await stream.next((event) => event.id === marker, 5000, 'the live marker')
  stream.close()
  return stream.events.slice(1).filter((event) => event.data !== 'marker').map(({ event, id, data }) => ({ event, id, data }))
}

forEachMode(t, 'a skipHistory event is delivered live with its id, and a reconnect replays only the others, with no reset', async (t, mode) => {
  const [a, b] = await startCluster(t, mode, mode === 'redis' ? 2 : 1)
  const other = b ?? a
  const { stream } = await openConnected(streamUrl(a.url, 'u1'), { t })
  const before = await publish(a.url, 'u1', 'before')
  const typing = await publish(other.url, 'u1', 'typing...', true)
  const after = await publish(a.url, 'u1', 'after')
  const live = await stream.take(3)
  t.same(live.map((event) => [event.event, event.id, event.data]), [['msg', before, 'before'], ['typing', typing, 'typing...'], ['msg', after, 'after']], 'all three live, in id order')
  t.ok(BigInt(before) < BigInt(typing) && BigInt(typing) < BigInt(after), 'its id is among the others')

  // Reconnected on the other instance: from before it, the stored event only.
  const fromBefore = await replayed(t, other.url, 'u1', before)
  t.same(fromBefore, [{ event: 'msg', id: after, data: 'after' }], 'not replayed; no reset')
  // Its own id is a cursor like any other.
  const fromTyping = await replayed(t, other.url, 'u1', typing)
  t.same(fromTyping, [{ event: 'msg', id: after, data: 'after' }], 'a cursor at it replays what followed; no reset')
})

forEachMode(t, 'skipHistory events take no place in the window: HISTORY_SIZE of them do not push a message out', async (t, mode) => {
  const [{ url }] = await startCluster(t, mode, 1, { HISTORY_SIZE: '2' })
  const start = await publish(url, 'u2', 'start')
  const message = await publish(url, 'u2', 'message')
  for (let index = 0; index < 5; index++) await publish(url, 'u2', `typing ${index}`, true)
  const events = await replayed(t, url, 'u2', start)
  t.same(events, [{ event: 'msg', id: message, data: 'message' }], 'the message replayed, no reset, no typing')
})

forEachMode(t, 'with HISTORY_SIZE=0 a skipHistory event marks no gap: a cursor below it gets no reset', async (t, mode) => {
  const [{ url }] = await startCluster(t, mode, 1, { HISTORY_SIZE: '0' })
  const seen = await publish(url, 'u3', 'seen')
  await publish(url, 'u3', 'typing', true)
  const events = await replayed(t, url, 'u3', seen)
  t.same(events, [], 'no reset')
})

t.test('skipHistory must be a boolean; false stores the event as usual', async (t) => {
  const [{ url }] = await startCluster(t, 'memory')
  for (const skipHistory of ['yes', 1, null]) {
    const answer = await post(url, publisher, { to: { user: 'u4' }, data: 'x', skipHistory })
    t.equal(answer.status, 400, `${JSON.stringify(skipHistory)}: 400`)
    t.match(answer.json, { statusCode: 400, message: /"skipHistory" must be true or false/ })
  }
  const batch = await post(url, publisher, [{ to: { user: 'u4' }, data: 'x' }, { to: { user: 'u4' }, data: 'x', skipHistory: 'no' }])
  t.equal(batch.status, 400)
  t.match(batch.json, { message: /^item 1: / })
  const start = await publish(url, 'u4', 'start')
  const kept = await publish(url, 'u4', 'kept', false)
  const events = await replayed(t, url, 'u4', start)
  t.same(events, [{ event: 'msg', id: kept, data: 'kept' }], 'skipHistory: false is replayed')
})

forEachMode(t, 'over Redis ingress too: <prefix>publish and stream:<id> take skipHistory', async (t, mode) => {
  const prefix = `skiphist${process.pid}${Date.now()}:`
  const [{ url }] = await startCluster(t, mode, 1, { REDIS_PREFIX: prefix })
  const redis = redisClient(t)
  const { stream, connected } = await openConnected(streamUrl(url, 'u5'), { t })
  const start = await publish(url, 'u5', 'start')
  await stream.next((event) => event.id === start)
  await redis.publish(`${prefix}publish`, JSON.stringify({ to: { user: 'u5' }, event: 'typing', data: 'a', skipHistory: true }))
  await redis.publish(`stream:${connected.connectionId}`, JSON.stringify({ event: 'typing', data: 'b', skipHistory: true }))
  const [first, second] = await stream.take(2)
  t.same([first.data, second.data], ['a', 'b'], 'both delivered live')
  const events = await replayed(t, url, 'u5', start)
  t.same(events, [], 'neither replayed')
  await redis.del(...await redis.keys(`${prefix}*`))
}, ['redis'])

forEachMode(t, 'a skipHistory event published while a reconnect is still replaying a backlog longer than the socket buffers is delivered in its place, not taken for a duplicate', async (t, mode) => {
  const maxBuffered = 64 * 1024
  const [{ url, port }] = await startCluster(t, mode, 1, { MAX_BUFFERED_BYTES: String(maxBuffered), KEEPALIVE_MS: '60000' })
  const [cursor] = await publishOk(url, publisher, { to: { user: 'behind' }, event: 'marker', data: 'the cursor' })
  const backlog = await flood(url, { user: 'behind' }, () => false, 2 * floodMaxBytes(maxBuffered))
  const raw = await rawConnect(t, port)
  raw.write(getRequest(`/v1/stream?token=${userToken('behind')}`, port, { 'Last-Event-ID': cursor }))
  await raw.until(() => raw.bytes > 4 * FLOOD_EVENT_BYTES, 10_000, 'the replay to begin')
  raw.pause()
  // While the replay waits on the reader: a typing event, then a stored one after it.
  const [typing] = await publishOk(url, publisher, { to: { user: 'behind' }, event: 'typing', data: 't', skipHistory: true })
  const [after] = await publishOk(url, publisher, { to: { user: 'behind' }, event: 'after', data: 'a' })
  raw.resume()
  await raw.until(() => raw.closed || raw.events().some((event) => event.id === after), 30_000, 'the last event')
  const events = raw.events().filter((event) => event.id !== undefined)
  t.same(events.slice(-2).map((event) => [event.event, event.id]), [['typing', typing], ['after', after]], 'the typing event in its place, before the one after it')
  t.equal(events.length, backlog.length + 2, 'the whole backlog too, each once')
})
