import t from 'tap'
import { openConnected, publish, publishOk, publisherToken, request, startGateway, userToken, type SseClient } from './helpers'

const publisher = publisherToken()

async function userStream (t: tap.Test, url: string, userId: string): Promise<{ stream: SseClient, connectionId: string }> {
  const { stream, connected } = await openConnected(`${url}/v1/stream?token=${userToken(userId)}`, { t })
  return { stream, connectionId: connected.connectionId }
}

/** Proves `stream` got nothing before `marker`: publishes the marker and checks it is the next event. */
async function nothingBefore (t: tap.Test, url: string, stream: SseClient, to: Record<string, unknown>, what: string): Promise<void> {
  const [id] = await publishOk(url, publisher, { to, event: 'marker', data: what })
  const next = await stream.next()
  t.equal(next.event, 'marker', `${what}: the next event is the marker`)
  t.equal(next.id, id)
}

t.test('targets', async (t) => {
  const { url } = await startGateway(t)
  const u1 = await userStream(t, url, 'u1')
  const u1b = await userStream(t, url, 'u1')
  const u2 = await userStream(t, url, 'u2')
  const u3 = await userStream(t, url, 'u3')

  t.test('to.user reaches every stream of that user and nobody else', async (t) => {
    const [id] = await publishOk(url, publisher, { to: { user: 'u1' }, event: 'only-u1', data: 1 })
    for (const { stream } of [u1, u1b]) t.equal((await stream.nextEvent('only-u1')).id, id)
    await nothingBefore(t, url, u2.stream, { user: 'u2' }, 'u2')
    await nothingBefore(t, url, u3.stream, { user: 'u3' }, 'u3')
  })

  t.test('to.users reaches each listed user only', async (t) => {
    const [id] = await publishOk(url, publisher, { to: { users: ['u1', 'u2', 'nobody'] }, event: 'some', data: 2 })
    for (const { stream } of [u1, u1b, u2]) t.equal((await stream.nextEvent('some')).id, id)
    await nothingBefore(t, url, u3.stream, { user: 'u3' }, 'u3')
  })

  t.test('to.connection reaches that stream only (the id from `connected`)', async (t) => {
    const [id] = await publishOk(url, publisher, { to: { connection: u1.connectionId }, event: 'one-tab', data: 3 })
    t.equal((await u1.stream.nextEvent('one-tab')).id, id)
    await nothingBefore(t, url, u1b.stream, { connection: u1b.connectionId }, 'the other tab')
    await nothingBefore(t, url, u2.stream, { user: 'u2' }, 'u2')
  })

  t.test('to.broadcast reaches every stream', async (t) => {
    const [id] = await publishOk(url, publisher, { to: { broadcast: true }, event: 'all', data: 4 })
    for (const { stream } of [u1, u1b, u2, u3]) t.equal((await stream.nextEvent('all')).id, id)
  })

  t.test('events to one user never reach another user', async (t) => {
    const ids = await publishOk(url, publisher, Array.from({ length: 20 }, (_, n) => ({ to: { user: n % 2 === 0 ? 'u2' : 'u3' }, event: 'private', data: { for: n % 2 === 0 ? 'u2' : 'u3', n } })))
    const u2Events = await u2.stream.take(10)
    const u3Events = await u3.stream.take(10)
    t.ok(u2Events.every((event) => (JSON.parse(event.data) as { for: string }).for === 'u2'), 'u2 got only its own')
    t.ok(u3Events.every((event) => (JSON.parse(event.data) as { for: string }).for === 'u3'), 'u3 got only its own')
    t.same(u2Events.map((event) => event.id), ids.filter((_, n) => n % 2 === 0))
    t.same(u3Events.map((event) => event.id), ids.filter((_, n) => n % 2 === 1))
    await nothingBefore(t, url, u1.stream, { user: 'u1' }, 'u1')
  })
})

t.test('a single event answers 202 {id}; an array answers 202 {ids} in its order', async (t) => {
  const { url } = await startGateway(t)
  const { stream } = await userStream(t, url, 'u1')
  const single = await publish(url, publisher, { to: { user: 'u1' }, event: 'one', data: 'x' })
  t.equal(single.status, 202)
  t.match(single.json, { id: /^\d+$/ })
  t.notOk('ids' in single.json)
  const batch = await publish(url, publisher, ['a', 'b', 'c', 'd'].map((name) => ({ to: { user: 'u1' }, event: name, data: name })))
  t.equal(batch.status, 202)
  t.equal(batch.json.ids?.length, 4)
  t.notOk('id' in batch.json)
  const ids = batch.json.ids ?? []
  t.ok(ids.every((id, n) => /^\d+$/.test(id) && (n === 0 || BigInt(id) > BigInt(ids[n - 1]))), 'ids increase in array order')
  t.ok(BigInt(ids[0]) > BigInt(single.json.id ?? '0'), 'later than the earlier publish')
  const events = await stream.take(5)
  t.same(events.map((event) => [event.event, event.id]), [['one', single.json.id], ...['a', 'b', 'c', 'd'].map((name, n) => [name, ids[n]])])
})

t.test('string data arrives intact in the browser: multi-line (LF, CR, CRLF, blank lines) and field-like text', async (t) => {
  const { url } = await startGateway(t)
  const { stream } = await userStream(t, url, 'u1')
  const samples = [
    'line one\nline two',
    'crlf one\r\ncrlf two\r\ncrlf three',
    'cr one\rcr two',
    'mixed\r\nbreaks\nand\rmore',
    'blank lines\n\n\nbetween',
    '\nleading and trailing newline\n',
    '\n\n',
    'data: not a new field\nevent: not an event\nid: 12345\nretry: 1\n: not a comment\n',
    'event: fake\n\ndata: fake\nid: 999999999999999\n\n',
    ' leading space and trailing space ',
    '# markdown heading\n\n- item *one*\n- item `two`\n\n```js\nconst x = 1\n```\n',
    'unicode: héllo wörld ✓ 🚀 中文',
    ''
  ]
  const ids = await publishOk(url, publisher, samples.map((data, n) => ({ to: { user: 'u1' }, event: `sample-${n}`, data })))
  const events = await stream.take(samples.length)
  for (const [n, sample] of samples.entries()) {
    const expected = sample.replace(/\r\n|\r/g, '\n')
    t.equal(events[n].event, `sample-${n}`, `sample ${n} keeps its name`)
    t.equal(events[n].id, ids[n], `sample ${n} keeps its id (text inside data never sets an id)`)
    t.equal(events[n].data, expected, `sample ${n} arrives as ${JSON.stringify(expected).slice(0, 50)}`)
  }
  t.equal(stream.lastEventId, ids[ids.length - 1], 'the cursor is the last real id')
  t.same(stream.retries, [3000], 'text inside data never sets retry')
})

t.test('JSON data is written as JSON.stringify(value) on one line and parses back', async (t) => {
  const { url } = await startGateway(t)
  const { stream } = await userStream(t, url, 'u1')
  const values: unknown[] = [
    { text: 'multi\nline\r\ninside JSON', nested: { list: [1, 2, 3], flag: true, none: null } },
    [1, 'two', { three: 3 }],
    42,
    true,
    null,
    { emoji: '🚀', quote: '"', backslash: '\\' }
  ]
  await publishOk(url, publisher, values.map((data) => ({ to: { user: 'u1' }, event: 'json', data })))
  const events = await stream.take(values.length)
  for (const [n, value] of values.entries()) {
    t.equal(events[n].data, JSON.stringify(value), `value ${n} is its JSON`)
    t.same(JSON.parse(events[n].data), value)
    t.equal(events[n].raw.split('\n').filter((line) => line.startsWith('data:')).length, 1, 'one data line')
  }
})

t.test('event names: 1-64 of A-Z a-z 0-9 _ . : -', async (t) => {
  const { url } = await startGateway(t)
  const { stream } = await userStream(t, url, 'u1')
  const name64 = 'a'.repeat(60) + '_.:-'
  t.equal(name64.length, 64)
  const ok = await publish(url, publisher, { to: { user: 'u1' }, event: name64, data: 'x' })
  t.equal(ok.status, 202, 'a 64-character name is accepted')
  t.equal((await stream.next()).event, name64)
  t.equal((await publish(url, publisher, { to: { user: 'u1' }, event: 'Message:New.v2_x-y', data: 'x' })).status, 202)
  t.equal((await stream.next()).event, 'Message:New.v2_x-y')
  const bad = [
    'b'.repeat(65),
    '',
    'has space',
    'new\nline',
    'carriage\rreturn',
    'crlf\r\ndata: injected',
    'tab\tname',
    'slash/name',
    'héllo',
    'emoji🚀'
  ]
  for (const name of bad) {
    const answer = await publish(url, publisher, { to: { user: 'u1' }, event: name, data: 'x' })
    t.equal(answer.status, 400, `${JSON.stringify(name)} is refused with 400`)
    t.match(answer.json, { statusCode: 400, error: 'Bad Request', message: String })
  }
  for (const name of [42, null, ['a'], { a: 1 }]) {
    t.equal((await publish(url, publisher, { to: { user: 'u1' }, event: name, data: 'x' })).status, 400, `${JSON.stringify(name)} is refused`)
  }
  await nothingBefore(t, url, stream, { user: 'u1' }, 'after the refused names')
})

t.test('names the gateway sends itself, and EventSource\'s own error and open, are refused with 400 naming why', async (t) => {
  const { url } = await startGateway(t)
  const { stream } = await userStream(t, url, 'u1')
  for (const name of ['connected', 'reset', 'auth-expired', 'evicted', 'shutdown', 'initial_status']) {
    const answer = await publish(url, publisher, { to: { user: 'u1' }, event: name, data: 'x' })
    t.equal(answer.status, 400, `${name}: 400`)
    t.match(answer.json, { statusCode: 400, error: 'Bad Request', message: /reserved for the gateway/ }, `${name}: says why`)
  }
  for (const name of ['error', 'open']) {
    const answer = await publish(url, publisher, { to: { user: 'u1' }, event: name, data: 'x' })
    t.equal(answer.status, 400, `${name}: 400`)
    t.match(answer.json, { statusCode: 400, error: 'Bad Request', message: new RegExp(`browsers would fire on${name}`) }, `${name}: says why`)
  }
  for (const name of ['Error', 'errors', 'opened', 'message']) {
    t.equal((await publish(url, publisher, { to: { user: 'u1' }, event: name, data: 'x' })).status, 202, `${name}: a name of its own`)
    t.equal((await stream.next()).event, name)
  }
})

t.test('bad bodies are 400 with the error shape', async (t) => {
  const { url } = await startGateway(t)
  const { stream } = await userStream(t, url, 'u1')
  const cases: Array<[string, unknown]> = [
    ['malformed JSON', '{"to": {"user": "u1"}, "data": '],
    ['a JSON string', '"just a string"'],
    ['an empty object', {}],
    ['a missing target', { event: 'x', data: 'x' }],
    ['a null target', { to: null, data: 'x' }],
    ['an empty target', { to: {}, data: 'x' }],
    ['two targets', { to: { user: 'u1', broadcast: true }, data: 'x' }],
    ['user and users', { to: { user: 'u1', users: ['u1'] }, data: 'x' }],
    ['an unknown target', { to: { group: 'g1' }, data: 'x' }],
    ['a target that is a string', { to: 'u1', data: 'x' }],
    ['an empty user id', { to: { user: '' }, data: 'x' }],
    ['a numeric user id', { to: { user: 7 }, data: 'x' }],
    ['users not an array', { to: { users: 'u1' }, data: 'x' }],
    ['an empty users list', { to: { users: [] }, data: 'x' }],
    ['1001 users', { to: { users: Array.from({ length: 1001 }, (_, n) => `u${n}`) }, data: 'x' }],
    ['broadcast: false', { to: { broadcast: false }, data: 'x' }],
    ['missing data', { to: { user: 'u1' }, event: 'x' }],
    ['an unknown field', { to: { user: 'u1' }, data: 'x', extra: 1 }],
    ['an empty array', []]
  ]
  for (const [name, body] of cases) {
    const answer = await publish(url, publisher, body)
    t.equal(answer.status, 400, `${name}: 400`)
    t.match(answer.json, { statusCode: 400, error: 'Bad Request', message: String }, `${name}: error shape`)
  }
  await nothingBefore(t, url, stream, { user: 'u1' }, 'after the refused bodies')
})

t.test('data over MAX_EVENT_BYTES (UTF-8 bytes as on the wire) is 413', async (t) => {
  const { url } = await startGateway(t, { MAX_EVENT_BYTES: '100' })
  const { stream } = await userStream(t, url, 'u1')
  t.equal((await publish(url, publisher, { to: { user: 'u1' }, event: 'fits', data: 'x'.repeat(100) })).status, 202, '100 bytes fit')
  t.equal((await stream.next()).data, 'x'.repeat(100))
  const tooLarge: Array<[string, unknown]> = [
    ['101 ASCII bytes', 'x'.repeat(101)],
    ['51 two-byte characters (102 bytes)', 'é'.repeat(51)],
    ['an object whose JSON is over 100 bytes', { text: 'y'.repeat(95) }]
  ]
  for (const [name, data] of tooLarge) {
    const answer = await publish(url, publisher, { to: { user: 'u1' }, event: 'big', data })
    t.equal(answer.status, 413, `${name}: 413`)
    t.match(answer.json, { statusCode: 413, error: 'Payload Too Large', message: String })
  }
  t.equal((await publish(url, publisher, [{ to: { user: 'u1' }, data: 'ok' }, { to: { user: 'u1' }, data: 'z'.repeat(101) }])).status, 413, 'an array whose only fault is a too-large item: 413')
  await nothingBefore(t, url, stream, { user: 'u1' }, 'after the refused events')
})

t.test('a body over MAX_BODY_BYTES is 413', async (t) => {
  const { url } = await startGateway(t, { MAX_BODY_BYTES: '1024' })
  t.equal((await publish(url, publisher, { to: { user: 'u1' }, data: 'x'.repeat(900) })).status, 202)
  const answer = await publish(url, publisher, { to: { user: 'u1' }, data: 'x'.repeat(2000) })
  t.equal(answer.status, 413)
  t.match(answer.json, { statusCode: 413, error: 'Payload Too Large', message: String })
})

t.test('arrays are all-or-nothing: one bad item is 400 naming its index, nothing is delivered', async (t) => {
  const { url } = await startGateway(t)
  const { stream } = await userStream(t, url, 'u1')
  const good = (n: number): Record<string, unknown> => ({ to: { user: 'u1' }, event: 'batch', data: { n } })
  const cases: Array<[number, unknown]> = [
    [2, { to: { user: 'u1' }, event: 'bad name', data: 1 }],
    [2, { to: { nowhere: 'u1' }, data: 1 }],
    [2, { to: { user: 'u1' } }],
    [2, 'not an object']
  ]
  for (const [index, bad] of cases) {
    const body = [good(0), good(1), bad, good(3)]
    const answer = await publish(url, publisher, body)
    t.equal(answer.status, 400, `bad item ${JSON.stringify(bad)}: 400`)
    t.match(answer.json.message, new RegExp(`\\b${index}\\b`), `the message names index ${index}: ${answer.json.message ?? ''}`)
  }
  const first = await publish(url, publisher, [{ to: { user: 'u1' }, event: 'bad\nname', data: 1 }, good(1)])
  t.match(first.json.message, /\b0\b/, 'index 0 is named too')
  await nothingBefore(t, url, stream, { user: 'u1' }, 'no item of a refused array')
})

t.test('an array of more than 1000 events is 400; exactly 1000 is accepted', async (t) => {
  const { url } = await startGateway(t)
  const item = { to: { user: 'nobody' }, data: 'x' }
  const over = await publish(url, publisher, Array.from({ length: 1001 }, () => item))
  t.equal(over.status, 400)
  t.match(over.json, { statusCode: 400, error: 'Bad Request', message: String })
  const full = await publish(url, publisher, Array.from({ length: 1000 }, () => item))
  t.equal(full.status, 202)
  t.equal(full.json.ids?.length, 1000)
})

t.test('unknown routes answer 404 with the JSON error shape', async (t) => {
  const { url } = await startGateway(t)
  const cases: Array<[string, string]> = [
    ['GET', '/nope'],
    ['GET', '/v1/nope'],
    ['POST', '/v1/publish/extra'],
    ['GET', '/v1/stream/a/b']
  ]
  for (const [method, path] of cases) {
    const answer = await request(`${url}${path}`, { method, token: publisher })
    t.equal(answer.status, 404, `${method} ${path}: 404`)
    t.match(answer.headers.get('content-type'), /^application\/json/)
    t.match(answer.json, { statusCode: 404, code: 'GW_NOT_FOUND', error: 'Not Found', message: String }, `${method} ${path}: error shape`)
  }
})

t.test('a route asked with a method it does not take answers 405 with Allow and the JSON error shape, not 404', async (t) => {
  const { url } = await startGateway(t)
  const cases: Array<[string, string, string]> = [
    ['GET', '/v1/publish', 'POST'],
    ['DELETE', '/v1/stream', 'GET'],
    ['POST', '/v1/stream/c_someid', 'GET'],
    ['PATCH', '/v1/jobs/job-1', 'GET, HEAD, PUT'],
    ['GET', '/v1/conversations/c1/members', 'DELETE, POST, PUT'],
    ['DELETE', '/health', 'GET, HEAD']
  ]
  for (const [method, path, allow] of cases) {
    const answer = await request(`${url}${path}`, { method, token: publisher })
    t.equal(answer.status, 405, `${method} ${path}: 405`)
    t.equal(answer.headers.get('allow'), allow, `${method} ${path}: Allow ${allow}`)
    t.match(answer.headers.get('content-type'), /^application\/json/)
    t.same(answer.json, { statusCode: 405, code: 'GW_METHOD_NOT_ALLOWED', error: 'Method Not Allowed', message: `${method} is not allowed here: ${allow}` }, `${method} ${path}: error shape`)
  }
})

t.test('a burst of 10,000 small events to one user arrives complete and in order over a real socket', async (t) => {
  const { url } = await startGateway(t)
  const { stream } = await userStream(t, url, 'burst')
  const total = 10_000
  const ids: string[] = []
  for (let start = 0; start < total; start += 1000) {
    const batch = Array.from({ length: 1000 }, (_, n) => ({ to: { user: 'burst' }, event: 'seq', data: { seq: start + n } }))
    ids.push(...await publishOk(url, publisher, batch))
  }
  t.equal(ids.length, total)
  await stream.until(() => stream.events.length >= total + 1, 60_000, `${total} events`)
  const events = stream.events.slice(1)
  t.equal(events.length, total, 'exactly 10,000 events, no duplicate')
  let inOrder = true
  let previous = 0n
  for (const [n, event] of events.entries()) {
    const seq = (JSON.parse(event.data) as { seq: number }).seq
    const id = BigInt(event.id ?? '0')
    if (seq !== n || event.id !== ids[n] || id <= previous) {
      inOrder = false
      t.fail(`event ${n}: seq ${seq}, id ${event.id ?? '-'} (expected ${ids[n]})`)
      break
    }
    previous = id
  }
  t.ok(inOrder, 'seq 0..9999 in order, each with the id its publish got, ids strictly increasing')
})
