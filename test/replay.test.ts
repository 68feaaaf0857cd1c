import t from 'tap'
import { forEachMode, openConnected, openStream, publishOk, publisherToken, startCluster, startGateway, userToken, type SseClient, type SseEvent } from './helpers'

const publisher = publisherToken()
const streamUrl = (url: string, user: string, query = ''): string => `${url}/v1/stream?token=${userToken(user)}${query}`

async function publishTo (url: string, user: string, count: number, from = 0, event = 'msg'): Promise<string[]> {
  return await publishOk(url, publisher, Array.from({ length: count }, (_, n) => ({ to: { user }, event, data: { n: from + n } })))
}

const idsOf = (events: SseEvent[]): Array<string | undefined> => events.map((event) => event.id)

/** Reconnects with a cursor; checks `connected` comes first and returns the stream. */
async function reconnect (t: tap.Test, url: string, user: string, cursor: string, via: 'header' | 'query'): Promise<SseClient> {
  const stream = via === 'header'
    ? await openStream(streamUrl(url, user), { headers: { 'last-event-id': cursor }, t })
    : await openStream(streamUrl(url, user, `&lastEventId=${encodeURIComponent(cursor)}`), { t })
  t.equal(stream.status, 200, `reconnected (${stream.status === 200 ? 'ok' : stream.text})`)
  const [first] = await stream.take(1)
  t.equal(first.event, 'connected', 'connected comes first')
  return stream
}

for (const via of ['header', 'query'] as const) {
  t.test(`${via === 'header' ? 'Last-Event-ID header' : '?lastEventId='}: exactly the missed events, then live`, async (t) => {
    const { url } = await startGateway(t)
    const { stream: first } = await openConnected(streamUrl(url, 'u1'), { t })
    const ids = await publishTo(url, 'u1', 5)
    // The client "read 2" and dropped: its cursor is the id of #2.
    const seen = await first.take(2)
    t.same(idsOf(seen), ids.slice(0, 2))
    first.close()

    const stream = await reconnect(t, url, 'u1', ids[1], via)
    const replayed = await stream.take(3)
    t.same(idsOf(replayed), ids.slice(2), '#3..#5, in order')
    t.same(replayed.map((event) => (JSON.parse(event.data) as { n: number }).n), [2, 3, 4])
    const [live] = await publishTo(url, 'u1', 1, 5)
    const next = await stream.next()
    t.equal(next.id, live, 'then the live event, with nothing in between')
    t.equal(stream.events.filter((event) => event.event === 'reset').length, 0, 'no reset')
    t.equal(new Set(idsOf(stream.events.slice(1))).size, 4, 'no duplicate')
  })
}

t.test('a cursor with spaces around it replays as the same cursor, by query as by header', async (t) => {
  const { url } = await startGateway(t)
  const ids = await publishTo(url, 'u1', 3)
  for (const via of ['header', 'query'] as const) {
    const stream = await reconnect(t, url, 'u1', ` ${ids[0]}  `, via)
    t.same(idsOf(await stream.take(2)), ids.slice(1), `${via}: the events after it, no reset`)
    stream.close()
  }
})

t.test('a cursor at the latest id replays nothing and goes live', async (t) => {
  const { url } = await startGateway(t)
  const ids = await publishTo(url, 'u1', 3)
  const stream = await reconnect(t, url, 'u1', ids[2], 'header')
  const [live] = await publishTo(url, 'u1', 1, 3)
  const next = await stream.next()
  t.equal(next.id, live, 'the first event after connected is the live one')
})

t.test('replay merges the stream\'s channels (user and broadcast) in id order, and nothing of other users', async (t) => {
  const { url } = await startGateway(t)
  const cursor = (await publishTo(url, 'u1', 1))[0]
  const expected: string[] = []
  for (let n = 0; n < 12; n++) {
    const target = [{ user: 'u1' }, { broadcast: true }, { user: 'u2' }, { users: ['u2', 'u1'] }][n % 4]
    const [id] = await publishOk(url, publisher, { to: target, event: 'mixed', data: { n } })
    if (n % 4 !== 2) expected.push(id)
  }
  const stream = await reconnect(t, url, 'u1', cursor, 'header')
  const replayed = await stream.take(expected.length)
  t.same(idsOf(replayed), expected, 'user, broadcast and users events, merged by id, without u2\'s own')
  const [live] = await publishTo(url, 'u1', 1)
  t.equal((await stream.next()).id, live)
})

t.test('events published during the replay are neither lost nor doubled', async (t) => {
  const { url, app } = await startGateway(t, { HISTORY_SIZE: '5000' })
  // 9 MB of history: more than loopback socket buffers hold (about 4 MB), so a
  // reader that does not read stalls the replay on backpressure.
  const padding = 'p'.repeat(3000)
  const before: string[] = []
  for (let batch = 0; batch < 10; batch++) {
    before.push(...await publishOk(url, publisher, Array.from({ length: 300 }, (_, n) => ({ to: { user: 'u1' }, event: 'old', data: { n: batch * 300 + n, padding } }))))
  }
  const stream = await openStream(streamUrl(url, 'u1'), { headers: { 'last-event-id': before[0] }, t })
  t.equal(stream.status, 200)
  stream.pause()
  const during: string[] = []
  for (let batch = 0; batch < 10; batch++) {
    if (batch === 5) {
      const connection = app.registry.ofUser('u1')[0]
      t.ok(connection !== undefined && !connection.live, 'these events are published while the replay is still running')
    }
    during.push(...await publishOk(url, publisher, Array.from({ length: 20 }, (_, n) => ({ to: { user: 'u1' }, event: 'new', data: { n: batch * 20 + n } }))))
  }
  stream.resume()
  const expected = [...before.slice(1), ...during]
  await stream.until(() => stream.events.length >= expected.length + 1, 30_000, `${expected.length} events`)
  const received = stream.events.slice(1)
  t.equal(stream.events[0].event, 'connected')
  t.equal(received.length, expected.length, 'as many events as were missed and published since')
  t.same(idsOf(received), expected, 'every id once, in order')
  const [live] = await publishTo(url, 'u1', 1)
  t.equal((await stream.next((event) => event.id === live)).id, live)
  t.equal(stream.events.length, expected.length + 2, 'and nothing else')
})

t.test('reset: right after connected, with {reason}, no id line, nothing older, then live', async (t) => {
  const checkReset = async (t: tap.Test, url: string, user: string, cursor: string, reason: string | RegExp, via: 'header' | 'query' = 'header'): Promise<void> => {
    const stream = await reconnect(t, url, user, cursor, via)
    const [reset] = await stream.take(1)
    t.equal(reset.event, 'reset', 'reset right after connected')
    t.equal(reset.id, undefined, 'reset carries no id line')
    t.notMatch(reset.raw, /^id:/m)
    const data = JSON.parse(reset.data) as { reason: unknown }
    t.type(data.reason, 'string')
    t.match(data.reason, reason, `reason ${String(data.reason)}`)
    const [live] = await publishTo(url, user, 1, 1000, 'live')
    const next = await stream.next()
    t.equal(next.id, live, 'nothing older is sent; the live event follows')
  }

  t.test('a malformed cursor ("abc")', async (t) => {
    const { url } = await startGateway(t)
    await publishTo(url, 'u1', 3)
    await checkReset(t, url, 'u1', 'abc', 'malformed')
  })

  t.test('a malformed cursor by query ("12abc", "-5", "1.5")', async (t) => {
    const { url } = await startGateway(t)
    await publishTo(url, 'u1', 3)
    for (const cursor of ['12abc', '-5', '1.5']) await checkReset(t, url, 'u1', cursor, 'malformed', 'query')
  })

  t.test('a decimal cursor past 2^53 (17, 70 and 4000 digits) is from the future, by query as by header', async (t) => {
    const { url } = await startGateway(t)
    await publishTo(url, 'u1', 3)
    for (const cursor of ['9'.repeat(17), '9'.repeat(70), '9'.repeat(4000)]) {
      await checkReset(t, url, 'u1', cursor, 'future', 'header')
      await checkReset(t, url, 'u1', cursor, 'future', 'query')
    }
  })

  t.test('a cursor from the future', async (t) => {
    const { url } = await startGateway(t)
    const ids = await publishTo(url, 'u1', 3)
    await checkReset(t, url, 'u1', String(BigInt(ids[2]) + 3_600_000_000n), 'future')
  })

  t.test('an unknown cursor ("1")', async (t) => {
    const { url } = await startGateway(t)
    await publishTo(url, 'u1', 3)
    await checkReset(t, url, 'u1', '1', 'unknown')
  })

  t.test('a cursor from before this gateway existed (an hour-old clock value)', async (t) => {
    const { url } = await startGateway(t)
    await publishTo(url, 'u1', 3)
    const hourAgo = BigInt(Date.now() - 3_600_000) * 1000n
    await checkReset(t, url, 'u1', String(hourAgo), /^(unknown|expired)$/)
  })

  forEachMode(t, 'a cursor older than the window (HISTORY_SIZE=3, 10 published): trimmed', async (t, mode) => {
    const [{ url }] = await startCluster(t, mode, 1, { HISTORY_SIZE: '3' })
    const ids = await publishTo(url, 'u1', 10)
    await checkReset(t, url, 'u1', ids[0], 'trimmed')
  })

  forEachMode(t, 'HISTORY_SIZE=3: a cursor still inside the window replays', async (t, mode) => {
    const [{ url }] = await startCluster(t, mode, 1, { HISTORY_SIZE: '3' })
    const ids = await publishTo(url, 'u1', 10)
    const stream = await reconnect(t, url, 'u1', ids[6], 'header')
    t.same(idsOf(await stream.take(3)), ids.slice(7))
  })

  // The same reason in both modes: the events after it left for their age, not a size cap.
  forEachMode(t, 'a cursor older than HISTORY_TTL_S: expired', async (t, mode) => {
    const [{ url }] = await startCluster(t, mode, 1, { HISTORY_TTL_S: '1' })
    const ids = await publishTo(url, 'u1', 3)
    // Ids are clock microseconds: wait (bounded) until the clock is a full TTL past the last one.
    const expiredAt = Number(BigInt(ids[2]) / 1000n) + 1000 + 50
    const deadline = Date.now() + 10_000
    while (Date.now() < expiredAt && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 25))
    await checkReset(t, url, 'u1', ids[0], 'expired')
  })
})
