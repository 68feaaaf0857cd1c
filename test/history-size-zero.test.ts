import t from 'tap'
import type { Test } from 'tap'
import { forEachMode, openStream, publishOk, publisherToken, startCluster, userToken, type SseClient, type SseEvent } from './helpers'

// HISTORY_SIZE=0 keeps no event: a reconnect that missed one must be told
// (`reset` trimmed), one that missed nothing on its own channels must not.
// Both engines answer alike.

const publisher = publisherToken()
const streamUrl = (url: string, user: string): string => `${url}/v1/stream?token=${userToken(user)}`

async function publishTo (url: string, user: string, data: unknown): Promise<string> {
  const [id] = await publishOk(url, publisher, { to: { user }, event: 'msg', data })
  return id
}

/** Reconnects `user` with `cursor` as Last-Event-ID; checks `connected` comes first. */
async function reconnect (t: Test, url: string, user: string, cursor: string): Promise<SseClient> {
  const stream = await openStream(streamUrl(url, user), { headers: { 'last-event-id': cursor }, t })
  t.equal(stream.status, 200, `reconnected (${stream.status === 200 ? 'ok' : stream.text})`)
  const [first] = await stream.take(1)
  t.equal(first.event, 'connected', 'connected comes first')
  return stream
}

/** Publishes a live event to `user` and checks it is the next event the stream receives. */
async function expectLiveNext (t: Test, url: string, user: string, stream: SseClient): Promise<void> {
  const live = await publishTo(url, user, 'live')
  const next = await stream.next()
  t.equal(next.event, 'msg', `the next event is the live one (got ${next.event})`)
  t.equal(next.id, live, 'with the live id')
}

const resets = (stream: SseClient): SseEvent[] => stream.events.filter((event) => event.event === 'reset')

t.test('HISTORY_SIZE=0', async (t) => {
  forEachMode(t, 'a missed event gets reset trimmed right after connected, then live', async (t, mode) => {
    const [{ url }] = await startCluster(t, mode, 1, { HISTORY_SIZE: '0' })
    const seen = await publishTo(url, 'u1', 'seen')
    const missed = await publishTo(url, 'u1', 'missed')
    const stream = await reconnect(t, url, 'u1', seen)
    const [reset] = await stream.take(1)
    t.equal(reset.event, 'reset', 'reset right after connected')
    t.equal(reset.id, undefined, 'reset carries no id line')
    t.same(JSON.parse(reset.data), { reason: 'trimmed' })
    await expectLiveNext(t, url, 'u1', stream)
    t.notOk(stream.events.some((event) => event.id === missed), 'the missed event is not sent')
    t.equal(resets(stream).length, 1, 'one reset')
  })

  forEachMode(t, 'a cursor at the newest event of its channels gets no reset', async (t, mode) => {
    const [{ url }] = await startCluster(t, mode, 1, { HISTORY_SIZE: '0' })
    await publishTo(url, 'u1', 'old')
    const newest = await publishTo(url, 'u1', 'newest')
    const stream = await reconnect(t, url, 'u1', newest)
    await expectLiveNext(t, url, 'u1', stream)
    t.equal(resets(stream).length, 0, 'no reset')
  })

  forEachMode(t, 'events since the cursor on other users\' channels only: no reset', async (t, mode) => {
    const [{ url }] = await startCluster(t, mode, 1, { HISTORY_SIZE: '0' })
    const newest = await publishTo(url, 'u1', 'newest')
    const other = await publishTo(url, 'u2', 'not for u1')
    // Both reconnect before anything new reaches u1. `behind` is behind the
    // deployment's latest id, `ahead` past u1's newest event; neither missed one of u1's.
    const behind = await reconnect(t, url, 'u1', newest)
    const ahead = await reconnect(t, url, 'u1', other)
    const live = await publishTo(url, 'u1', 'live')
    for (const [name, stream] of [['behind', behind], ['ahead', ahead]] as const) {
      const next = await stream.next()
      t.equal(next.event, 'msg', `${name}: the next event is the live one (got ${next.event})`)
      t.equal(next.id, live, `${name}: with the live id`)
      t.equal(resets(stream).length, 0, `${name}: no reset`)
    }
  })
})

t.test('HISTORY_SIZE>0 is unchanged', async (t) => {
  forEachMode(t, 'HISTORY_SIZE=3: a cursor inside the window replays the missed events, then live', async (t, mode) => {
    const [{ url }] = await startCluster(t, mode, 1, { HISTORY_SIZE: '3' })
    const ids = await publishOk(url, publisher, Array.from({ length: 5 }, (_, n) => ({ to: { user: 'u1' }, event: 'msg', data: { n } })))
    const stream = await reconnect(t, url, 'u1', ids[2])
    const replayed = await stream.take(2)
    t.same(replayed.map((event) => event.id), ids.slice(3), 'the two missed events, in order')
    await expectLiveNext(t, url, 'u1', stream)
    t.equal(resets(stream).length, 0, 'no reset')
  })

  forEachMode(t, 'HISTORY_SIZE=3: a cursor behind the window gets reset trimmed', async (t, mode) => {
    const [{ url }] = await startCluster(t, mode, 1, { HISTORY_SIZE: '3' })
    const ids = await publishOk(url, publisher, Array.from({ length: 5 }, (_, n) => ({ to: { user: 'u1' }, event: 'msg', data: { n } })))
    const stream = await reconnect(t, url, 'u1', ids[0])
    const [reset] = await stream.take(1)
    t.equal(reset.event, 'reset')
    t.same(JSON.parse(reset.data), { reason: 'trimmed' })
    await expectLiveNext(t, url, 'u1', stream)
  })
})
