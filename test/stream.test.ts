import t from 'tap'
import * as http from 'node:http'
import { rawConnect } from './helpers/raw'
import { keepaliveSchedule } from '../src/core/streams'
import { eventually, forEachMode, openConnected, openStream, publishOk, publisherToken, startCluster, startGateway, userToken, type SseEvent } from './helpers'

const publisher = publisherToken()

function assertIncreasing (t: tap.Test, events: SseEvent[]): void {
  let previous = 0n
  for (const event of events) {
    const id = BigInt(event.id ?? '0')
    if (id <= previous) {
      t.fail(`ids must strictly increase: ${String(previous)} then ${event.id ?? '(none)'}`)
      return
    }
    previous = id
  }
  t.pass(`${events.length} ids strictly increasing`)
}

t.test('a stream answers 200 with the exact SSE headers', async (t) => {
  const { url } = await startGateway(t)
  const stream = await openStream(`${url}/v1/stream?token=${userToken('u1')}`, { t })
  t.equal(stream.status, 200)
  t.equal(stream.headers['content-type'], 'text/event-stream; charset=utf-8')
  t.equal(stream.headers['cache-control'], 'no-cache, no-transform')
  t.equal(stream.headers['x-accel-buffering'], 'no')
  t.equal(stream.headers.connection, 'keep-alive')
})

forEachMode(t, 'headers and the first event are flushed at once: the head, `retry:` and `connected` come in one write, also when joining a new channel waits on Redis', async (t, mode) => {
  const [gateway] = await startCluster(t, mode, 1)
  for (let n = 0; n < 20; n++) {
    // A new user and topic each time: in Redis mode, channels this instance had not subscribed yet.
    const client = await rawConnect(t, gateway.port)
    client.write(`GET /v1/stream?token=${userToken(`at-once-${n}`)}&topics=at-once-${n} HTTP/1.1\r\nHost: x\r\n\r\n`)
    const first = await new Promise<string>((resolve) => client.socket.once('data', (chunk: Buffer) => resolve(chunk.toString())))
    t.match(first, /^HTTP\/1\.1 200 [^]*\r\n\r\n[0-9a-f]+\r\nretry: \d+\n\n\r\n[0-9a-f]+\r\nevent: connected\n/, `stream ${n}: the first chunk read holds the head and connected`)
    client.destroy()
  }
})

t.test('the first bytes are `retry: 3000` then `connected` (connectionId, userId, topics) with no id line, flushed without any publish', async (t) => {
  const { url } = await startGateway(t)
  const stream = await openStream(`${url}/v1/stream?token=${userToken('u1')}&topics=news,chat`, { t })
  const connected = await stream.nextEvent('connected')
  t.match(stream.text, /^retry: 3000\n\nevent: connected\ndata: \{[^\n]*\}\n\n/, 'retry block, then the connected block')
  t.same(stream.retries, [3000])
  t.equal(stream.events[0], connected, 'connected is the first event')
  t.equal(connected.id, undefined, 'connected has no id line')
  t.notMatch(connected.raw, /^id:/m)
  t.equal(stream.lastEventId, '', 'the browser cursor is not moved')
  const data = JSON.parse(connected.data) as { connectionId: string, userId: string, topics: string[] }
  t.match(data.connectionId, /^c_[A-Za-z0-9_-]+$/)
  t.equal(data.userId, 'u1')
  t.same([...data.topics].sort(), ['chat', 'news'])
})

t.test('a stream without topics says topics: []', async (t) => {
  const { url } = await startGateway(t)
  const { connected } = await openConnected(`${url}/v1/stream?token=${userToken('u1')}`, { t })
  t.same(connected.topics, [])
})

t.test('RETRY_MS sets the retry: value', async (t) => {
  const { url } = await startGateway(t, { RETRY_MS: '1234' })
  const stream = await openStream(`${url}/v1/stream?token=${userToken('u1')}`, { t })
  await stream.nextEvent('connected')
  t.match(stream.text, /^retry: 1234\n\n/)
  t.same(stream.retries, [1234])
})

t.test('an idle stream receives keepalive comments (KEEPALIVE_MS=200)', async (t) => {
  const { url } = await startGateway(t, { KEEPALIVE_MS: '200' })
  const stream = await openStream(`${url}/v1/stream?token=${userToken('u1')}`, { t })
  await stream.nextEvent('connected')
  await stream.until(() => stream.comments.length >= 2, 5000, 'two keepalive comments')
  t.same(stream.comments.slice(0, 2), ['keepalive', 'keepalive'])
  t.match(stream.text, /\n\n: keepalive\n\n/, 'a comment line in its own block')
  t.equal(stream.events.length, 1, 'comments dispatch no event')
})

t.test('no gap between two writes to an idle stream reaches KEEPALIVE_MS, whenever the stream opened; the checks leave room for a late timer', async (t) => {
  const keepaliveMs = 2000
  t.ok(keepaliveSchedule(keepaliveMs).checkEveryMs + keepaliveSchedule(keepaliveMs).idleAfterMs <= keepaliveMs * 0.6, 'the longest gap by the schedule: 7/12 of the interval')
  const { url } = await startGateway(t, { KEEPALIVE_MS: String(keepaliveMs) })
  // Opened at different points of the check's period.
  const arrivals = await Promise.all([0, 1, 2, 3, 4, 5].map(async (n) => {
    await new Promise<void>((resolve) => setTimeout(resolve, n * 170))
    const { stream } = await openConnected(`${url}/v1/stream?token=${userToken(`u${n}`)}`, { t })
    const times = [performance.now()]
    stream.socket?.on('data', () => times.push(performance.now()))
    await stream.until(() => stream.comments.length >= 3, 10_000, 'three keepalives')
    return times
  }))
  for (const [n, times] of arrivals.entries()) {
    const gaps = times.slice(1).map((at, i) => at - times[i])
    // 7/12 of the interval by the schedule, 0.9 checked: 630 ms of room for a late timer, while the
    // schedule before it (a check every half interval for streams idle for half of it) gives gaps of the whole interval.
    t.ok(gaps.every((gap) => gap < keepaliveMs * 0.9), `stream ${n}: longest gap ${Math.round(Math.max(...gaps))} ms`)
  }
})

t.test('published events carry a decimal id line; system events none', async (t) => {
  const { url } = await startGateway(t)
  const { stream } = await openConnected(`${url}/v1/stream?token=${userToken('u1')}`, { t })
  const [id] = await publishOk(url, publisher, { to: { user: 'u1' }, event: 'note', data: { n: 1 } })
  t.match(id, /^[1-9]\d*$/, 'the 202 answer holds a decimal id')
  const event = await stream.nextEvent('note')
  t.equal(event.id, id, 'the event carries the id the publisher got')
  t.match(event.raw, new RegExp(`^id: ${id}\nevent: note\ndata: \\{"n":1\\}$`))
  t.equal(stream.lastEventId, id)
  t.equal(stream.events.filter((item) => item.event === 'connected' && item.id !== undefined).length, 0)
})

t.test('an event without a name arrives as `message` with no event line', async (t) => {
  const { url } = await startGateway(t)
  const { stream } = await openConnected(`${url}/v1/stream?token=${userToken('u1')}`, { t })
  await publishOk(url, publisher, { to: { user: 'u1' }, data: 'plain' })
  const event = await stream.next()
  t.equal(event.event, 'message')
  t.equal(event.data, 'plain')
})

t.test('ids are strictly increasing per connection across user, users, broadcast and connection targets', async (t) => {
  const { url } = await startGateway(t)
  const { stream, connected } = await openConnected(`${url}/v1/stream?token=${userToken('u1')}`, { t })
  const { stream: sibling } = await openConnected(`${url}/v1/stream?token=${userToken('u1')}`, { t })
  const targets = [
    { user: 'u1' },
    { broadcast: true },
    { connection: connected.connectionId },
    { users: ['u2', 'u1'] }
  ]
  // Concurrent publishers, so the targets interleave however the gateway accepts them.
  const answers = await Promise.all(Array.from({ length: 40 }, async (_, n) =>
    await publishOk(url, publisher, { to: targets[n % targets.length], event: 'tick', data: { n } })))
  const toConnection = answers.filter((_, n) => n % targets.length === 2).flat()
  const events = await stream.take(40)
  t.equal(events.filter((event) => event.event === 'tick').length, 40, 'the stream gets all 40')
  assertIncreasing(t, events)
  t.same(new Set(events.map((event) => event.id)), new Set(answers.flat()), 'exactly the ids the publishers got')
  const siblingEvents = await sibling.take(30)
  assertIncreasing(t, siblingEvents)
  t.notOk(siblingEvents.some((event) => toConnection.includes(event.id ?? '')), 'the other stream of the user gets no connection-targeted event')
})

t.test('a user has several streams (tabs): every one receives the user events', async (t) => {
  const { url } = await startGateway(t)
  const tabs = await Promise.all([1, 2, 3].map(async () => (await openConnected(`${url}/v1/stream?token=${userToken('u1')}`, { t })).stream))
  const [id] = await publishOk(url, publisher, { to: { user: 'u1' }, event: 'hello', data: 'all tabs' })
  for (const tab of tabs) {
    const event = await tab.nextEvent('hello')
    t.equal(event.id, id)
    t.equal(event.data, 'all tabs')
  }
})

t.test('a rejected stream (no token) opens nothing: 401 JSON and the registry stays empty', async (t) => {
  const { url, app } = await startGateway(t)
  const stream = await openStream(`${url}/v1/stream`, { t })
  t.equal(stream.status, 401)
  t.match(stream.headers['content-type'], /^application\/json/)
  t.match(stream.json(), { statusCode: 401, error: 'Unauthorized', message: String })
  t.equal(app.registry.size, 0)
})

t.test('HEAD on a stream route opens nothing and does not get round the stream-open limit', async (t) => {
  const { url, app } = await startGateway(t, { RATE_LIMIT_STREAMS_PER_MIN: '2' })
  const user = userToken('u1')
  const first = await openStream(`${url}/v1/stream?token=${user}`, { t })
  t.equal(first.status, 200, 'a GET opens a stream')
  for (const path of ['/v1/stream', '/v1/stream/c_headcheck00000000', '/v1/jobs/stream', '/v1/jobs/job-1/stream']) {
    const response = await fetch(`${url}${path}?token=${user}`, { method: 'HEAD' })
    // /v1/jobs/stream matches the job state route's /v1/jobs/:jobId too, which takes HEAD; its own route comes first.
    t.same([response.status, response.headers.get('allow')], [405, 'GET'], `HEAD ${path}: 405, a GET route`)
    t.notMatch(response.headers.get('content-type') ?? '', /event-stream/, `HEAD ${path}: not a stream`)
    t.equal(await response.text(), '', `HEAD ${path}: no body`)
    const withoutToken = await fetch(`${url}${path}`, { method: 'HEAD' })
    t.same([withoutToken.status, withoutToken.headers.get('allow')], [405, 'GET'], `HEAD ${path} without a token: 405 too, not 401`)
  }
  t.equal(app.registry.size, 1, 'only the GET stream is open')
  t.equal((await openStream(`${url}/v1/stream?token=${user}`, { t })).status, 200, 'the second GET is within the limit')
  t.equal((await openStream(`${url}/v1/stream?token=${user}`, { t })).status, 429, 'the third is over it: HEADs did not count, and did not get past it')
})

/** A GET over `agent`: the status, the body and whether it went over a connection used before. */
async function agentGet (agent: http.Agent, url: string, headers: Record<string, string> = {}): Promise<{ status: number, body: string, reused: boolean }> {
  return await new Promise((resolve, reject) => {
    const request = http.get(url, { agent, headers, timeout: 10_000 }, (response) => {
      let body = ''
      response.setEncoding('utf8')
      response.on('data', (chunk: string) => { body += chunk })
      response.on('end', () => resolve({ status: response.statusCode ?? 0, body, reused: request.reusedSocket }))
      response.on('error', reject)
    })
    request.on('timeout', () => request.destroy(new Error('timed out')))
    request.on('error', reject)
  })
}

t.test('a connection whose stream the gateway ended (a finished job, an eviction) serves the next request of a keep-alive client', async (t) => {
  const { url, app } = await startGateway(t, { MAX_CONNECTIONS_PER_USER: '1', CONNECTION_LIMIT_POLICY: 'evict-oldest' })
  const agent = new http.Agent({ keepAlive: true, maxSockets: 1 })
  t.teardown(() => agent.destroy())
  const put = await fetch(`${url}/v1/jobs/done-job`, { method: 'PUT', headers: { authorization: `Bearer ${publisher}`, 'content-type': 'application/json' }, body: JSON.stringify({ userId: 'u1', status: 'completed' }) })
  t.equal(put.status, 200)
  const token = userToken('u1')
  for (let round = 0; round < 10; round++) {
    // A finished job's stream: connected, initial_status, then the gateway ends it.
    const job = await agentGet(agent, `${url}/v1/jobs/done-job/stream?token=${token}`)
    t.equal(job.status, 200)
    t.match(job.body, /event: initial_status\n/)
    const health = await agentGet(agent, `${url}/health`)
    t.same({ status: health.status, reused: health.reused }, { status: 200, reused: true }, `round ${round}: the next request goes over the same connection and is answered`)
  }

  // A stream evicted by the user's next one, opened on another connection.
  const evicted = agentGet(agent, `${url}/v1/stream?token=${token}`)
  await eventually(() => app.registry.ofUser('u1').length === 1, 'the first stream registered')
  const { stream: newer } = await openConnected(`${url}/v1/stream?token=${token}`, { t })
  const ended = await evicted
  t.match(ended.body, /event: evicted\n/)
  const after = await agentGet(agent, `${url}/health`)
  t.same({ status: after.status, reused: after.reused }, { status: 200, reused: true }, 'the evicted stream\'s connection serves the next request')
  newer.close()
})


t.test('a stream\'s connection is closed, not served again, when its request said Connection: close or bytes came while the stream held it', async (t) => {
  const { url, port, app } = await startGateway(t, { MAX_CONNECTIONS_PER_USER: '1', CONNECTION_LIMIT_POLICY: 'evict-oldest' })
  const put = await fetch(`${url}/v1/jobs/closing-job`, { method: 'PUT', headers: { authorization: `Bearer ${publisher}`, 'content-type': 'application/json' }, body: JSON.stringify({ userId: 'u1', status: 'failed', error: 'x' }) })
  t.equal(put.status, 200)
  const token = userToken('u1')

  const closing = await rawConnect(t, port)
  closing.write(`GET /v1/jobs/closing-job/stream?token=${token} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n`)
  await closing.waitClose()
  t.match(closing.text(), /event: initial_status\n[\s\S]*0\r\n\r\n$/, 'the whole answer, then the connection closed')
  t.equal(closing.response().headers.connection, 'close', 'and its head said so')

  // A request pipelined behind a live stream is never answered: the connection must not be left waiting.
  const piped = await rawConnect(t, port)
  piped.write(`GET /v1/stream?token=${token} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n`)
  await piped.until(() => piped.events().some((event) => event.event === 'connected'), 5000, 'connected')
  piped.write('GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n')
  await eventually(() => app.registry.ofUser('u1').length === 1, 'the first stream registered')
  const { stream: newer } = await openConnected(`${url}/v1/stream?token=${token}`, { t })
  await piped.waitClose()
  t.match(piped.text(), /event: evicted\n[\s\S]*0\r\n\r\n$/, 'evicted, the answer ended, the connection closed')
  t.notMatch(piped.text(), /HTTP\/1\.1 200 OK[\s\S]*HTTP\/1\.1/, 'the pipelined request was not half-served')
  t.equal(piped.response().headers.connection, 'keep-alive', 'a stream whose request did not ask to close says keep-alive')
  newer.close()
})
