/**
 * Input at the edges of what parses: data nested deeper than JSON.stringify
 * can go, a token whose topics claim is not a list, ids that are not
 * well-formed Unicode, requests the router or Node's parser refuse. Each is refused
 * with a 4xx in the contract's shape (or, through Redis ingress, counted and
 * dropped) and nothing else is disturbed.
 */
import { once } from 'node:events'
import { STATUS_CODES } from 'node:http'
import * as net from 'node:net'
import { gzipSync } from 'node:zlib'
import type { Socket } from 'node:net'
import t from 'tap'
import { eventually, forEachMode, listenInternalPort, loggedAs, openConnected, openStream, publish, publishOk, publisherToken, request, startCluster, startGateway, token, userToken } from './helpers'
import { metricValue, rawConnect, rawExchange, scrape } from './helpers/raw'
import { needRedis, redisClient, startOwnRedis, uniquePrefix } from './helpers/redis'

const publisher = publisherToken()
// Parsed without trouble, but JSON.stringify overflows the stack on it.
const DEEP = `${'['.repeat(20_000)}${']'.repeat(20_000)}`

t.test('data nested too deeply to encode: 400 at POST /v1/publish and PUT /v1/jobs/:id, and the gateway goes on', async (t) => {
  const { url } = await startGateway(t)
  const { stream } = await openConnected(`${url}/v1/stream?token=${userToken('u1')}`, { t })
  const published = await publish(url, publisher, `{"to":{"user":"u1"},"event":"deep","data":${DEEP}}`)
  t.equal(published.status, 400)
  t.match(published.json, { statusCode: 400, error: 'Bad Request', message: /nested too deeply/ })
  const job = await request(`${url}/v1/jobs/deep-job`, { method: 'PUT', token: publisher, body: `{"userId":"u1","status":"active","result":${DEEP}}`, headers: { 'content-type': 'application/json' } })
  t.equal(job.status, 400)
  t.match(job.json, { statusCode: 400, error: 'Bad Request', message: /nested too deeply/ })
  const [id] = await publishOk(url, publisher, { to: { user: 'u1' }, event: 'after', data: 1 })
  t.equal((await stream.nextEvent('after')).id, id, 'the next event goes through')
})

t.test('a job result nested deeper than 512 levels: 400, however little stack its first encoding took; 512 levels pass, and GET and the job stream serve it', async (t) => {
  const { url } = await startGateway(t)
  const nested = (levels: number): string => `${'['.repeat(levels)}${']'.repeat(levels)}`
  // Encodes at the route, but each later encoding of the state runs deeper in the stack.
  for (const levels of [513, 4111]) {
    const job = await request(`${url}/v1/jobs/deep-${levels}`, { method: 'PUT', token: publisher, body: `{"userId":"u1","status":"active","result":${nested(levels)}}` })
    t.equal(job.status, 400, `${levels} levels: 400`)
    t.match(job.json, { statusCode: 400, code: 'GW_BAD_REQUEST', message: /nested too deeply/ })
  }
  const ok = await request(`${url}/v1/jobs/deep-512`, { method: 'PUT', token: publisher, body: `{"userId":"u1","status":"active","meta":${nested(512)}}` })
  t.equal(ok.status, 200, '512 levels: stored')
  t.equal((await request(`${url}/v1/jobs/deep-512`, { token: userToken('u1') })).status, 200, 'and served')
  const { stream } = await openConnected(`${url}/v1/jobs/deep-512/stream?token=${userToken('u1')}`, { t })
  t.ok((await stream.nextEvent('initial_status')).data.startsWith('{'), 'its stream sends initial_status')
})

t.test('Redis ingress: a too-deep message is counted and dropped, on pub/sub and on the durable stream; those behind it arrive', async (t) => {
  if (!(await needRedis(t))) return
  // A Redis of its own: stream:* has no prefix, and other tests' messages there would reach its counters.
  const own = await startOwnRedis(t)
  const prefix = uniquePrefix('deep')
  const gateway = await startGateway(t, { REDIS_URL: own.url, REDIS_PREFIX: prefix })
  await eventually(async () => gateway.app.ingress?.isLeader === true, 'the ingress lease taken')
  const { stream } = await openConnected(`${gateway.url}/v1/stream?token=${userToken('u1')}`, { t })
  const redis = redisClient(t, own.url)
  const good = (n: number): string => JSON.stringify({ to: { user: 'u1' }, event: 'seq', data: n })
  const deep = `{"to":{"user":"u1"},"event":"seq","data":${DEEP}}`

  await redis.publish(`${prefix}publish`, good(1))
  await redis.publish(`${prefix}publish`, deep)
  await redis.publish(`${prefix}publish`, good(2))
  // In one read of the consumer group: the bad entry sits between two good ones.
  await redis.multi()
    .xadd(`${prefix}ingress`, '*', 'payload', good(3))
    .xadd(`${prefix}ingress`, '*', 'payload', deep)
    .xadd(`${prefix}ingress`, '*', 'payload', good(4))
    .exec()

  await stream.next((event) => event.event === 'seq' && event.data === '4', 10_000)
  t.same(stream.events.filter((event) => event.event === 'seq').map((event) => Number(event.data)), [1, 2, 3, 4], 'every good message, in order')
  await eventually(async () => {
    const pending = await redis.xpending(`${prefix}ingress`, 'gateway') as [number, ...unknown[]]
    return pending[0] === 0
  }, 'nothing left pending in the durable ingress')
  const rejected = metricValue(await scrape(gateway.url), 'sse_ingress_rejected_total')
  t.equal(rejected, 2, 'both too-deep messages counted as rejected')
})

t.test('durable ingress: only field names are read as names, and an entry with no payload is counted and logged', async (t) => {
  if (!(await needRedis(t))) return
  // A Redis of its own: stream:* has no prefix, and other tests' messages there would reach its counters.
  const own = await startOwnRedis(t)
  const prefix = uniquePrefix('fields')
  const gateway = await startGateway(t, { REDIS_URL: own.url, REDIS_PREFIX: prefix }, { captureLogs: true })
  const { stream } = await openConnected(`${gateway.url}/v1/stream?token=${userToken('u1')}`, { t })
  const redis = redisClient(t, own.url)
  const event = (n: number): string => JSON.stringify({ to: { user: 'u1' }, event: 'seq', data: n })
  await redis.multi()
    // A field whose value is the word "payload" comes before the real one.
    .xadd(`${prefix}ingress`, '*', 'note', 'payload', 'payload', event(1))
    .xadd(`${prefix}ingress`, '*', 'other', 'x')
    .xadd(`${prefix}ingress`, '*', 'payload', event(2))
    .exec()
  await stream.next((received) => received.event === 'seq' && received.data === '2', 10_000)
  t.same(stream.events.filter((received) => received.event === 'seq').map((received) => Number(received.data)), [1, 2], 'both events, in order')
  await eventually(async () => metricValue(await scrape(gateway.url), 'sse_ingress_rejected_total') === 1, 'the entry without payload counted')
  t.match(gateway.logText(), /"source":"durable","reason":"no payload field"/, 'and logged')
})

t.test('PUBLISH stream:<id> with an id the POST would refuse is counted and dropped', async (t) => {
  if (!(await needRedis(t))) return
  // A Redis of its own: stream:* has no prefix, and other tests' messages there would reach its counters.
  const own = await startOwnRedis(t)
  const prefix = uniquePrefix('streamid')
  const gateway = await startGateway(t, { REDIS_URL: own.url, REDIS_PREFIX: prefix }, { captureLogs: true })
  await eventually(async () => gateway.app.ingress?.isLeader === true, 'the ingress lease taken')
  const { stream, connected } = await openConnected(`${gateway.url}/v1/stream?token=${userToken('u1')}`, { t })
  const redis = redisClient(t, own.url)
  const message = (n: number): string => JSON.stringify({ event: 'seq', data: n })
  await redis.publish('stream:', message(0))
  await redis.publish('stream:a\nb', message(0))
  await redis.publish(`stream:${'c'.repeat(257)}`, message(0))
  await redis.publish(`stream:${connected.connectionId}`, message(1))
  await stream.next((received) => received.event === 'seq', 10_000)
  t.same(stream.events.filter((received) => received.event === 'seq').map((received) => received.data), ['1'], 'the good one arrives')
  await eventually(async () => metricValue(await scrape(gateway.url), 'sse_ingress_rejected_total', { source: 'stream' }) === 3, 'the three bad ids counted')
  // Counted when the publish's reply comes, which may be after its event reached the stream.
  await eventually(async () => metricValue(await scrape(gateway.url), 'sse_events_published_total', { target: 'connection' }) !== 0, 'the good one counted')
  t.equal(metricValue(await scrape(gateway.url), 'sse_events_published_total', { target: 'connection' }), 1, 'only the good one published')
  t.equal(await redis.exists(`${prefix}h:c:`, `${prefix}h:c:a\nb`), 0, 'no history kept under a bad id')
})

t.test('a topics claim that is not a list of patterns allows no topic', async (t) => {
  const { url } = await startGateway(t)
  for (const claim of ['news', { news: true }, 7, null]) {
    const jwt = token({ sub: 'u1', topics: claim })
    const refused = await openStream(`${url}/v1/stream?topics=secret&token=${jwt}`, { t })
    t.equal(refused.status, 403, `topics claim ${JSON.stringify(claim)}: a topic at open is refused`)
    t.match(refused.json(), { statusCode: 403, error: 'Forbidden' })
  }
  const listed = await openStream(`${url}/v1/stream?topics=news&token=${token({ sub: 'u1', topics: ['news'] })}`, { t })
  t.equal(listed.status, 200, 'a topic the list allows opens')
  const unrestricted = await openStream(`${url}/v1/stream?topics=secret&token=${userToken('u1')}`, { t })
  t.equal(unrestricted.status, 200, 'without the claim any topic opens')
})

t.test('ids that are not well-formed Unicode (a lone surrogate) are refused: as a token\'s user, as a publish target', async (t) => {
  const { url } = await startGateway(t)
  const lone = 'x\ud800y'
  const stream = await openStream(`${url}/v1/stream?token=${token({ sub: lone })}`, { t })
  t.equal(stream.status, 401, 'a token whose user id has a lone surrogate')
  t.match(stream.json(), { statusCode: 401, message: /well-formed/ })
  for (const to of [{ user: lone }, { users: ['ok', lone] }, { connection: `c_${lone}` }]) {
    const answer = await publish(url, publisher, { to, event: 'x', data: 1 })
    t.equal(answer.status, 400, `publish to ${JSON.stringify(to)}`)
  }
  t.equal((await openStream(`${url}/v1/stream?token=${token({ sub: 'üser✓' })}`, { t })).status, 200, 'well-formed unicode is fine')
})

t.test('a token whose user id holds a control character is refused (no publish could name that user)', async (t) => {
  const { url } = await startGateway(t)
  // C1 controls too: U+009B starts an escape sequence in a terminal reading the logs.
  for (const sub of ['x\u0001y', 'tab\there', 'del\u007f', 'nel\u0085', 'csi\u009b31m', 'apc\u009f']) {
    const stream = await openStream(`${url}/v1/stream?token=${token({ sub })}`, { t })
    t.equal(stream.status, 401, JSON.stringify(sub))
    if (stream.status === 401) t.match(stream.json(), { statusCode: 401, message: /control characters/ })
    t.equal((await publish(url, publisher, { to: { user: sub }, event: 'x', data: 1 })).status, 400, 'as a publish target: 400')
  }
})

t.test('a user id with a lone surrogate is refused by every route that takes one in its body (in Redis it would become another user, U+FFFD)', async (t) => {
  const { url } = await startGateway(t)
  const lone = 'x\ud800y'
  const calls = [
    { what: 'conversation members (PUT)', method: 'PUT', path: '/v1/conversations/cv1/members', body: { members: ['ok', lone] } },
    { what: 'conversation members (POST)', method: 'POST', path: '/v1/conversations/cv1/members', body: { members: [lone] } },
    { what: 'conversation members (DELETE)', method: 'DELETE', path: '/v1/conversations/cv1/members', body: { members: [lone] } },
    { what: 'a pre-created connection', method: 'POST', path: '/v1/connections', body: { userId: lone } },
    { what: 'a job owner', method: 'PUT', path: '/v1/jobs/j1', body: { userId: lone, status: 'queued' } }
  ]
  for (const call of calls) {
    const answer = await request(`${url}${call.path}`, { method: call.method, token: publisher, body: call.body })
    t.equal(answer.status, 400, call.what)
    t.match(answer.json, { statusCode: 400, error: 'Bad Request', message: String }, `${call.what}: the error shape`)
  }
  for (const call of calls) {
    const c1 = JSON.parse(JSON.stringify(call.body).replace(/x\\ud800y/g, 'x\\u009by'))
    const answer = await request(`${url}${call.path}`, { method: call.method, token: publisher, body: c1 })
    t.equal(answer.status, 400, `${call.what}: a C1 control character`)
  }
  const fine = await request(`${url}/v1/conversations/cv1/members`, { method: 'PUT', token: publisher, body: { members: ['üser✓', 'a\ud83d\ude00b', 'nbsp\u00a0ok'] } })
  t.equal(fine.status, 200, 'well-formed unicode (a surrogate pair too) is fine')
})

t.test('a user id is 1-256 characters (code points) on every route: as a token\'s user, a publish target, a job owner, a member, a pre-created connection\'s user', async (t) => {
  const { url } = await startGateway(t)
  // 256 astral characters are 512 UTF-16 units: a count in units would refuse them here and accept them in the schemas.
  const longest = '\u{1F600}'.repeat(256)
  const tooLong = '\u{1F600}'.repeat(257)
  const { stream } = await openConnected(`${url}/v1/stream?token=${token({ sub: longest })}`, { t })
  const [id] = await publishOk(url, publisher, { to: { user: longest }, event: 'hello', data: 1 })
  t.equal((await stream.nextEvent('hello')).id, id, 'the token\'s user opens a stream and a publish reaches it')
  t.equal((await request(`${url}/v1/connections`, { token: publisher, body: { userId: longest } })).status, 201, 'a pre-created connection')
  t.equal((await request(`${url}/v1/jobs/long-owner`, { method: 'PUT', token: publisher, body: { userId: longest, status: 'queued' } })).status, 200, 'a job owner')
  t.equal((await request(`${url}/v1/conversations/long/members`, { method: 'PUT', token: publisher, body: { members: [longest] } })).status, 200, 'a member')

  t.equal((await openStream(`${url}/v1/stream?token=${token({ sub: tooLong })}`, { t })).status, 401, '257: a token\'s user')
  const refused = await publish(url, publisher, { to: { user: tooLong }, event: 'x', data: 1 })
  t.equal(refused.status, 400, '257: a publish target')
  t.match(refused.json, { message: /"to\.user" must be a string of 1-256 characters/ }, 'the answer says what is wrong: too long, not empty')
  t.match((await publish(url, publisher, { to: { users: ['u1', tooLong] }, event: 'x', data: 1 })).json, { statusCode: 400, message: /"to\.users" .*1-256 characters/ }, 'so does one of users')
  t.equal((await request(`${url}/v1/connections`, { token: publisher, body: { userId: tooLong } })).status, 400, '257: a pre-created connection')
  t.equal((await request(`${url}/v1/jobs/long-owner-2`, { method: 'PUT', token: publisher, body: { userId: tooLong, status: 'queued' } })).status, 400, '257: a job owner')
})

t.test('path ids up to their schema\'s length work; longer ones and malformed escapes get 4xx in the contract\'s shape and a log line, the path not echoed', async (t) => {
  const { url, logs } = await startGateway(t, {}, { captureLogs: true })
  const job = async (id: string): Promise<number> => (await request(`${url}/v1/jobs/${id}`, { method: 'PUT', token: publisher, body: { userId: 'u1', status: 'queued' } })).status
  t.equal(await job('j'.repeat(128)), 200, 'a job id of 128 characters')
  t.equal(await job('j'.repeat(129)), 400, 'one of 129: the schema refuses it')
  const members = await request(`${url}/v1/conversations/${'c'.repeat(128)}/members`, { method: 'PUT', token: publisher, body: { members: ['u1'] } })
  t.equal(members.status, 200, 'a conversation id of 128 characters')
  // 256 characters, each three UTF-8 bytes percent-encoded: 2304 in the path.
  const presence = await request(`${url}/v1/presence/${encodeURIComponent('ü'.repeat(85) + 'u'.repeat(171))}`, { token: publisher })
  t.equal(presence.status, 200, 'presence of a user id of 256 characters')
  t.match(presence.json, { online: false })

  const secret = `SECRET-${'s'.repeat(3000)}`
  const long = await request(`${url}/v1/presence/${secret}`, { token: publisher })
  t.equal(long.status, 414)
  t.match(long.json, { statusCode: 414, error: 'URI Too Long', message: String })
  t.notMatch(long.text, /SECRET/, 'the path is not echoed')
  const malformed = await request(`${url}/v1/jobs/SECRET%E0%A4%A`, { token: publisher })
  t.equal(malformed.status, 400)
  t.match(malformed.json, { statusCode: 400, error: 'Bad Request', message: String })
  t.notMatch(malformed.text, /SECRET/, 'the path is not echoed')
  const refusals = logs.map((line) => JSON.parse(line) as { msg: string, code?: string, res?: { statusCode: number } })
    .filter((line) => line.msg === 'request completed' && ['FST_ERR_MAX_PARAM_LENGTH', 'FST_ERR_BAD_URL'].includes(line.code ?? ''))
  t.same(refusals.map((line) => [line.res?.statusCode, line.code]), [[414, 'FST_ERR_MAX_PARAM_LENGTH'], [400, 'FST_ERR_BAD_URL']], 'each refusal of the router has its line')
})

t.test('requests the HTTP parser refuses get the contract\'s error shape on either listener, and a log line without their bytes', async (t) => {
  const { port, app, logText } = await startGateway(t, { INTERNAL_PORT: '0' }, { captureLogs: true })
  const internalPort = await listenInternalPort(app)
  const secret = `SECRET-${publisherToken()}`
  const cases: Array<[string, number, string]> = [
    [`GET /health HTTP/1.1\r\nHost: x\r\nBad Header ${secret}\r\n\r\n`, 400, 'GW_BAD_REQUEST'],
    [`GET /health HTTP/1.1\r\nHost: x\r\nX-Big: ${secret}${'a'.repeat(20_000)}\r\n\r\n`, 431, 'GW_TOO_LARGE']
  ]
  for (const to of [port, internalPort]) {
    for (const [raw, status, code] of cases) {
      const response = (await rawExchange(to, raw)).response()
      t.equal(response.status, status)
      t.equal(response.headers.connection, 'close')
      t.same(JSON.parse(response.body), { statusCode: status, code, error: STATUS_CODES[status], message: JSON.parse(response.body).message })
    }
  }
  const refusals = (): Array<{ code: string, res: { statusCode: number }, reason: string }> => loggedAs(logText(), 'request refused by the HTTP parser')
  await eventually(() => refusals().length === 4, 'a line for each refusal')
  t.same(refusals().map((line) => [line.res.statusCode, line.code, line.reason]), [
    [400, 'GW_BAD_REQUEST', 'HPE_INVALID_HEADER_TOKEN'], [431, 'GW_TOO_LARGE', 'HPE_HEADER_OVERFLOW'],
    [400, 'GW_BAD_REQUEST', 'HPE_INVALID_HEADER_TOKEN'], [431, 'GW_TOO_LARGE', 'HPE_HEADER_OVERFLOW']
  ], 'each line says what was answered and why')
  t.notMatch(logText(), /SECRET/, 'no byte of the refused requests is logged')
})

t.test('a head not received in time gets 408 GW_TIMEOUT; a refusal is not written into a response already under way', async (t) => {
  // Node times a head out only every 30 s or more: its refusal is handed to the handler as Node would hand it.
  const { port, app, logText } = await startGateway(t, {}, { captureLogs: true })
  const accepted = (): Promise<Socket> => once(app.server, 'connection').then(([socket]) => socket as Socket)
  const refuse = (socket: Socket): void => {
    app.server.emit('clientError', Object.assign(new Error('Request timeout'), { code: 'ERR_HTTP_REQUEST_TIMEOUT' }), socket)
  }

  const timedOutSocket = accepted()
  const timedOut = await rawConnect(t, port)
  refuse(await timedOutSocket)
  await timedOut.waitClose()
  const response = timedOut.response()
  t.equal(response.status, 408)
  t.equal(response.headers.connection, 'close')
  t.same(JSON.parse(response.body), { statusCode: 408, code: 'GW_TIMEOUT', error: 'Request Timeout', message: 'the request was not received in time' })
  await eventually(() => logText().includes('"GW_TIMEOUT"'), 'its log line')

  const busySocket = accepted()
  const busy = await rawConnect(t, port)
  const socket = await busySocket
  Object.assign(socket, { _httpMessage: { headersSent: true } })
  refuse(socket)
  await busy.waitClose()
  t.equal(busy.raw().length, 0, 'nothing was spliced into the response under way; the connection closed')
})

t.test('a connection that sends nothing is closed after the head timeout, on either listener; a stream quiet for longer is not', async (t) => {
  const { url, port, app } = await startGateway(t, { INTERNAL_PORT: '0', KEEPALIVE_MS: '400' })
  const internalPort = await listenInternalPort(app)
  for (const server of [app.server, app.internalServer]) {
    if (server !== null) server.headersTimeout = 300
  }
  for (const to of [port, internalPort]) {
    const silent = await rawConnect(t, to)
    await silent.waitClose(5000)
    t.equal(silent.raw().length, 0, `port ${to === port ? 'public' : 'internal'}: closed with nothing written`)
    // A head begun on a new connection and never ended: Node's 408 (within one of its checks, every 5 s), not a silent close.
    const halfHead = await rawConnect(t, to)
    halfHead.write('GET /health HTTP/1.1\r\nHost: x\r\n')
    await halfHead.waitClose(15_000)
    t.equal(halfHead.response().status, 408, `port ${to === port ? 'public' : 'internal'}: a first head never ended gets 408`)
    t.match(JSON.parse(halfHead.response().body), { code: 'GW_TIMEOUT' })
  }
  const { stream } = await openConnected(`${url}/v1/stream?token=${userToken('u-quiet')}`, { t })
  // Keepalives come every 200 ms: after six, the stream has outlived the head timeout many times over.
  await stream.until(() => stream.comments.length >= 6, 5000, 'six keepalives')
  t.notOk(stream.ended, 'the stream is still open')
})

t.test('a request whose body stops coming gets 408 GW_TIMEOUT and its connection closes, on either listener; a stream is not cut by it', async (t) => {
  const { url, port, app } = await startGateway(t, { INTERNAL_PORT: '0', KEEPALIVE_MS: '1000' })
  const internalPort = await listenInternalPort(app)
  for (const server of [app.server, app.internalServer]) {
    if (server === null) continue
    t.equal(server.requestTimeout, 90_000, 'a request has 90 s to arrive whole')
    // Shorter for the test. Node requires headersTimeout <= requestTimeout; it checks them every 5 s.
    server.headersTimeout = 1000
    server.requestTimeout = 1000
  }
  const stalled = async (to: number, path: string, jwt: string): Promise<void> => {
    const client = await rawConnect(t, to)
    client.write(`POST ${path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${jwt}\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{`)
    await client.waitClose(15_000)
    const response = client.response()
    t.equal(response.status, 408, `${path}: 408`)
    t.same(JSON.parse(response.body), { statusCode: 408, code: 'GW_TIMEOUT', error: 'Request Timeout', message: 'the request was not received in time' })
  }
  await stalled(port, '/v1/subscriptions', userToken('u-stall'))
  await stalled(internalPort, '/v1/publish', publisherToken())

  // A stream's request ended with its head: the stream outlives the deadline
  // and Node's next checks (every 5 s).
  const { stream } = await openConnected(`${url}/v1/stream?token=${userToken('u-long')}`, { t })
  await stream.until(() => stream.comments.length >= 14, 15_000, 'fourteen keepalives, 7 s')
  t.notOk(stream.ended, 'a stream open past the request timeout is still open')
})

t.test('an HTTP/1.1 request without Host, or with two, gets 400 in the contract\'s shape on either listener, with its log line; HTTP/1.0 needs none', async (t) => {
  const { port, app, logText } = await startGateway(t, { INTERNAL_PORT: '0' }, { captureLogs: true })
  const internalPort = await listenInternalPort(app)
  for (const to of [port, internalPort]) {
    const missing = (await rawExchange(to, 'GET /v1/presence/u1 HTTP/1.1\r\n\r\n')).response()
    t.equal(missing.status, 400)
    t.not(missing.headers.connection, 'close', 'the connection goes on: its framing is sound')
    t.same(JSON.parse(missing.body), { statusCode: 400, code: 'GW_BAD_REQUEST', error: 'Bad Request', message: 'the Host header is missing' })
    const http10 = (await rawExchange(to, 'GET /health HTTP/1.0\r\n\r\n')).response()
    t.equal(http10.status, 200, 'HTTP/1.0 has no Host to send')
    const twice = (await rawExchange(to, 'GET /v1/presence/u1 HTTP/1.1\r\nHost: a.example\r\nhost: b.example\r\n\r\n')).response()
    t.equal(twice.status, 400, 'two Host lines: 400')
    t.match(JSON.parse(twice.body), { code: 'GW_BAD_REQUEST', message: 'the Host header is given more than once' })
  }
  const lines = (): Array<{ code?: string, res?: { statusCode: number } }> => loggedAs(logText(), 'request completed')
  await eventually(() => lines().filter((line) => line.code === 'GW_BAD_REQUEST').length === 4, 'a line for each refusal')
  t.same(lines().filter((line) => line.code === 'GW_BAD_REQUEST').map((line) => line.res?.statusCode), [400, 400, 400, 400])
})

t.test('requests Node would answer itself: an Expect other than 100-continue is served as if absent, CONNECT gets 400 in the contract\'s shape, on either listener', async (t) => {
  const { port, app, logText } = await startGateway(t, { INTERNAL_PORT: '0' }, { captureLogs: true })
  const internalPort = await listenInternalPort(app)
  for (const to of [port, internalPort]) {
    const expecting = (await rawExchange(to, 'GET /health HTTP/1.1\r\nHost: x\r\nExpect: foo\r\nConnection: close\r\n\r\n')).response()
    t.equal(expecting.status, 200, `Expect: foo on /health: ${expecting.status} ${expecting.body}`)
    const connect = (await rawExchange(to, 'CONNECT /v1/stats HTTP/1.1\r\nHost: x\r\n\r\n')).response()
    t.equal(connect.status, 400, 'CONNECT')
    t.equal(connect.headers.connection, 'close')
    t.same(JSON.parse(connect.body), { statusCode: 400, code: 'GW_BAD_REQUEST', error: 'Bad Request', message: 'the CONNECT method is not served' })
  }
  // A client that keeps its side open is closed on all the same: a half-open socket held the server's close.
  const openConnections = async (): Promise<number> => await new Promise((resolve, reject) => app.server.getConnections((error, count) => { if (error !== null) reject(error); else resolve(count) }))
  const lingering = net.connect({ port, host: '127.0.0.1', allowHalfOpen: true })
  t.teardown(() => { lingering.destroy() })
  lingering.on('error', () => {})
  await once(lingering, 'connect')
  const before = await openConnections()
  lingering.write('CONNECT /v1/stats HTTP/1.1\r\nHost: x\r\n\r\n')
  const [answer] = await once(lingering, 'data') as [Buffer]
  t.match(answer.toString(), /^HTTP\/1\.1 400 /, 'CONNECT from a client that does not end its side: 400')
  await eventually(async () => await openConnections() === before - 1, 'the server to close its side too', 5000, 20)
  // Behind an answer still to come: after it, not spliced before it.
  const behind = await rawConnect(t, internalPort)
  const publishBody = JSON.stringify({ to: { user: 'nobody' }, data: 1 })
  behind.write(`POST /v1/publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${publisher}\r\nContent-Length: ${publishBody.length}\r\n\r\n${publishBody}CONNECT /v1/stats HTTP/1.1\r\nHost: x\r\n\r\n`)
  await behind.waitClose(5000)
  t.same(statusesOf(behind.text()), [202, 400], 'the publish answered first, then the CONNECT refused')
  // Behind two answers to come: after both.
  const behindTwo = await rawConnect(t, internalPort)
  const onePublish = `POST /v1/publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${publisher}\r\nContent-Length: ${publishBody.length}\r\n\r\n${publishBody}`
  behindTwo.write(`${onePublish}${onePublish}CONNECT /v1/stats HTTP/1.1\r\nHost: x\r\n\r\n`)
  await behindTwo.waitClose(5000)
  t.same(statusesOf(behindTwo.text()), [202, 202, 400], 'both publishes answered, then the CONNECT refused')
  // Behind quick answers: a finished one still waits for Node to let go of it.
  for (const count of [2, 3]) {
    const behindQuick = await rawConnect(t, port)
    behindQuick.write(`${'GET /health HTTP/1.1\r\nHost: x\r\n\r\n'.repeat(count)}CONNECT /v1/stats HTTP/1.1\r\nHost: x\r\n\r\n`)
    await behindQuick.waitClose(5000)
    t.same(statusesOf(behindQuick.text()), [...Array(count).fill(200), 400], `${count} answers, then the CONNECT refused`)
  }
  // A client that resets its CONNECT connection, behind an answer or not: the process goes on.
  for (let attempt = 0; attempt < 20; attempt++) {
    const resetting = net.connect({ port: internalPort, host: '127.0.0.1' })
    resetting.on('error', () => {})
    await once(resetting, 'connect')
    const ahead = attempt % 2 === 0 ? `POST /v1/publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${publisher}\r\nContent-Length: ${publishBody.length}\r\n\r\n${publishBody}` : ''
    resetting.write(`${ahead}CONNECT /v1/stats HTTP/1.1\r\nHost: x\r\n\r\n`)
    await new Promise((resolve) => setImmediate(resolve))
    resetting.resetAndDestroy()
  }
  const alive = (await rawExchange(port, 'GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n')).response()
  t.equal(alive.status, 200, 'the gateway still answers after 20 reset CONNECT connections')
  // Behind a stream request: the stream refuses itself (it would never end), then the CONNECT is refused.
  const behindStream = await rawConnect(t, port)
  behindStream.write(`GET /v1/stream?token=${userToken('connect-u1')} HTTP/1.1\r\nHost: x\r\n\r\nCONNECT /v1/stats HTTP/1.1\r\nHost: x\r\n\r\n`)
  await behindStream.waitClose(5000)
  t.same(statusesOf(behindStream.text()), [400, 400], 'the stream refused, then the CONNECT')
  t.match(behindStream.text(), /followed by other requests pipelined/)
  const publishing = (await rawExchange(internalPort, `POST /v1/publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${publisher}\r\nExpect: 200-ok\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}`)).response()
  t.equal(publishing.status, 400, `a publish with an odd Expect is read and validated like any other: ${publishing.status} ${publishing.body}`)
  t.ok(loggedAs<{ reason?: string }>(logText(), 'request refused by the HTTP parser').filter((line) => line.reason === 'CONNECT').length >= 8, 'a log line for each CONNECT')
})

forEachMode(t, 'a malformed request pipelined behind a publish: the publish, carried out, is answered 202 first, then the malformed one 400', async (t, mode) => {
  const [gateway] = await startCluster(t, mode)
  const { stream } = await openConnected(`${gateway.url}/v1/stream?token=${userToken('behind-u1')}`, { t })
  const body = JSON.stringify({ to: { user: 'behind-u1' }, event: 'carried', data: 1 })
  const publishRequest = `POST /v1/publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${publisher}\r\nContent-Type: application/json\r\nContent-Length: ${body.length}\r\n\r\n${body}`
  for (const malformed of ['GARBAGE\r\n\r\n', 'GET /health HTTP/1.1\r\nHost: x\r\nbad header line\r\n\r\n', `GET /health HTTP/1.1\r\nHost: x\r\nX-Long: ${'a'.repeat(20_000)}\r\n\r\n`]) {
    const client = await rawConnect(t, gateway.port)
    // One write: the parser meets the malformed request while the publish is still being carried out.
    client.write(`${publishRequest}${malformed}`)
    await client.waitClose(10_000)
    const statuses = statusesOf(client.text())
    t.equal(statuses[0], 202, `the publish answered 202 (${malformed.slice(0, 20).trim()}…)`)
    t.equal(statuses.length, 2, 'then the malformed request refused')
    t.ok(statuses[1] === 400 || statuses[1] === 431, `with ${statuses[1]}`)
    t.equal((await stream.nextEvent('carried')).event, 'carried', 'and the event was published, once')
  }
  t.same(stream.unread().filter((event) => event.event === 'carried'), [], 'no event twice')
  // Behind a stream request: the stream refuses itself (it would never end), then the malformed request is refused.
  const behindStream = await rawConnect(t, gateway.port)
  behindStream.write(`GET /v1/stream?token=${userToken('behind-u2')} HTTP/1.1\r\nHost: x\r\n\r\nGARBAGE\r\n\r\n`)
  await behindStream.waitClose(5000)
  t.same(statusesOf(behindStream.text()), [400, 400], 'the stream refused, then the malformed request')
  t.match(behindStream.text(), /followed by other requests pipelined/)
})

t.test('a body over MAX_BODY_BYTES: the client sending it reads its 413, not a reset, and the connection serves the next request; one waiting on 100 Continue gets the 413 at once', async (t) => {
  const { port } = await startGateway(t, { MAX_BODY_BYTES: '65536' })
  const socket = net.connect(port, '127.0.0.1')
  t.teardown(() => socket.destroy())
  await once(socket, 'connect')
  let received = ''
  let failure: Error | null = null
  socket.on('data', (chunk: Buffer) => { received += chunk.toString('latin1') })
  socket.on('error', (error) => { failure = error })
  const size = 4 * 1024 * 1024
  socket.write(`POST /v1/publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${publisher}\r\nContent-Type: application/json\r\nContent-Length: ${size}\r\n\r\n`)
  const chunk = Buffer.alloc(64 * 1024, 'a')
  // The whole body, at the pace the gateway reads it: written on after the 413 has come.
  for (let sent = 0; sent < size && failure === null && !socket.destroyed; sent += chunk.length) {
    if (!socket.write(chunk)) await Promise.race([once(socket, 'drain'), once(socket, 'close')])
  }
  t.equal(failure, null, 'no reset while the body was sent')
  socket.write('GET /health HTTP/1.1\r\nHost: x\r\n\r\n')
  await eventually(() => /HTTP\/1\.1 200 /.test(received) || failure !== null || socket.destroyed, 'the answer to the next request')
  t.same(statusesOf(received), [413, 200], 'the 413, then the next request served on the same connection')
  t.match(received, /"code":"GW_TOO_LARGE"/)

  const expecting = await rawConnect(t, port)
  expecting.write(`POST /v1/publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${publisher}\r\nContent-Length: ${size}\r\nExpect: 100-continue\r\n\r\n`)
  await expecting.waitClose(5000)
  t.notMatch(expecting.text(), /100 Continue/, 'no invitation to send the body')
  t.equal(expecting.response().status, 413, '413 before any of the body, and the connection closed')
  const small = await rawConnect(t, port)
  small.write(`POST /v1/publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${publisher}\r\nContent-Type: application/json\r\nContent-Length: 2\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n`)
  await small.until(() => /100 Continue/.test(small.text()), 5000, 'a body within the limit invited')
  small.write('{}')
  await small.waitClose(5000)
  t.match(small.text(), /HTTP\/1\.1 400 /, 'and read (a publish without a target: 400)')
})

t.test('Expect: 100-continue: the body is invited only once the request has passed its checks; a refused one gets its answer at once and its connection closes', async (t) => {
  const { port } = await startGateway(t)
  const body = JSON.stringify({ to: { topic: 'news' }, event: 'e', data: 1 })
  const head = (headers: string): string => `POST /v1/publish HTTP/1.1\r\nHost: x\r\n${headers}Content-Type: application/json\r\nContent-Length: ${Buffer.byteLength(body)}\r\nExpect: 100-continue\r\n\r\n`

  const unauthorized = await rawConnect(t, port)
  unauthorized.write(head('Authorization: Bearer not-a-token\r\n'))
  await unauthorized.waitClose(5000)
  t.notMatch(unauthorized.text(), /100 Continue/, 'no invitation for a request without a valid token')
  t.equal(unauthorized.response().status, 401, 'its 401 before any of the body')

  const user = await rawConnect(t, port)
  user.write(head(`Authorization: Bearer ${userToken('u1')}\r\n`))
  await user.waitClose(5000)
  t.notMatch(user.text(), /100 Continue/, 'nor for a token without the publisher role')
  t.equal(user.response().status, 403)

  const compressed = await rawConnect(t, port)
  compressed.write(head(`Authorization: Bearer ${publisher}\r\nContent-Encoding: gzip\r\n`))
  await compressed.waitClose(5000)
  t.notMatch(compressed.text(), /100 Continue/, 'nor for a body in an encoding not read')
  t.equal(compressed.response().status, 415)

  const accepted = await rawConnect(t, port)
  accepted.write(head(`Authorization: Bearer ${publisher}\r\n`))
  await accepted.until(() => /100 Continue/.test(accepted.text()), 5000, 'the invitation')
  accepted.write(body)
  await accepted.until(() => /HTTP\/1\.1 202 /.test(accepted.text()), 5000, 'the 202')
  t.pass('a publish that passes its checks is invited, then carried out')
})

forEachMode(t, 'a publish pipelined behind a request refused 400 (no Host, two Hosts, a body that is not JSON) is answered too: the refusal does not close the connection under it', async (t, mode) => {
  const [gateway] = await startCluster(t, mode)
  const { stream } = await openConnected(`${gateway.url}/v1/stream?token=${userToken('ahead-u1')}`, { t })
  const refusedAhead = [
    'GET /health HTTP/1.1\r\n\r\n',
    'GET /health HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n',
    `POST /v1/publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${publisher}\r\nContent-Type: application/json\r\nContent-Length: 5\r\n\r\n{"to"`
  ]
  for (const [index, ahead] of refusedAhead.entries()) {
    const body = JSON.stringify({ to: { user: 'ahead-u1' }, event: `behind${index}`, data: 1 })
    const client = await rawConnect(t, gateway.port)
    client.write(`${ahead}POST /v1/publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${publisher}\r\nContent-Type: application/json\r\nContent-Length: ${body.length}\r\nConnection: close\r\n\r\n${body}`)
    await client.waitClose(5000)
    t.same(statusesOf(client.text()), [400, 202], `${ahead.split('\r\n')[0]}…: 400, then the publish's 202`)
    t.equal((await stream.nextEvent(`behind${index}`)).event, `behind${index}`, 'delivered once')
  }
})

t.test('data and job results holding `__proto__` or `constructor.prototype` keys pass through as written, and no prototype changes', async (t) => {
  const { url } = await startGateway(t)
  const { stream } = await openConnected(`${url}/v1/stream?token=${userToken('u1')}`, { t })
  // Written as text: an object literal with `__proto__` would set the prototype, not a key.
  const data = '{"__proto__":{"polluted":true},"constructor":{"prototype":{"polluted":true}},"names":{"__proto__":2}}'
  const published = await publish(url, publisher, `{"to":{"user":"u1"},"event":"odd","data":${data}}`)
  t.equal(published.status, 202, JSON.stringify(published.json))
  const event = await stream.nextEvent('odd')
  t.equal(event.data, data, 'the data arrives exactly as published')

  const job = await request<Record<string, unknown>>(`${url}/v1/jobs/proto-job`, { method: 'PUT', token: publisher, body: `{"userId":"u1","status":"completed","result":${data}}` })
  t.equal(job.status, 200, JSON.stringify(job.json))
  const stored = await request(`${url}/v1/jobs/proto-job`, { token: userToken('u1') })
  t.match(stored.text, `"result":${data}`, 'the stored result keeps its keys')

  // A body's own fields are still held to their lists.
  const item = await publish(url, publisher, '{"__proto__":{"x":1},"to":{"user":"u1"},"data":1}')
  t.equal(item.status, 400)
  t.match(item.json, { statusCode: 400, error: 'Bad Request', message: 'unknown field "__proto__"' })
  const target = await publish(url, publisher, '{"to":{"user":"u1","__proto__":{}},"data":1}')
  t.equal(target.status, 400)
  t.match(target.json, { statusCode: 400, message: /exactly one of/ })
  const jobField = await request(`${url}/v1/jobs/proto-job-2`, { method: 'PUT', token: publisher, body: '{"userId":"u1","status":"queued","__proto__":{"status":"completed"}}' })
  t.equal(jobField.status, 400)
  t.match(jobField.json, { statusCode: 400, error: 'Bad Request' })

  t.equal(({} as Record<string, unknown>).polluted, undefined, 'Object.prototype is untouched')
  t.equal((Object.prototype as Record<string, unknown>).polluted, undefined)
})

/** The status of each HTTP response in a connection's bytes, in order. */
function statusesOf (text: string): number[] {
  return [...text.matchAll(/HTTP\/1\.1 (\d{3}) /g)].map((match) => Number(match[1]))
}

t.test('a JSON body is read as JSON whatever its Content-Type says (text/plain from fetch, a form label from curl -d, none); one that does not parse gets 400 GW_BAD_REQUEST', async (t) => {
  const { url, port } = await startGateway(t, { MAX_BODY_BYTES: '4096' })
  const { stream } = await openConnected(`${url}/v1/stream?token=${userToken('u1')}`, { t })
  const body = (n: number): string => JSON.stringify({ to: { user: 'u1' }, event: 'labelled', data: n })
  // And labels that are no media type at all, which Fastify alone answers 415.
  const labels = ['text/plain;charset=UTF-8', 'application/x-www-form-urlencoded', 'multipart/form-data; boundary=x', 'application/octet-stream', 'json', ';;;', '/']
  for (const [n, label] of labels.entries()) {
    const answer = await request<{ id?: string }>(`${url}/v1/publish`, { token: publisher, body: body(n), headers: { 'content-type': label } })
    t.equal(answer.status, 202, `${label}: ${answer.text}`)
    const event = await stream.nextEvent('labelled')
    t.same([event.id, event.data], [answer.json.id, String(n)], `${label}: delivered`)
  }
  // fetch() always labels a string body; a raw request can send none.
  const unlabelled = body(labels.length)
  const raw = (await rawExchange(port, `POST /v1/publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${publisher}\r\nContent-Length: ${Buffer.byteLength(unlabelled)}\r\nConnection: close\r\n\r\n${unlabelled}`)).response()
  t.equal(raw.status, 202, `no Content-Type: ${raw.body}`)
  t.equal((await stream.nextEvent('labelled')).data, String(labels.length), 'no Content-Type: delivered')
  for (const label of ['', 'application/json\u00e9']) {
    const labelled = body(labels.length + 1)
    const head = `POST /v1/publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${publisher}\r\nContent-Type: ${label}\r\nContent-Length: ${Buffer.byteLength(labelled)}\r\nConnection: close\r\n\r\n`
    const answer = (await rawExchange(port, Buffer.concat([Buffer.from(head, 'latin1'), Buffer.from(labelled)]))).response()
    t.equal(answer.status, 202, `Content-Type ${JSON.stringify(label)}: ${answer.body}`)
    t.equal((await stream.nextEvent('labelled')).data, String(labels.length + 1), `Content-Type ${JSON.stringify(label)}: delivered`)
  }

  const subscribed = await request<{ topics: string[] }>(`${url}/v1/subscriptions`, { token: userToken('u1'), body: '{"topics":["news"]}', headers: { 'content-type': 'text/plain' } })
  t.same([subscribed.status, subscribed.json], [200, { topics: ['news'] }], 'another JSON route reads it too')

  for (const label of ['text/plain', 'application/json']) {
    for (const text of ['to=x&data=1', '{"to":', '']) {
      const refused = await request(`${url}/v1/publish`, { token: publisher, body: text, headers: { 'content-type': label } })
      t.equal(refused.status, 400, `${label}, ${JSON.stringify(text)}: 400`)
      t.same(refused.json, { statusCode: 400, code: 'GW_BAD_REQUEST', error: 'Bad Request', message: 'the body is not valid JSON' }, 'the same answer under every label')
    }
    const marked = await request<{ id?: string }>(`${url}/v1/publish`, { token: publisher, body: `\ufeff${body(20)}`, headers: { 'content-type': label } })
    t.equal(marked.status, 202, `${label}: a byte order mark first is skipped`)
    t.equal((await stream.nextEvent('labelled')).id, marked.json.id)
  }
  const unknown = await request(`${url}/v1/nothing-here`, { method: 'POST', body: 'not json', headers: { 'content-type': 'text/plain' } })
  t.equal(unknown.status, 404, 'an unknown route is 404 whatever its body')
  const large = await request(`${url}/v1/publish`, { token: publisher, body: JSON.stringify({ to: { user: 'u1' }, data: 'x'.repeat(5000) }), headers: { 'content-type': 'text/plain' } })
  t.equal(large.status, 413, 'MAX_BODY_BYTES holds for every label')
  const forbidden = await request(`${url}/v1/publish`, { token: userToken('u1'), body: body(9), headers: { 'content-type': 'text/plain' } })
  t.equal(forbidden.status, 403, 'and so do roles')

  const [id] = await publishOk(url, publisher, { to: { user: 'u1' }, event: 'after', data: 1 })
  t.equal((await stream.nextEvent('after')).id, id, 'the stream saw nothing from the refused ones')
})

t.test('a body that is not UTF-8 gets 400 saying so, rather than being read with U+FFFD in place of its bytes', async (t) => {
  const { url } = await startGateway(t)
  const { stream } = await openConnected(`${url}/v1/stream?token=${userToken('u1')}`, { t })
  const [head, tail] = ['{"to":{"user":"u1"},"event":"bytes","data":"', '"}']
  // A stray byte, a surrogate half encoded, an overlong slash, a sequence cut short.
  for (const bytes of [[0xff], [0xed, 0xa0, 0x80], [0xc0, 0xaf], [0xe2, 0x82]]) {
    const response = await fetch(`${url}/v1/publish`, { method: 'POST', headers: { authorization: `Bearer ${publisher}`, 'content-type': 'application/json' }, body: Buffer.concat([Buffer.from(head), Buffer.from(bytes), Buffer.from(tail)]) })
    t.equal(response.status, 400, `${Buffer.from(bytes).toString('hex')}: 400`)
    t.match(await response.json(), { statusCode: 400, code: 'GW_BAD_REQUEST', message: 'the body is not valid UTF-8' })
  }
  const text = 'é€😀'
  const [id] = await publishOk(url, publisher, { to: { user: 'u1' }, event: 'bytes', data: text })
  const received = await stream.nextEvent('bytes')
  t.same([received.id, received.data], [id, text], 'well-formed UTF-8 of 2, 3 and 4 bytes passes, and is the only event delivered')
})

t.test('a compressed body (Content-Encoding gzip) gets 415 naming the encoding as the trouble, with Accept-Encoding: identity, and a transfer coding besides chunked 501; identity passes', async (t) => {
  const { url, port } = await startGateway(t)
  const { stream } = await openConnected(`${url}/v1/stream?token=${userToken('u1')}`, { t })
  const body = JSON.stringify({ to: { user: 'u1' }, event: 'encoded', data: 1 })
  const exchange = async (encoding: string, payload: Buffer): Promise<ReturnType<Awaited<ReturnType<typeof rawExchange>>['response']>> => {
    const head = `POST /v1/publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${publisher}\r\nContent-Type: application/json\r\nContent-Encoding: ${encoding}\r\nContent-Length: ${payload.length}\r\nConnection: close\r\n\r\n`
    return (await rawExchange(port, Buffer.concat([Buffer.from(head), payload]))).response()
  }
  for (const encoding of ['gzip', 'br', 'GZIP']) {
    const refused = await exchange(encoding, gzipSync(body))
    t.equal(refused.status, 415, `${encoding}: 415`)
    t.equal(refused.headers['accept-encoding'], 'identity', 'naming what is accepted')
    t.same(JSON.parse(refused.body), { statusCode: 415, code: 'GW_UNSUPPORTED_MEDIA_TYPE', error: 'Unsupported Media Type', message: 'Content-Encoding is not supported: send the body uncompressed' })
  }
  // A GET's body is never read: a stream opens whatever it carries.
  const getWithBody = await rawConnect(t, port)
  getWithBody.write(`GET /v1/stream?token=${userToken('u2')} HTTP/1.1\r\nHost: x\r\nContent-Encoding: gzip\r\nContent-Length: 2\r\n\r\n{}`)
  await getWithBody.until(() => getWithBody.events().some((event) => event.event === 'connected'), 5000, 'the stream to open')
  t.equal(getWithBody.response().status, 200, 'a GET with a compressed body opens its stream')
  getWithBody.destroy()
  // A transfer coding besides chunked: 501 naming it, whether the bytes are compressed or not.
  for (const payload of [gzipSync(body), Buffer.from(body)]) {
    const chunked = `${payload.length.toString(16)}\r\n${payload.toString('latin1')}\r\n0\r\n\r\n`
    const transferCoded = (await rawExchange(port, Buffer.from(`POST /v1/publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${publisher}\r\nContent-Type: application/json\r\nTransfer-Encoding: gzip, chunked\r\nConnection: close\r\n\r\n${chunked}`, 'latin1'))).response()
    t.equal(transferCoded.status, 501, 'Transfer-Encoding: gzip, chunked: 501')
    t.same(JSON.parse(transferCoded.body), { statusCode: 501, code: 'GW_NOT_IMPLEMENTED', error: 'Not Implemented', message: 'Transfer-Encoding other than chunked is not supported: send the body uncompressed' })
  }
  const plain = await exchange('identity', Buffer.from(body))
  t.equal(plain.status, 202, `identity: ${plain.body}`)
  t.equal((await stream.nextEvent('encoded')).data, '1', 'and delivered, the only one')
  t.equal(stream.events.filter((event) => event.event === 'encoded').length, 1)
})

t.test('two stream requests pipelined in one write: neither opens (one has a request behind it, the other waits behind one), neither takes a slot, and under evict-oldest neither evicts the user\'s stream', async (t) => {
  const gateway = await startGateway(t, { MAX_CONNECTIONS_PER_USER: '1', CONNECTION_LIMIT_POLICY: 'evict-oldest' })
  const { stream: held } = await openConnected(`${gateway.url}/v1/stream?token=${userToken('u1')}`, { t })
  const client = await rawConnect(t, gateway.port)
  const open = `GET /v1/stream?token=${userToken('u1')} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n`
  // One write: the server parses both before the first could become a stream.
  client.write(open + open)
  await client.until(() => statusesOf(client.text()).length === 2, 5000, 'both answered')
  t.same(statusesOf(client.text()), [400, 400], 'both refused')
  t.match(client.text(), /followed by other requests pipelined/)
  t.match(client.text(), /cannot be pipelined behind another/)
  await publishOk(gateway.url, publisher, { to: { user: 'u1' }, event: 'still-here', data: 1 })
  await held.nextEvent('still-here')
  t.notOk(held.events.some((event) => event.event === 'evicted'), 'the user\'s stream was not evicted')
  t.equal(gateway.app.registry.size, 1, 'and is the only one')
})

forEachMode(t, 'a stream that waited behind a pipelined request, once it has ended and its connection is handed back, leaves nothing that refuses the next stream on it', async (t) => {
  const [gateway] = await startCluster(t, 'redis', 1)
  const put = await request(`${gateway.url}/v1/jobs/piped-job`, { method: 'PUT', token: publisher, body: { userId: 'u1', status: 'completed' } })
  t.equal(put.status, 200)
  const jobStream = `GET /v1/jobs/piped-job/stream?token=${userToken('u1')} HTTP/1.1\r\nHost: x\r\n\r\n`
  const client = await rawConnect(t, gateway.port)
  // /health is answered while the job's stream looks its job up in Redis: the
  // stream waited behind it, and opens (connected, initial_status, end).
  client.write('GET /health HTTP/1.1\r\nHost: x\r\n\r\n' + jobStream)
  await client.until(() => (client.text().match(/initial_status/g) ?? []).length === 1 && client.text().endsWith('0\r\n\r\n'), 5000, 'health, then the finished job\'s stream')
  t.same(statusesOf(client.text()), [200, 200])
  // The same connection, handed back once the stream ended.
  client.write(jobStream)
  // Its head and connected go out in one write, its initial_status in the next.
  await client.until(() => statusesOf(client.text()).length === 3 && (client.text().match(/initial_status/g) ?? []).length === 2, 5000, 'the next stream\'s answer and its initial_status')
  t.same(statusesOf(client.text()), [200, 200, 200], 'the next stream on the connection opens')
  t.equal((client.text().match(/initial_status/g) ?? []).length, 2)
}, ['redis'])

forEachMode(t, 'a publish pipelined behind a stream request in one write is answered (the stream is refused), and carried out once', async (t, mode) => {
  const [gateway] = await startCluster(t, mode, 1)
  const { stream: watcher } = await openConnected(`${gateway.url}/v1/stream?token=${userToken('u-watch')}`, { t })
  const body = JSON.stringify({ to: { user: 'u-watch' }, event: 'pipelined', data: 'x' })
  const client = await rawConnect(t, gateway.port)
  client.write(`GET /v1/stream?token=${userToken('u1')} HTTP/1.1\r\nHost: x\r\n\r\n` +
    `POST /v1/publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${publisher}\r\nContent-Length: ${Buffer.byteLength(body)}\r\n\r\n${body}`)
  await client.until(() => statusesOf(client.text()).length === 2 && client.text().endsWith('}'), 5000, 'both answered')
  t.same(statusesOf(client.text()), [400, 202], 'the stream refused, the publish answered')
  const id = /"id":"(\d+)"/.exec(client.text())?.[1]
  t.equal((await watcher.nextEvent('pipelined')).id, id, 'the event went out, with the id the answer gave')
  await publishOk(gateway.url, publisher, { to: { user: 'u-watch' }, event: 'after', data: 1 })
  await watcher.nextEvent('after')
  t.equal(watcher.events.filter((event) => event.event === 'pipelined').length, 1, 'once')
  t.equal(gateway.app.registry.size, 1, 'the refused stream holds nothing')
})


t.test('a connection or conversation target no route could name (outside the path id pattern) is refused 400, as the stream and members routes refuse it', async (t) => {
  const publisher = publisherToken()
  const { url } = await startGateway(t)
  for (const [key, id] of [['connection', 'not a valid id!'], ['conversation', 'two words'], ['connection', 'x'.repeat(129)], ['conversation', 'é']] as const) {
    const refused = await publish(url, publisher, { to: { [key]: id }, event: 'x', data: 1 })
    t.equal(refused.status, 400, `to.${key} = ${id.slice(0, 20)}`)
    t.match(refused.json, { code: 'GW_BAD_REQUEST', message: new RegExp(`"to\\.${key}" must be 1-128 characters among letters, digits`) })
    t.equal((await request(`${url}/v1/${key === 'connection' ? 'stream' : 'conversations'}/${encodeURIComponent(id)}${key === 'conversation' ? '/members' : ''}`, { method: key === 'connection' ? 'GET' : 'PUT', token: key === 'connection' ? userToken('u1') : publisher, body: key === 'conversation' ? { members: ['u1'] } : undefined })).status, 400, 'as its route refuses it')
  }
  const { stream, connected } = await openConnected(`${url}/v1/stream?token=${userToken('u1')}`, { t })
  const [id] = await publishOk(url, publisher, { to: { connection: connected.connectionId }, event: 'hello', data: 1 })
  t.equal((await stream.nextEvent('hello')).id, id, 'a stream\'s own id is still a target')
})

t.test('a number beyond a double\'s range (1e400) in a publish or a job update is refused 400, not delivered as null; 1e308 is delivered as sent', async (t) => {
  const publisher = publisherToken()
  const { url } = await startGateway(t)
  const { stream } = await openConnected(`${url}/v1/stream?token=${userToken('u1')}`, { t })
  const refused = await request(`${url}/v1/publish`, { token: publisher, body: '{"to":{"user":"u1"},"event":"big","data":{"n":1e400}}' })
  t.equal(refused.status, 400)
  t.match(refused.json, { code: 'GW_BAD_REQUEST', message: /beyond the range.*1e400/ })
  const job = await request(`${url}/v1/jobs/big-number`, { method: 'PUT', token: publisher, body: '{"userId":"u1","status":"active","result":-1e999}' })
  t.equal(job.status, 400, 'a job update too')
  const [id] = await publishOk(url, publisher, JSON.parse('{"to":{"user":"u1"},"event":"big","data":{"n":1e308}}'))
  const event = await stream.nextEvent('big')
  t.equal(event.id, id, 'the first event the stream gets is the finite one')
  t.same(JSON.parse(event.data), { n: 1e308 })
})
