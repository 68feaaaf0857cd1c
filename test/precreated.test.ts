/**
 * Pre-created and reopenable streams, and streamed content (seed 000):
 * POST /v1/connections, events published into an id before the browser
 * joins, GET /v1/stream/:connectionId (only its owner), expiry of unjoined
 * ids, and `content-chunk` string events that must arrive exactly as sent,
 * in order, through the POST and (Redis mode) the Redis ingress channels.
 * Every test runs in embedded and Redis mode.
 */
import { setTimeout as delay } from 'node:timers/promises'
import t, { type Test } from 'tap'
import { eventually, publish, request, userToken, type SseClient, type SseEvent } from './helpers'
import {
  connect, namesOf, nonce, pair, presence, publishTo, PUBLISHER, settle, tryOpen, type Connected
} from './helpers/channels'
import { forEachMode } from './helpers/modes'
import { needRedis, redisClient } from './helpers/redis'
import type { Gateway } from './helpers/gateway'

interface Created { connectionId: string, expiresAt: string }

async function precreate (gateway: Gateway, userId: string): Promise<Created> {
  const answer = await request<Created>(`${gateway.url}/v1/connections`, { method: 'POST', token: PUBLISHER, body: { userId } })
  if (answer.status !== 201) throw new Error(`POST /v1/connections answered ${answer.status}: ${answer.text}`)
  return answer.json
}

/** Published events, markers and system events left out. */
function published (events: SseEvent[]): SseEvent[] {
  return events.filter((event) => event.id !== undefined && event.event !== 'marker')
}

/**
 * Markdown chunks as a blog generator streams them: line breaks of every
 * kind, blank lines, text that looks like SSE fields or comments, leading
 * spaces, trailing newlines, empty chunks, unicode of several planes, and one
 * large multi-line chunk that spans many TCP segments.
 */
export const CHUNKS: string[] = [
  '# The Title\n\n',
  'First paragraph with **bold** and `code`.\n',
  '\n',
  '',
  'data: x',
  'id: 5\nevent: y\nretry: 10\n: not a comment\n',
  'data:no-space\ndata:  two spaces',
  '   leading spaces\n\ttab\n',
  '- item one\r\n- item two\r\n\r\n',
  'old mac\rline\r',
  '\n\n\nthree blank lines before',
  'trailing spaces   ',
  'unicode: caf\u00e9 \u4e2d\u6587 \u0639\u0631\u0628\u064a \ud83d\ude80\ud83c\udff3\ufe0f\u200d\ud83c\udf08 e\u0301 \u2028 \u0085 end',
  '```js\nconsole.log("data: in code")\n```\n',
  '{"looks":"like json"}',
  Array.from({ length: 2000 }, (_, n) => `line ${n}: ${'lorem ipsum '.repeat(3)}`).join('\n')
]

/** What a browser's MessageEvent.data holds for a string: SSE has no CR, so CR and CRLF arrive as LF. */
export function asReceived (chunk: string): string {
  return chunk.replace(/\r\n|\r/g, '\n')
}

/** Checks the content chunks a stream received: every one, in order, as sent. */
export function checkChunks (t: Test, events: SseEvent[], expected: string[], what: string): void {
  const chunks = events.filter((event) => event.event === 'content-chunk')
  t.equal(chunks.length, expected.length, `${what}: every chunk arrived, once`)
  let identical = 0
  for (let index = 0; index < Math.min(chunks.length, expected.length); index++) {
    const want = expected[index]
    if (chunks[index].data !== asReceived(want)) {
      t.fail(`${what}: chunk ${index} differs`, { found: chunks[index].data.slice(0, 200), wanted: asReceived(want).slice(0, 200) })
      return
    }
    if (!/\r/.test(want)) identical++
  }
  t.pass(`${what}: all ${chunks.length} chunks intact and in order (${identical} without CR byte-identical)`)
  const ids = chunks.map((event) => BigInt(event.id ?? '0'))
  t.ok(ids.every((id, index) => index === 0 || id > ids[index - 1]), `${what}: ids strictly increase`)
}

forEachMode(t, 'POST /v1/connections pre-creates a stream id (201 { connectionId, expiresAt }); only a publisher may', async (t, mode) => {
  const [a] = await pair(t, mode, { HISTORY_TTL_S: '600' })
  const before = Date.now()
  const created = await precreate(a, 'alice')
  t.match(created.connectionId, /^[A-Za-z0-9_.:@=+-]{1,128}$/, 'an id usable in the stream path')
  const expiresAt = Date.parse(created.expiresAt)
  t.ok(expiresAt >= before + 590_000 && expiresAt <= Date.now() + 610_000, 'expiresAt is HISTORY_TTL_S ahead')
  t.not((await precreate(a, 'alice')).connectionId, created.connectionId, 'each id is new')
  t.equal((await request(`${a.url}/v1/connections`, { method: 'POST', token: userToken('alice'), body: { userId: 'alice' } })).status, 403)
  t.equal((await request(`${a.url}/v1/connections`, { method: 'POST', token: PUBLISHER, body: {} })).status, 400)
  t.equal((await request(`${a.url}/v1/connections`, { method: 'POST', token: PUBLISHER, body: { userId: '' } })).status, 400)
})

forEachMode(t, 'events published to a pre-created id before the browser joins are delivered on join, in order, then it continues live', async (t, mode) => {
  const [backend, browser] = await pair(t, mode)
  const { connectionId } = await precreate(backend, 'alice')
  const early = [
    await publishTo(backend, { to: { connection: connectionId }, event: 'progress', data: { step: 1 } }),
    await publishTo(backend, { to: { connection: connectionId }, event: 'content-chunk', data: '# Title\n\nbody' }),
    await publishTo(backend, { to: { connection: connectionId }, event: 'progress', data: { step: 2 } })
  ]
  // History of the user and broadcast is not the connection's own: not delivered without a cursor.
  await publishTo(backend, { to: { user: 'alice' }, event: 'user-note', data: 1 })
  await publishTo(backend, { to: { broadcast: true }, event: 'announcement', data: 1 })

  const joined = await connect(t, browser, 'alice', { path: `/v1/stream/${connectionId}` })
  t.equal(joined.connectionId, connectionId, 'connected names the pre-created id')
  t.equal(joined.connected.userId, 'alice')
  const live = await publishTo(backend, { to: { connection: connectionId }, event: 'progress', data: { step: 3 } })
  const received = published(await settle(browser, joined.stream, connectionId))
  t.same(received.map((event) => event.id), [...early, live], 'the early events in order, then live, nothing else')
  t.same(received[1].data, '# Title\n\nbody')
})

forEachMode(t, 'a pre-created id sent more than HISTORY_SIZE before the browser joins: reset (trimmed) right after connected, then what history still holds, in order, then live; one within HISTORY_SIZE gets no reset', async (t, mode) => {
  const [backend, browser] = await pair(t, mode, { HISTORY_SIZE: '5' })
  const { connectionId } = await precreate(backend, 'alice')
  const sent: string[] = []
  for (let n = 1; n <= 8; n++) sent.push(await publishTo(backend, { to: { connection: connectionId }, event: 'content-chunk', data: `chunk ${n}` }))
  const joined = await connect(t, browser, 'alice', { path: `/v1/stream/${connectionId}` })
  const live = await publishTo(backend, { to: { connection: connectionId }, event: 'content-chunk', data: 'chunk 9' })
  const received = await settle(browser, joined.stream, connectionId)
  t.same(joined.stream.events.slice(0, 2).map((event) => event.event), ['connected', 'reset'], 'reset right after connected')
  t.same(JSON.parse(joined.stream.events[1].data), { reason: 'trimmed' })
  t.same(published(received).map((event) => event.id), [...sent.slice(-5), live], 'then the last HISTORY_SIZE in order, then live')

  const { connectionId: within } = await precreate(backend, 'alice')
  const early = [await publishTo(backend, { to: { connection: within }, event: 'content-chunk', data: 'only' })]
  const second = await connect(t, browser, 'alice', { path: `/v1/stream/${within}` })
  const got = await settle(browser, second.stream, within)
  t.same(second.stream.events.filter((event) => event.event === 'reset'), [], 'within HISTORY_SIZE: no reset')
  t.same(published(got).map((event) => event.id), early, 'and everything')
})

forEachMode(t, 'only the owner may join a pre-created id: another user and an unknown id get 404', async (t, mode) => {
  const [backend, browser] = await pair(t, mode)
  const { connectionId } = await precreate(backend, 'alice')
  await publishTo(backend, { to: { connection: connectionId }, event: 'secret', data: 'for alice' })
  const foreign = await tryOpen(t, browser, 'mallory', { path: `/v1/stream/${connectionId}` })
  t.equal(foreign.status, 404, "another user's pre-created stream: 404")
  t.match(foreign.json(), { statusCode: 404, error: 'Not Found', message: String })
  t.notMatch(foreign.text, 'for alice')
  t.equal((await tryOpen(t, browser, 'alice', { path: '/v1/stream/c_unknown123' })).status, 404, 'an unknown id: 404')
  t.equal((await tryOpen(t, browser, 'alice', { path: '/v1/stream/bad%20id' })).status, 400, 'a malformed id: 400')
  const own = await connect(t, browser, 'alice', { path: `/v1/stream/${connectionId}` })
  t.equal((await own.stream.nextEvent('secret')).data, 'for alice', 'the owner still can')
})

forEachMode(t, 'an unjoined pre-created id expires after HISTORY_TTL_S', async (t, mode) => {
  const [backend, browser] = await pair(t, mode, { HISTORY_TTL_S: '3' })
  const kept = await precreate(backend, 'alice')
  const unjoined = await precreate(backend, 'alice')
  const joined = await connect(t, browser, 'alice', { path: `/v1/stream/${kept.connectionId}` })
  t.equal(joined.connectionId, kept.connectionId, 'joinable before it expires')
  // The TTL is time passing: wait it out (3 s, room for a slow machine to do what comes before) plus a second.
  await delay(4000)
  const late = await tryOpen(t, browser, 'alice', { path: `/v1/stream/${unjoined.connectionId}` })
  t.equal(late.status, 404, 'after HISTORY_TTL_S the unjoined id is gone')
  t.equal((await settle(browser, joined.stream, joined.connectionId)).length, 1, 'a joined id keeps working')
})

forEachMode(t, 'a closed stream id can be reopened for HISTORY_TTL_S after it closed, and not after', async (t, mode) => {
  const [a, b] = await pair(t, mode, { HISTORY_TTL_S: '3' })
  const soon = await connect(t, a, 'alice')
  const late = await connect(t, a, 'alice')
  soon.stream.close()
  late.stream.close()
  const reopened = await connect(t, b, 'alice', { path: `/v1/stream/${soon.connectionId}` })
  t.equal(reopened.connectionId, soon.connectionId, 'reopened at once, on another instance in Redis mode')
  // Each id's clock starts when its stream closes: wait out the TTL (3 s, room for a slow machine to do what comes before) plus a second: the close reaches the server a little after the client closes.
  await delay(4000)
  const refused = await tryOpen(t, b, 'alice', { path: `/v1/stream/${late.connectionId}` })
  t.equal(refused.status, 404, 'HISTORY_TTL_S after it closed, the id is gone')
  t.match(refused.json(), { statusCode: 404, error: 'Not Found' })
})

forEachMode(t, 'GET /v1/stream/:connectionId reopens a stream the user opened before: same id, its own events published meanwhile delivered', async (t, mode) => {
  const [a, b] = await pair(t, mode)
  const first = await connect(t, a, 'alice')
  const id = first.connectionId
  first.stream.close()
  const meanwhile = [
    await publishTo(a, { to: { connection: id }, event: 'content-chunk', data: 'while away 1' }),
    await publishTo(b, { to: { connection: id }, event: 'content-chunk', data: 'while away 2' })
  ]
  await publishTo(a, { to: { user: 'alice' }, event: 'user-note', data: 'not replayed without a cursor' })

  // Reopened on the other instance (Redis mode).
  const again = await connect(t, b, 'alice', { path: `/v1/stream/${id}` })
  t.equal(again.connectionId, id, 'the id stays the same across reconnects')
  const received = published(await settle(b, again.stream, id))
  t.same(received.map((event) => event.id), meanwhile, "the connection's own events; not the user's history")

  const foreign = await tryOpen(t, a, 'mallory', { path: `/v1/stream/${id}` })
  t.equal(foreign.status, 404, "another user cannot reopen alice's stream id")
})

forEachMode(t, 'reopening a stream id with Last-Event-ID replays its own, the user\'s and broadcast events after the cursor', async (t, mode) => {
  const [a, b] = await pair(t, mode)
  const first = await connect(t, a, 'alice')
  const id = first.connectionId
  const cursor = await publishTo(a, { to: { connection: id }, event: 'content-chunk', data: 'seen' })
  await first.stream.nextEvent('content-chunk')
  first.stream.close()
  const missed = [
    await publishTo(b, { to: { user: 'alice' }, event: 'note', data: 1 }),
    await publishTo(a, { to: { connection: id }, event: 'content-chunk', data: 'missed' }),
    await publishTo(b, { to: { broadcast: true }, event: 'announcement', data: 2 })
  ]
  await publishTo(a, { to: { user: 'bob' }, event: 'note', data: 'not alice' })
  const again = await connect(t, b, 'alice', { path: `/v1/stream/${id}`, lastEventId: cursor })
  t.equal(again.connectionId, id)
  const received = published(await settle(b, again.stream, id))
  t.same(received.map((event) => event.id), missed)
})

forEachMode(t, 'reopening a stream id that is still open (on another instance) moves it: the old stream gets evicted and closes, the new one receives', async (t, mode) => {
  const [a, b] = await pair(t, mode)
  const first = await connect(t, a, 'alice')
  const second = await connect(t, b, 'alice', { path: `/v1/stream/${first.connectionId}` })
  t.equal(second.connectionId, first.connectionId)
  const id = await publishTo(a, { to: { connection: first.connectionId }, event: 'content-chunk', data: 'to the new one' })
  t.equal((await second.stream.nextEvent('content-chunk')).id, id, 'the new holder receives')
  try {
    await first.stream.waitEnd(3000)
    t.pass('the old holder was closed')
  } catch {
    t.fail('the old holder of the id is still open')
  }
  t.ok(first.stream.events.some((event) => event.event === 'evicted'), 'the old holder got `evicted`')
  t.notOk(first.stream.events.some((event) => event.event === 'content-chunk'), 'the old holder did not receive the event as well')
})

/**
 * Alice's stream, then two reopens of its id at once on `gateway`. Admission
 * is slowed on purpose (the real one, delayed by `delays` in call order), so
 * both are in flight together, past the check for a live holder of the id.
 */
async function twoReopens (t: Test, gateway: Gateway, delays: number[]): Promise<{ first: Connected, both: SseClient[] }> {
  const first = await connect(t, gateway, 'alice')
  const state = gateway.app.state
  const admit = state.admit.bind(state)
  state.admit = async (request) => {
    await new Promise((resolve) => setTimeout(resolve, delays.shift() ?? 0))
    return await admit(request)
  }
  const path = `/v1/stream/${first.connectionId}`
  const both = await Promise.all([tryOpen(t, gateway, 'alice', { path }), tryOpen(t, gateway, 'alice', { path })])
  t.same(both.map((stream) => stream.status), [200, 200], 'both reopens were admitted')
  state.admit = admit
  await first.stream.waitEnd(5000)
  return { first, both }
}

forEachMode(t, 'two reopens of one id at once on one instance: one holds it, the other is evicted, and the counts stay right', async (t, mode) => {
  const [a] = await pair(t, mode)
  const { first, both } = await twoReopens(t, a, [100, 100])
  // The one evicted may have been evicted before its `connected`: it only has to end.
  await eventually(() => both.filter((stream) => stream.ended).length === 1, 'one of the two reopens closed')
  const survivor = both.find((stream) => !stream.ended) as (typeof both)[number]
  const evicted = both.find((stream) => stream.ended) as (typeof both)[number]
  t.ok(evicted.events.some((event) => event.event === 'evicted'), 'the closed one got `evicted`')
  await survivor.nextEvent('connected')
  t.equal(a.app.registry.size, 1, 'one stream in the registry')
  t.equal(a.app.registry.userCount, 1, 'one user')
  t.equal((await presence(a, 'alice')).connections, 1, 'the shared record still counts the holder')
  const id = await publishTo(a, { to: { connection: first.connectionId }, event: 'content-chunk', data: 'once' })
  t.equal((await survivor.nextEvent('content-chunk')).id, id, 'the holder receives')
  t.notOk(survivor.ended, 'and stays open')
  survivor.close()
  await eventually(() => a.app.registry.size === 0 && a.app.registry.userCount === 0, 'nothing left in the registry')
  await eventually(async () => (await presence(a, 'alice')).connections === 0, 'no stream left in the shared record')
})

forEachMode(t, 'streamed content: content-chunk strings (markdown, blank lines, CRLF, SSE-like text, unicode) arrive intact and in order', async (t, mode) => {
  const [backend, browser] = await pair(t, mode)
  const { stream, connectionId } = await connect(t, browser, 'alice')
  for (const chunk of CHUNKS) await publishTo(backend, { to: { connection: connectionId }, event: 'content-chunk', data: chunk })
  checkChunks(t, await settle(backend, stream, connectionId), CHUNKS, 'POST /v1/publish, one by one')

  const batch = CHUNKS.map((data) => ({ to: { connection: connectionId }, event: 'content-chunk', data }))
  t.equal((await publish(backend.url, PUBLISHER, batch)).status, 202)
  checkChunks(t, await settle(backend, stream, connectionId), CHUNKS, 'POST /v1/publish, one array')

  // Concurrent publishers: each event still arrives whole, in the order of its id.
  const ids = await Promise.all(CHUNKS.map(async (data) => await publishTo(backend, { to: { connection: connectionId }, event: 'content-chunk', data })))
  const received = (await settle(backend, stream, connectionId)).filter((event) => event.event === 'content-chunk')
  const byId = new Map(ids.map((id, index) => [id, CHUNKS[index]]))
  t.same(received.map((event) => event.data), received.map((event) => asReceived(byId.get(event.id ?? '') ?? '?')), 'each chunk whole under its own id')
  t.equal(new Set(received.map((event) => event.id)).size, CHUNKS.length)
})

forEachMode(t, 'streamed content through Redis ingress: PUBLISH stream:<connectionId> and <prefix>publish deliver every chunk once, intact, in order', async (t, mode) => {
  const [a, b] = await pair(t, mode)
  const redis = redisClient(t)
  const prefix = a.app.config.redisPrefix
  // The stream lives on the second instance; whichever instance holds the ingress lease handles the PUBLISH.
  const { stream, connectionId } = await connect(t, b, 'alice')
  // Ingress is asynchronous: each marker goes through the same path as the chunks it follows.
  const through = async (send: (event: string, data: string) => Promise<void>): Promise<SseEvent[]> => {
    const from = stream.events.length - stream.unread().length
    const value = nonce()
    await send('marker', value)
    const marker = await stream.next((event) => event.event === 'marker' && event.data === value, 5000, `marker ${value}`)
    return stream.events.slice(from, stream.events.indexOf(marker) + 1)
  }
  const toStream = async (event: string, data: string): Promise<void> => {
    await redis.publish(`stream:${connectionId}`, JSON.stringify({ event, data }))
  }
  const item = (event: string, data: string): Record<string, unknown> => ({ to: { connection: connectionId }, event, data })
  const toPublish = async (event: string, data: string): Promise<void> => {
    await redis.publish(`${prefix}publish`, JSON.stringify(item(event, data)))
  }

  checkChunks(t, await through(async (event, data) => {
    for (const chunk of CHUNKS) await toStream('content-chunk', chunk)
    await toStream(event, data)
  }), CHUNKS, 'PUBLISH stream:<id>')

  checkChunks(t, await through(async (event, data) => {
    for (const chunk of CHUNKS) await toPublish('content-chunk', chunk)
    await toPublish(event, data)
  }), CHUNKS, 'PUBLISH <prefix>publish, one by one')

  checkChunks(t, await through(async (event, data) => {
    await redis.publish(`${prefix}publish`, JSON.stringify([...CHUNKS.map((chunk) => item('content-chunk', chunk)), item(event, data)]))
  }), CHUNKS, 'PUBLISH <prefix>publish, one array')
  t.same(namesOf(await settle(a, stream, connectionId)), [], 'nothing twice')

  // A pre-created id fed over Redis before the browser joins.
  const created = await precreate(a, 'alice')
  for (const data of CHUNKS.slice(0, 5)) await redis.publish(`stream:${created.connectionId}`, JSON.stringify({ event: 'content-chunk', data }))
  // The PUBLISH is handled asynchronously: a marker through the same path tells when all are in.
  await redis.publish(`stream:${created.connectionId}`, JSON.stringify({ event: 'ingress-done', data: 'x' }))
  const joined = await connect(t, a, 'alice', { path: `/v1/stream/${created.connectionId}` })
  await joined.stream.nextEvent('ingress-done')
  checkChunks(t, joined.stream.events, CHUNKS.slice(0, 5), 'stream:<id> before the browser joined')
  t.same(namesOf(await settle(a, joined.stream, created.connectionId)), [], 'nothing twice')
}, ['redis'])

forEachMode(t, 'two reopens of one id at once on one instance, the second admitted first: the first replaces it, and the id\'s shared record stays', async (t, mode) => {
  const [a] = await pair(t, mode)
  // The first reopen's admission comes back last: the second registers first.
  const { first, both } = await twoReopens(t, a, [300, 50])
  await eventually(() => both.filter((stream) => stream.ended).length === 1, 'one of the two reopens closed')
  const survivor = both.find((stream) => !stream.ended) as (typeof both)[number]
  t.equal(survivor, both[0], 'the one registered last holds the id')
  await eventually(() => a.app.registry.size === 1, 'one stream in the registry')
  t.equal((await presence(a, 'alice')).connections, 1, 'the shared record still counts the holder')
  const id = await publishTo(a, { to: { connection: first.connectionId }, event: 'content-chunk', data: 'once' })
  t.equal((await survivor.nextEvent('content-chunk')).id, id, 'the holder receives')
  survivor.close()
})

/**
 * Alice's stream on `a`, closed unless `holderLive`, then its id reopened at
 * once on `a` and on `b` (Redis mode). Each instance's admission is slowed
 * on purpose by `[before, after]` ms around the real one, so both opens are
 * past the check for a live holder before either is admitted.
 */
async function reopensOnTwoInstances (t: Test, a: Gateway, b: Gateway, delays: [[number, number], [number, number]], holderLive = false): Promise<{ id: string, both: SseClient[] }> {
  const first = await connect(t, a, 'alice')
  if (!holderLive) {
    first.stream.close()
    await eventually(async () => (await presence(a, 'alice')).connections === 0, 'the first stream closed')
  }
  const restore: Array<() => void> = []
  for (const [index, gateway] of [a, b].entries()) {
    const state = gateway.app.state
    const admit = state.admit.bind(state)
    const [before, after] = delays[index]
    state.admit = async (request) => {
      await delay(before)
      const admission = await admit(request)
      await delay(after)
      return admission
    }
    restore.push(() => { state.admit = admit })
  }
  const path = `/v1/stream/${first.connectionId}`
  const both = await Promise.all([tryOpen(t, a, 'alice', { path }), tryOpen(t, b, 'alice', { path })])
  for (const undo of restore) undo()
  t.same(both.map((stream) => stream.status), [200, 200], 'both reopens were admitted')
  return { id: first.connectionId, both }
}

async function oneHolderOnTwoInstances (t: Test, a: Gateway, b: Gateway, id: string, both: SseClient[], expectedSurvivor: SseClient): Promise<void> {
  await eventually(() => both.filter((stream) => stream.ended).length === 1, 'one of the two reopens closed')
  const survivor = both.find((stream) => !stream.ended) as SseClient
  const evicted = both.find((stream) => stream.ended) as SseClient
  t.equal(survivor, expectedSurvivor, 'the one admitted last holds the id')
  t.ok(evicted.events.some((event) => event.event === 'evicted'), 'the other got `evicted`')
  await eventually(() => a.app.registry.size + b.app.registry.size === 1, 'one stream in the two registries')
  t.equal((await presence(a, 'alice')).connections, 1, 'the shared record counts the holder')
  await survivor.nextEvent('connected')
  const eventId = await publishTo(a, { to: { connection: id }, event: 'content-chunk', data: 'once' })
  t.equal((await survivor.nextEvent('content-chunk')).id, eventId, 'the holder receives')
  t.notOk(evicted.events.some((event) => event.event === 'content-chunk'), 'the other does not')
  survivor.close()
  await eventually(async () => (await presence(a, 'alice')).connections === 0, 'no stream left in the shared record')
}

t.test('two reopens of one id at once on two instances: the one admitted last holds it, the other is evicted [redis]', async (t) => {
  if (!(await needRedis(t))) return
  const [a, b] = await pair(t, 'redis')
  const { id, both } = await reopensOnTwoInstances(t, a, b, [[100, 0], [300, 0]])
  await oneHolderOnTwoInstances(t, a, b, id, both, both[1])
})

t.test('two reopens of one id at once on two instances, the first still registering when the second takes the id: it is evicted as it registers [redis]', async (t) => {
  if (!(await needRedis(t))) return
  const [a, b] = await pair(t, 'redis')
  const { id, both } = await reopensOnTwoInstances(t, a, b, [[0, 400], [100, 0]])
  await oneHolderOnTwoInstances(t, a, b, id, both, both[1])
})

t.test('two reopens of a live id on two instances, the one on the holder\'s instance still registering when the other takes the id: only the other holds it [redis]', async (t) => {
  if (!(await needRedis(t))) return
  const [a, b] = await pair(t, 'redis')
  // The holder stays registered until the reopen on `a` registers: the
  // eviction from `b` finds it first, and must end that reopen as well.
  const { id, both } = await reopensOnTwoInstances(t, a, b, [[0, 400], [100, 0]], true)
  await oneHolderOnTwoInstances(t, a, b, id, both, both[1])
})

t.test('a reopen refused by the per-user limit leaves the id\'s holder on another instance as it was [redis]', async (t) => {
  if (!(await needRedis(t))) return
  const [a, b] = await pair(t, 'redis')
  const held = await connect(t, a, 'alice')
  await connect(t, a, 'alice')
  // Straight to the shared state, as a reopen racing another open would reach it: past the holder check, with the user at its limit.
  const admission = await b.app.state.admit({ connectionId: held.connectionId, userId: 'alice', topics: [], openedAt: Date.now(), limit: 1, policy: 'reject' })
  t.same(admission, { admitted: false }, 'refused: the user holds another stream')
  t.equal((await presence(a, 'alice')).connections, 2, 'the refused reopen took nothing from the holder\'s record')
  held.stream.close()
  await eventually(async () => (await presence(a, 'alice')).connections === 1, 'the holder\'s close given back')
})
