import t from 'tap'
import { once } from 'node:events'
import { connect } from 'node:net'
import { createHmac } from 'node:crypto'
import type { Test } from 'tap'
import {
  eventually, forEachMode, nowS, openConnected, publish, publishOk, publisherToken, request, secondsAhead, startCluster, startGateway,
  token, userToken, type Gateway
} from './helpers'
import { redisClient } from './helpers/redis'
import { TEST_SECRET } from './helpers/gateway'
import { redactUrl, withoutJwts } from '../src/logging'
import { flood, floodMaxBytes, metricValue, neverReadingStream, rawExchange, scrape } from './helpers/raw'

/** A string no log line may ever hold: it only travels as event data. */
const SECRET_DATA = 'PAYLOAD-7f3a9c1e-never-log-me'

type LogLine = Record<string, unknown> & { msg?: string, reqId?: unknown }

function lines (gateway: Gateway): LogLine[] {
  return gateway.logs.map((line) => JSON.parse(line) as LogLine)
}

function streamLines (gateway: Gateway, msg: string): LogLine[] {
  return lines(gateway).filter((line) => line.msg === msg)
}

/** Neither a token nor any of its three parts appears in any line. */
function assertNoToken (t: Test, gateway: Gateway, tokens: string[]): void {
  const text = gateway.logText()
  for (const jwt of tokens) {
    t.notOk(text.includes(jwt), 'no token in the logs')
    // The header part is shared by every token; the payload and signature are each token's own.
    const [, payload, signature] = jwt.split('.')
    t.notOk(text.includes(payload), 'no token payload in the logs')
    t.notOk(text.includes(signature), 'no token signature in the logs')
  }
  // The 401 for a missing token names the header's form, `Bearer <jwt>`.
  t.notMatch(text, /Bearer\s+(?!<jwt>)\S/i, 'no Authorization value in the logs')
}

t.test('pino JSON: one line per stream open and per close (reason, durationMs, events, bytes); request ids; no token, no event data', async (t) => {
  const gateway = await startGateway(t, { MAX_EVENT_BYTES: '256' }, { captureLogs: true })
  const { url } = gateway
  const publisher = publisherToken()
  const queryToken = userToken('u1')
  const headerToken = userToken('u1')
  const xAuthToken = userToken('u2')

  const viaQuery = await openConnected(`${url}/v1/stream?token=${queryToken}`, { t, headers: { 'x-request-id': 'req-by-query' } })
  const viaHeader = await openConnected(`${url}/v1/stream`, { t, headers: { authorization: `Bearer ${headerToken}` } })
  const viaXAuth = await openConnected(`${url}/v1/stream?topics=news`, { t, headers: { 'x-auth-token': xAuthToken } })

  const [id] = await publishOk(url, publisher, { to: { user: 'u1' }, event: 'note', data: SECRET_DATA })
  await publishOk(url, publisher, { to: { topic: 'news' }, event: 'note', data: { text: SECRET_DATA } })
  t.equal((await viaQuery.stream.nextEvent('note')).data, SECRET_DATA, 'the data did travel')
  t.equal((await viaHeader.stream.nextEvent('note')).id, id)
  await viaXAuth.stream.nextEvent('note')

  // Rejected publishes whose bodies hold the data: invalid event name, too large, not JSON.
  t.equal((await publish(url, publisher, { to: { user: 'u1' }, event: 'bad name', data: SECRET_DATA })).status, 400)
  t.equal((await publish(url, publisher, { to: { user: 'u1' }, data: `${SECRET_DATA}${'x'.repeat(300)}` })).status, 413)
  t.equal((await publish(url, publisher, `{"to":{"user":"u1"},"data":"${SECRET_DATA}"`)).status, 400, 'truncated JSON: 400')
  t.equal((await publish(url, publisher, `${SECRET_DATA}`)).status, 400, 'not JSON at all: 400')
  // A bad token in the query string and in a header.
  const badToken = token({ sub: 'u3' }, { secret: 'not-the-secret' })
  t.equal((await request(`${url}/v1/subscriptions?token=${badToken}`, { method: 'POST', body: { topics: ['a'] } })).status, 401)
  t.equal((await request(`${url}/v1/subscriptions`, { method: 'POST', token: badToken, body: { topics: ['a'] } })).status, 401)

  viaQuery.stream.close()
  viaHeader.stream.close()
  viaXAuth.stream.close()
  await eventually(() => streamLines(gateway, 'stream closed').length === 3, 'three close lines')

  const all = lines(gateway)
  t.ok(all.length > 0, `${all.length} JSON lines`)
  t.ok(all.every((line) => typeof line.level === 'number' && typeof line.time === 'number'), 'every line is pino JSON')

  const opened = streamLines(gateway, 'stream opened')
  t.same(opened.map((line) => line.connectionId).sort(), [viaQuery, viaHeader, viaXAuth].map((s) => s.connected.connectionId).sort(), 'one open line per stream, naming it')
  const closed = streamLines(gateway, 'stream closed')
  t.same(closed.map((line) => line.connectionId).sort(), [viaQuery, viaHeader, viaXAuth].map((s) => s.connected.connectionId).sort(), 'one close line per stream, naming it')
  for (const line of closed) {
    t.equal(line.reason, 'client', 'reason: client')
    t.type(line.durationMs, 'number')
    t.ok((line.durationMs as number) >= 0, 'durationMs')
    t.equal(line.events, 1, 'events: the one event it was sent')
    t.type(line.bytes, 'number')
    t.ok((line.bytes as number) > 0, 'bytes written')
  }

  const requestLines = all.filter((line) => line.req !== undefined || line.res !== undefined)
  t.ok(requestLines.length > 0, 'request lines exist')
  t.ok(requestLines.every((line) => typeof line.reqId === 'string' && line.reqId !== ''), 'every request line has a reqId')
  t.ok(all.some((line) => line.reqId === 'req-by-query'), 'an X-Request-Id sent by the caller is the request id')

  assertNoToken(t, gateway, [publisher, queryToken, headerToken, xAuthToken, badToken])
  t.notOk(gateway.logText().includes(SECRET_DATA), 'no event data in any line')
  const leaks = gateway.logs.filter((line) => line.includes('PAYLOAD-7f3a9c1e'))
  t.same(leaks, [], 'not even a part of it')
})

t.test('a token under an encoded, differently cased or unusual parameter name never reaches the logs', async (t) => {
  const gateway = await startGateway(t, {}, { captureLogs: true })
  const { url } = gateway
  // The query parser decodes names, so each of these authenticates as ?token=.
  const encodedName = userToken('u1')
  const encodedLetter = userToken('u2')
  const t1 = await request(`${url}/v1/stream?%74oken=${encodedName}&topics=bad!`)
  t.equal(t1.status, 400, '%74oken= authenticated (then the topic was refused)')
  const t2 = await request(`${url}/v1/subscriptions?tok%65n=${encodedLetter}`, { method: 'POST', body: { topics: ['bad!'] } })
  t.equal(t2.status, 400, 'tok%65n= authenticated (then the topic was refused)')
  // These do not authenticate, but still carry a token into the URL.
  const others = [userToken('u3'), userToken('u4'), userToken('u5'), userToken('u6'), userToken('u7')]
  const urls = [
    `${url}/v1/stream?TOKEN=${others[0]}`,
    `${url}/v1/stream?access%5Ftoken=${others[1]}`,
    `${url}/v1/stream?jwt=${others[2]}`,
    `${url}/v1/stream?${others[3]}`,
    `${url}/v1/no-such-route?token=${others[4]}`
  ]
  for (const target of urls) t.ok((await request(target)).status >= 400, `refused: ${target.slice(url.length, url.length + 30)}…`)

  await eventually(() => lines(gateway).filter((line) => line.msg === 'request completed').length >= 7, 'a completion line per request')
  const redacted = lines(gateway).filter((line) => JSON.stringify(line.req ?? '').includes('[redacted]'))
  t.ok(redacted.length >= 6, `${redacted.length} request lines carry [redacted] where the token was`)
  assertNoToken(t, gateway, [encodedName, encodedLetter, ...others])
})

t.test('a token inside another parameter\'s value, in the path or as the request id never reaches the logs', async (t) => {
  const gateway = await startGateway(t, {}, { captureLogs: true })
  const { url } = gateway
  const tokens = [userToken('u1'), userToken('u2'), userToken('u3'), userToken('u4'), userToken('u5')]
  // A stray second '?' or a ';' keeps the token inside the value of `topics`.
  t.ok((await request(`${url}/v1/stream?topics=news?token=${tokens[0]}`)).status >= 400, 'stray ?')
  t.ok((await request(`${url}/v1/stream?topics=news;token=${tokens[1]}`)).status >= 400, 'stray ;')
  t.ok((await request(`${url}/nothing/${tokens[2]}`)).status >= 400, 'in the path')
  // The request id is taken from X-Request-Id only when it looks like one.
  const { stream } = await openConnected(`${url}/v1/stream`, { t, headers: { authorization: `Bearer ${tokens[3]}`, 'x-request-id': tokens[4] } })
  stream.close()
  await eventually(() => streamLines(gateway, 'stream closed').length === 1, 'the close line')
  const opened = streamLines(gateway, 'stream opened')[0]
  t.match(opened.reqId, /^req-/, 'an id of the gateway\'s own in place of the token')
  const long = await openConnected(`${url}/v1/stream?token=${userToken('u6')}`, { t, headers: { 'x-request-id': 'r'.repeat(129) } })
  long.stream.close()
  await eventually(() => streamLines(gateway, 'stream opened').length === 2, 'the second open line')
  t.match(streamLines(gateway, 'stream opened')[1].reqId, /^req-/, 'nor an over-long one')
  await openConnected(`${url}/v1/stream?token=${userToken('u7')}`, { t, headers: { 'x-request-id': 'trace-42.a:b_c' } })
  await eventually(() => streamLines(gateway, 'stream opened').length === 3, 'the third open line')
  t.equal(streamLines(gateway, 'stream opened')[2].reqId, 'trace-42.a:b_c', 'an ordinary request id is kept')
  await eventually(() => lines(gateway).filter((line) => line.msg === 'request completed').length >= 3, 'a completion line per request')
  assertNoToken(t, gateway, tokens)
})

t.test('redactUrl: token parameters and JWT values replaced, the rest kept as sent', async (t) => {
  const jwt = userToken('u1')
  t.equal(redactUrl('/v1/stream?topics=a,b&token=abc'), '/v1/stream?topics=a,b&token=[redacted]')
  t.equal(redactUrl('/v1/stream?%74%6Fken=abc&x=1'), '/v1/stream?%74%6Fken=[redacted]&x=1')
  t.equal(redactUrl('/v1/stream?Access_Token=abc'), '/v1/stream?Access_Token=[redacted]')
  t.equal(redactUrl(`/v1/stream?t=${jwt}&lastEventId=5`), '/v1/stream?t=[redacted]&lastEventId=5')
  t.equal(redactUrl(`/v1/stream?t=${encodeURIComponent(jwt).replace('e', '%65')}`), '/v1/stream?t=[redacted]')
  t.equal(redactUrl(`/v1/stream?${jwt}`), '/v1/stream?[redacted]')
  t.equal(redactUrl('/v1/stream?topics=%E0%A4%A&token'), '/v1/stream?topics=%E0%A4%A&token', 'a malformed escape is kept, not thrown on')
  t.equal(redactUrl('/v1/stream'), '/v1/stream')
  t.equal(redactUrl(`/v1/stream?topics=news?token=${jwt}&x=1`), '/v1/stream?topics=[redacted]&x=1', 'a JWT inside a value')
  t.equal(redactUrl(`/v1/x/${jwt}/y?a=1`), '/v1/x/[redacted]/y?a=1', 'a JWT in the path')
  t.equal(redactUrl(`/v1/x/${jwt}`), '/v1/x/[redacted]')
  t.equal(redactUrl(`/v1/x/${jwt.replace(/\./g, '%2E')}?a=1`), '/v1/x/[redacted]?a=1', 'a JWT in the path with its dots encoded')
  t.equal(redactUrl('/v1/x/%41b/eyJ'), '/v1/x/%41b/eyJ', 'a path without a JWT is kept as sent')
  const dotsEncoded = jwt.replace(/\./g, '%2E')
  t.equal(redactUrl(`/v1/stream?x=${dotsEncoded}%ZZ&y=1`), '/v1/stream?x=[redacted]&y=1', 'a malformed escape beside it does not hide a JWT in a value')
  t.equal(redactUrl(`/v1/x/${dotsEncoded}%E0%A4`), '/v1/x/[redacted]%E0%A4', 'nor in the path')
  t.equal(redactUrl(`/v1/stream?${jwt}=1&x=2`), '/v1/stream?[redacted]&x=2', 'a JWT as a parameter\'s name, with a value')
  t.equal(redactUrl(`/v1/stream?a=1&${dotsEncoded}=x`), '/v1/stream?a=1&[redacted]', 'encoded')
  t.equal(redactUrl(`/v1/stream?token%3D${jwt}=x`), '/v1/stream?[redacted]', 'inside a name')
})

t.test('a token as a path parameter, percent-encoded in a path or in a request Node refuses never reaches the logs', async (t) => {
  const gateway = await startGateway(t, {}, { captureLogs: true })
  const { url } = gateway
  // Short enough (no iat) to pass as a stream id, so the refusal names it.
  const asId = token({ sub: 'u1', iat: undefined })
  t.ok(asId.length <= 128, `a ${asId.length}-character token fits an id`)
  const tokens = [asId, userToken('u2'), userToken('u3'), userToken('u4'), userToken('u5')]
  t.equal((await request(`${url}/v1/stream/${asId}`, { token: tokens[1] })).status, 404, 'no such stream')
  t.equal((await request(`${url}/nothing/${tokens[2].replace(/\./g, '%2E')}`)).status, 404, 'dots percent-encoded')
  t.equal((await request(`${url}/nothing/%65${tokens[3].slice(1)}`)).status, 404, 'a letter percent-encoded')
  // A control character in a header: Node refuses the request before Fastify sees it.
  const refused = await rawExchange(gateway.port, `GET /v1/stream?token=${tokens[4]} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${tokens[1]}\r\nX-A: a\u0001b\r\n\r\n`)
  t.equal(refused.response().status, 400, 'Node answers 400')
  await eventually(() => lines(gateway).some((line) => line.msg === 'request refused by the HTTP parser'), 'the refusal logged')
  await eventually(() => lines(gateway).filter((line) => line.msg === 'request completed').length >= 3, 'a completion line per request')
  assertNoToken(t, gateway, tokens)
})

t.test('a token put where an id or a topic goes is not echoed in the error answer either', async (t) => {
  const gateway = await startGateway(t)
  const { url } = gateway
  // No iat or exp: short enough to pass as an id or a topic, so the refusals name it.
  const asId = token({ sub: 'u1', iat: undefined }, { ttlS: null })
  t.ok(asId.length <= 128, `a ${asId.length}-character token fits an id and a topic`)
  const limited = userToken('u1', { topics: ['news'] })
  const refusals = [
    await request(`${url}/v1/stream/${asId}`, { token: asId }),
    await request(`${url}/v1/jobs/${asId}`, { token: asId }),
    await request(`${url}/v1/subscriptions`, { method: 'POST', token: asId, body: { topics: ['news'], connectionId: asId } }),
    await request(`${url}/v1/stream?topics=${asId}`, { token: limited })
  ]
  t.same(refusals.map((answer) => answer.status), [404, 404, 404, 403], 'each refused')
  for (const answer of refusals) {
    const { message } = answer.json as { message: string }
    t.notOk(answer.text.includes(asId.split('.')[2]), `no token in "${message}"`)
    t.match(message, /\[redacted\]/, 'the token replaced where it was')
  }
})

t.test('X-Forwarded-For without TRUST_PROXY: one warning naming TRUST_PROXY; with it set, none', async (t) => {
  const untrusting = await startGateway(t, {}, { captureLogs: true })
  const trusting = await startGateway(t, { TRUST_PROXY: '127.0.0.1' }, { captureLogs: true })
  for (const gateway of [untrusting, trusting]) {
    // Refused (401) requests are logged, so the lines after the warning show it was written.
    for (let n = 0; n < 2; n++) t.equal((await request(`${gateway.url}/v1/stats`, { headers: { 'x-forwarded-for': '203.0.113.7' } })).status, 401)
    await eventually(() => lines(gateway).filter((line) => line.msg === 'request completed').length >= 2, 'both requests logged')
  }
  const warnings = (gateway: Gateway): LogLine[] => lines(gateway).filter((line) => String(line.msg).includes('TRUST_PROXY is unset'))
  t.equal(warnings(untrusting).length, 1, 'warned once')
  t.equal(warnings(trusting).length, 0, 'not when the proxy is trusted')
})

t.test('a trusted proxy\'s X-Forwarded-For holding a token instead of an address: logged as a digest, never as sent', async (t) => {
  const gateway = await startGateway(t, { TRUST_PROXY: '127.0.0.1' }, { captureLogs: true })
  const asAddress = userToken('u-xff')
  const { stream } = await openConnected(`${gateway.url}/v1/stream`, { t, headers: { authorization: `Bearer ${userToken('u-xff')}`, 'x-forwarded-for': asAddress } })
  stream.close()
  t.equal((await request(`${gateway.url}/v1/jobs/nope`, { headers: { 'x-forwarded-for': `10.0.0.1, ${asAddress}` } })).status, 401)
  // A well-formed address is logged as it is; one with its port, without it.
  t.equal((await request(`${gateway.url}/v1/jobs/nope`, { headers: { 'x-forwarded-for': '203.0.113.9' } })).status, 401)
  t.equal((await request(`${gateway.url}/v1/jobs/nope`, { headers: { 'x-forwarded-for': '198.51.100.4:50123' } })).status, 401)
  t.equal((await request(`${gateway.url}/v1/jobs/nope`, { headers: { 'x-forwarded-for': '[2001:db8::7]:443' } })).status, 401)
  await eventually(() => streamLines(gateway, 'stream closed').length === 1 && streamLines(gateway, 'request completed').length >= 4, 'the stream and the requests logged')
  assertNoToken(t, gateway, [asAddress])
  const addresses = [...streamLines(gateway, 'stream opened').map((line) => line.remoteAddress), ...streamLines(gateway, 'request completed').map((line) => (line.req as { remoteAddress?: unknown } | undefined)?.remoteAddress)]
  t.match(addresses, [/^other:[\w-]{22}$/], 'the stream\'s address is a digest')
  t.ok(addresses.filter((address) => typeof address === 'string' && address.startsWith('other:')).length >= 2, `the refused request's too (${addresses.join(', ')})`)
  t.ok(addresses.includes('203.0.113.9'), 'an address is logged as sent')
  t.ok(addresses.includes('198.51.100.4') && addresses.includes('2001:db8::7'), 'an address with its port, as the address')
})

t.test('redactUrl: a path or a value made of many "eyJ" without dots is handled in one pass', { timeout: 20_000 }, async (t) => {
  // Quadratic matching would take minutes on this; one pass takes milliseconds.
  const run = 'eyJ'.repeat(200_000)
  t.equal(redactUrl(`/x/${run}?a=${run}`), `/x/${run}?a=${run}`, 'no JWT in it, kept as sent')
  t.equal(redactUrl(`/x/${run}.a.b`), '/x/[redacted]', 'with two dots after it, it is one')
})

t.test('close lines carry the reason: evicted, expired, slow', async (t) => {
  const gateway = await startGateway(t, {
    MAX_CONNECTIONS_PER_USER: '1', CONNECTION_LIMIT_POLICY: 'evict-oldest', MAX_BUFFERED_BYTES: String(128 * 1024)
  }, { captureLogs: true })
  const { url, port, app } = gateway
  const { stream: evicted, connected: evictedInfo } = await openConnected(`${url}/v1/stream?token=${userToken('u1')}`, { t })
  await openConnected(`${url}/v1/stream?token=${userToken('u1')}`, { t })
  await evicted.nextEvent('evicted')
  // At least a second to open in: `nowS() + 1` may be a few ms away, and the open is then refused (401).
  const expiringToken = token({ sub: 'u2', exp: secondsAhead(1) })
  const { stream: expiring, connected: expiringInfo } = await openConnected(`${url}/v1/stream?token=${expiringToken}`, { t })
  await expiring.nextEvent('auth-expired', 8000)
  const slow = await neverReadingStream(t, url, port, 'u3')
  await flood(url, { user: 'u3' }, () => app.registry.get(slow.connectionId) === undefined, floodMaxBytes(128 * 1024))
  await eventually(async () => metricValue(await scrape(url), 'sse_slow_consumer_drops_total') === 1, 'the slow consumer to be dropped', 10_000)

  await eventually(() => streamLines(gateway, 'stream closed').length >= 3, 'three close lines')
  const reasons = Object.fromEntries(streamLines(gateway, 'stream closed').map((line) => [line.connectionId, line]))
  t.equal(reasons[evictedInfo.connectionId]?.reason, 'evicted')
  t.equal(reasons[expiringInfo.connectionId]?.reason, 'expired')
  t.equal(reasons[slow.connectionId]?.reason, 'slow')
  t.ok((reasons[slow.connectionId]?.bytes as number) > 0, 'the slow close line says how much it was sent')
  assertNoToken(t, gateway, [expiringToken])
  t.notOk(gateway.logText().includes('#0:xxxx'), 'no flood data in the logs')
})

forEachMode(t, 'a rejected Redis ingress message is logged without its data', async (t) => {
  const [gateway] = await startCluster(t, 'redis', 1, {}, { captureLogs: true })
  const redis = redisClient(t)
  const prefix = gateway.app.config.redisPrefix
  await redis.xadd(`${prefix}ingress`, '*', 'payload', JSON.stringify({ to: { user: 'u1' }, event: 'bad name', data: SECRET_DATA }))
  await redis.xadd(`${prefix}ingress`, '*', 'payload', `{"to":{"user":"u1"},"data":"${SECRET_DATA}"`)
  await eventually(() => streamLines(gateway, 'ingress message dropped').length >= 2, 'two ingress drops logged', 10_000)
  t.notOk(gateway.logText().includes(SECRET_DATA), 'no event data in any line')
}, ['redis'])

t.test('a refused request is one line, at completion, with its status, code and reason; a 503 is not an error with a stack', async (t) => {
  const gateway = await startGateway(t, { MAX_CONNECTIONS: '1' }, { captureLogs: true })
  const refused = await request(`${gateway.url}/v1/stream?token=not-a-jwt`, { headers: { 'x-request-id': 'probe-401' } })
  t.equal(refused.status, 401)
  await openConnected(`${gateway.url}/v1/stream?token=${userToken('u1')}`, { t })
  const full = await request(`${gateway.url}/v1/stream?token=${userToken('u2')}`, { headers: { 'x-request-id': 'probe-503' } })
  t.equal(full.status, 503)
  await eventually(() => lines(gateway).some((line) => line.reqId === 'probe-503'), 'the 503\'s line')
  const of401 = lines(gateway).filter((line) => line.reqId === 'probe-401')
  t.equal(of401.length, 1, 'one line for the 401')
  t.match(of401[0], { msg: 'request completed', level: 30, res: { statusCode: 401 }, code: 'GW_UNAUTHORIZED', reason: 'token is malformed' })
  const of503 = lines(gateway).filter((line) => line.reqId === 'probe-503')
  t.equal(of503.length, 1, 'one line for the 503')
  t.match(of503[0], { msg: 'request completed', level: 30, res: { statusCode: 503 }, reason: /maximum number of streams/ })
  t.notOk(of503.some((line) => 'err' in line), 'no error object, no stack')
})

t.test('a token whose header starts with whitespace (it authenticates) is redacted wherever it is sent: path, query, X-Request-Id, the refusal\'s message', async (t) => {
  const gateway = await startGateway(t, {}, { captureLogs: true })
  const encode = (text: string): string => Buffer.from(text).toString('base64url')
  const tokens = ['{ "alg": "HS256", "typ": "JWT" }', '\n{"alg":"HS256"}', ' {"alg":"HS256"}'].map((header) => {
    const signed = `${encode(header)}.${encode(JSON.stringify({ sub: 'u1', exp: nowS() + 3600 }))}`
    return `${signed}.${createHmac('sha256', TEST_SECRET).update(signed).digest('base64url')}`
  })
  for (const jwt of tokens) {
    t.notOk(jwt.startsWith('eyJ'), 'a header that is not base64url of {"')
    const { stream } = await openConnected(`${gateway.url}/v1/stream?token=${jwt}`, { t, headers: { 'x-request-id': jwt } })
    stream.close()
    // Refused (400 or 404 "no stream <id>"), with the id in the message.
    t.ok((await request(`${gateway.url}/v1/stream/${jwt}?a=${jwt}`, { token: jwt })).status >= 400)
    t.equal((await request(`${gateway.url}/no/such/${jwt}?a=${jwt}`)).status, 404)
  }
  await eventually(() => streamLines(gateway, 'stream closed').length === tokens.length, 'the streams\' closes logged')
  assertNoToken(t, gateway, tokens)
})

t.test('redactUrl and withoutJwts: dotted names that only look like a header (exchange.rates.usd, example.com.au) are kept; a whitespace-header token glued after - or _ is not', async (t) => {
  const encode = (text: string): string => Buffer.from(text).toString('base64url')
  const jwt = `${encode('{ "alg":"HS256"}')}.${encode('{"sub":"u1"}')}.c2ln`
  t.equal(redactUrl('/v1/stream?topics=exchange.rates.usd&h=example.com.au&f=export.csv.gz'), '/v1/stream?topics=exchange.rates.usd&h=example.com.au&f=export.csv.gz')
  t.equal(withoutJwts('topic exchange.rates.usd is not allowed'), 'topic exchange.rates.usd is not allowed')
  t.equal(withoutJwts(`no stream abc-${jwt}`), 'no stream [redacted]')
  t.equal(withoutJwts(`no stream x_${jwt}`), 'no stream [redacted]')
})

forEachMode(t, 'requests whose client reset the connection at once (a tab closed while its stream opens): no error line, no 500', async (t, mode) => {
  const [gateway] = await startCluster(t, mode, 1, { RATE_LIMIT_STREAMS_PER_MIN: '100000', RATE_LIMIT_PUBLISH_PER_MIN: '100000' }, { captureLogs: true })
  const user = userToken('gone')
  const publisher = publisherToken()
  const body = JSON.stringify({ to: { user: 'gone' }, data: 1 })
  for (let n = 0; n < 30; n++) {
    const socket = connect(gateway.port, '127.0.0.1')
    await once(socket, 'connect')
    socket.write(n % 2 === 0
      ? `GET /v1/stream?token=${user} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n`
      : `POST /v1/publish HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer ${publisher}\r\nContent-Type: application/json\r\nContent-Length: ${body.length}\r\n\r\n${body}`)
    socket.resetAndDestroy()
    await once(socket, 'close')
  }
  // Each of them has been handled (or dropped) once the gateway answers one after them.
  await openConnected(`${gateway.url}/v1/stream?token=${user}`, { t })
  await eventually(() => gateway.app.registry.size === 1, 'the streams opened for gone clients to close')
  const serious = lines(gateway).filter((line) => Number(line.level) >= 50 || (line.res as { statusCode?: number } | undefined)?.statusCode === 500)
  t.same(serious.map((line) => `${String(line.msg)}: ${String((line.err as { message?: string } | undefined)?.message)}`), [], 'nothing logged as an error')
})
