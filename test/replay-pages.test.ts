/**
 * A long history is read in pages: a stream is written one page at a time,
 * so a slow reader holds one page (not events the history let go since), and
 * in Redis mode a script holds every other client of Redis up while it runs.
 * The pages must add up to the whole history, once each and in id order,
 * however the events fall on the channels.
 */
import t from 'tap'
import { channel } from '../src/core/channels'
import { openConnected, publisherToken, publishOk, request, userToken, type Gateway } from './helpers'
import { forEachMode, startCluster } from './helpers/modes'

const publisher = publisherToken()

/** Every page the bus gives from `after` on, with how many there were. */
async function pagesFrom (gateway: Gateway, channels: string[], after: number): Promise<{ ids: number[], pages: number }> {
  const ids: number[] = []
  let pages = 0
  for (;;) {
    const page = await gateway.app.bus.replay(channels, after)
    if (page.reset !== null) throw new Error(`page ${pages + 1} is a reset (${page.reset})`)
    pages++
    ids.push(...page.events.map((event) => event.id))
    if (page.more !== true) return { ids, pages }
    if (page.events.length === 0 || pages > 1000) throw new Error('a page said more, yet gave nothing')
    after = page.events[page.events.length - 1].id
  }
}

forEachMode(t, 'events spread unevenly over 100 topics, more on each than a page takes from one: every one once, in order, over several pages', async (t, mode) => {
  const [gateway] = await startCluster(t, mode, 1, { HISTORY_SIZE: '5000', MAX_BODY_BYTES: '4194304' })
  const topics = Array.from({ length: 100 }, (_, n) => `pages-${n}`)
  const [cursor] = await publishOk(gateway.url, publisher, { to: { topic: topics[0] }, event: 'before', data: 0 })
  const published: number[] = []
  // With 100 channels a Redis page takes 20 ids from each. Topics publish at five
  // rates (every batch to every fifth), so a busy topic's 20 end long before
  // a quiet one's: a page reaching past the first would skip the busy
  // topic's later events.
  for (let batch = 0; batch < 100; batch++) {
    const events = topics
      .map((topic, n) => ({ to: { topic }, event: 'spread', data: { n: batch * 100 + n } }))
      .filter((_event, n) => batch % (1 + n % 5) === 0)
    // Shuffled, so that no topic's ids come in one run.
    events.sort((a, b) => ((a.data.n * 7919) % 101) - ((b.data.n * 7919) % 101))
    published.push(...(await publishOk(gateway.url, publisher, events)).map(Number))
  }
  const { ids, pages } = await pagesFrom(gateway, topics.map(channel.topic), Number(cursor))
  t.ok(pages > 1, `read in several pages (${pages})`)
  t.same(ids, published, 'the pages hold every event after the cursor once, in id order')

  const topicsQuery = topics.map(encodeURIComponent).join(',')
  const { stream } = await openConnected(`${gateway.url}/v1/stream?token=${userToken('u-pages')}&topics=${topicsQuery}&lastEventId=${cursor}`, { t })
  const received = await stream.take(published.length, 20_000)
  t.same(received.map((event) => Number(event.id)), published, 'a stream reconnecting with the cursor gets them all, in order')
  t.notOk(stream.events.some((event) => event.event === 'reset'), 'and no reset')
})

forEachMode(t, 'events larger than a page\'s bytes: a page each, every one once, in order', async (t, mode) => {
  const [gateway] = await startCluster(t, mode, 1, { HISTORY_SIZE: '5000', MAX_BODY_BYTES: '4194304' })
  const [cursor] = await publishOk(gateway.url, publisher, { to: { user: 'u-large' }, event: 'before', data: 0 })
  const published: number[] = []
  const large = 'x'.repeat(200 * 1024)
  for (let n = 0; n < 12; n++) {
    published.push(...(await publishOk(gateway.url, publisher, { to: { user: 'u-large' }, event: 'large', data: { n, large } })).map(Number))
  }
  const { ids, pages } = await pagesFrom(gateway, [channel.user('u-large')], Number(cursor))
  t.ok(pages >= 6, `at most two 200 KB events per page (${pages} pages)`)
  t.same(ids, published, 'every event once, in id order')

  const { stream } = await openConnected(`${gateway.url}/v1/stream?token=${userToken('u-large')}&lastEventId=${cursor}`, { t })
  const received = await stream.take(published.length, 20_000)
  t.same(received.map((event) => Number(event.id)), published, 'a stream reconnecting with the cursor gets them all, in order')
  t.same(received.map((event) => (JSON.parse(event.data) as { n: number }).n), published.map((_, n) => n), 'whole')
})

forEachMode(t, 'a history trimmed while a stream reads its earlier pages: the stream hears reset, then goes live', async (t, mode) => {
  const [gateway] = await startCluster(t, mode, 1, { HISTORY_SIZE: '40' })
  const [cursor] = await publishOk(gateway.url, publisher, { to: { user: 'u-trim' }, event: 'before', data: 0 })
  const large = 'y'.repeat(100 * 1024)
  // 30 events of 100 KB: the first page holds 3 of them.
  for (let n = 0; n < 30; n++) await publishOk(gateway.url, publisher, { to: { user: 'u-trim' }, event: 'old', data: { n, large } })
  const first = await gateway.app.bus.replay([channel.user('u-trim')], Number(cursor))
  t.ok(first.reset === null && first.more === true, 'the first page is not the whole history')
  // 40 more push the rest of those 30 out of the history of 40.
  for (let n = 0; n < 40; n++) await publishOk(gateway.url, publisher, { to: { user: 'u-trim' }, event: 'new', data: { n } })
  const next = await gateway.app.bus.replay([channel.user('u-trim')], first.events[first.events.length - 1].id)
  t.same(next, { reset: 'trimmed', events: [] }, 'the next page finds its cursor trimmed')
})

forEachMode(t, 'topics a stream joins while its replay is still being written (a client reading slowly): what they publish from then on arrives, in id order, with nothing dropped as sent; what they had before does not, nor resets the replay, nor what one left publishes', async (t, mode) => {
  const [gateway] = await startCluster(t, mode, 1, { HISTORY_SIZE: '50', HISTORY_TTL_S: '120' })
  const user = 'u-join'
  const token = userToken(user)
  const [cursor] = await publishOk(gateway.url, publisher, { to: { user }, event: 'before', data: 0 })
  const published: number[] = []
  // 10 MB of history, one event a page: more than the sockets buffer while the client does not read.
  const large = 'z'.repeat(250 * 1024)
  for (let n = 0; n < 40; n++) published.push(...(await publishOk(gateway.url, publisher, { to: { user }, event: 'old', data: { n, large } })).map(Number))
  // The topics were busy before: 60 events each, their histories (of 50) trimmed past the cursor.
  for (let n = 0; n < 60; n++) await publishOk(gateway.url, publisher, [{ to: { topic: 'joined-wide' }, event: 'earlier', data: n }, { to: { topic: 'joined-here' }, event: 'earlier', data: n }])
  const { stream, connected } = await openConnected(`${gateway.url}/v1/stream?token=${token}&lastEventId=${cursor}`, { t })
  stream.pause()

  const subscribe = async (method: 'POST' | 'DELETE', body: Record<string, unknown>): Promise<number> =>
    (await request(`${gateway.url}/v1/subscriptions`, { method, token, body })).status
  t.equal(await subscribe('POST', { topics: ['joined-wide'] }), 200, 'a user-wide subscription answered')
  // After that join, before its own: not the stream's.
  for (let n = 0; n < 3; n++) await publishOk(gateway.url, publisher, { to: { topic: 'joined-here' }, event: 'earlier', data: n })
  t.equal(await subscribe('POST', { topics: ['joined-here'], connectionId: connected.connectionId }), 200, 'a per-stream one answered')
  // Joined, then left: what it publishes after the leave is not the stream's either.
  t.equal(await subscribe('POST', { topics: ['left-soon'], connectionId: connected.connectionId }), 200, 'another joined')
  t.equal(await subscribe('DELETE', { topics: ['left-soon'], connectionId: connected.connectionId }), 200, 'and left')
  await publishOk(gateway.url, publisher, { to: { topic: 'left-soon' }, event: 'after-leave', data: 0 })
  // Published after the answers, so the stream is subscribed; then one on an old channel, with a higher id.
  published.push(...(await publishOk(gateway.url, publisher, { to: { topic: 'joined-wide' }, event: 'wide', data: 1 })).map(Number))
  published.push(...(await publishOk(gateway.url, publisher, { to: { topic: 'joined-here' }, event: 'here', data: 2 })).map(Number))
  const [last] = await publishOk(gateway.url, publisher, { to: { user }, event: 'last', data: 3 })
  published.push(Number(last))
  t.equal(gateway.app.registry.get(connected.connectionId)?.live, false, 'the replay is still being written')

  stream.resume()
  await stream.next((event) => event.id === last || event.event === 'reset', 30_000, 'the last event')
  t.notOk(stream.events.some((event) => event.event === 'reset'), 'no reset')
  const ids = stream.events.filter((event) => event.id !== undefined).map((event) => Number(event.id))
  t.same(ids, published, 'every event once, in id order: the joined topics\' from each one\'s subscription on, none from before it, none after a leave')
})
