import t, { type Test } from 'tap'
import { join } from 'node:path'
import { eventually, launch, openConnected, openStream, publishOk, publisherToken, request, spawnServer, startGateway, TEST_SECRET, userToken, type ServerProcess, type SseClient } from './helpers'
import { flood, floodData, floodMaxBytes, FLOOD_EVENT_BYTES, neverReadingStream, rawConnect } from './helpers/raw'
import { needRedis, REDIS_URL, startOwnRedis, uniquePrefix, type OwnRedis } from './helpers/redis'
import { listenInternal } from '../src/app'
import { StopSequence } from '../src/stop-sequence'
import type { StreamConnection } from '../src/core/connection'
import type { Gateway } from './helpers/gateway'

const SHUTDOWN_TIMEOUT_MS = 10_000

/** /ready (or a new stream) during or after the drain: refused, never served. */
async function refused (url: string): Promise<string> {
  try {
    const answer = await request(url)
    return String(answer.status)
  } catch (error) {
    const cause = (error as { cause?: { code?: string } }).cause
    return cause?.code ?? 'network error'
  }
}

/**
 * A stream of user `stalled` (on the listener of `port`) that stopped reading,
 * published to (through `publishUrl`) until the kernel takes no more: its end then
 * cannot flush, and a drain waits on it. (MAX_BUFFERED_BYTES 16 MB keeps it
 * from being dropped as slow first.)
 */
async function backedUpStream (t: Test, app: Gateway['app'], publishUrl: string, port: number): Promise<{ raw: Awaited<ReturnType<typeof neverReadingStream>>['raw'], connection: StreamConnection }> {
  const { raw, connectionId } = await neverReadingStream(t, publishUrl, port, 'stalled')
  const connection = app.registry.get(connectionId)
  if (connection === undefined) throw new Error('the stalled stream is not registered')
  const sink = connection['sink']
  for (let n = 0; sink.writableLength === 0; n++) {
    if (n * FLOOD_EVENT_BYTES > floodMaxBytes(16 * 1024 * 1024)) throw new Error('the stream never backed up')
    await publishOk(publishUrl, publisherToken(), { to: { user: 'stalled' }, event: 'flood', data: floodData(n) })
  }
  return { raw, connection }
}

for (const signal of ['SIGTERM', 'SIGINT'] as const) {
  t.test(`${signal}: every stream gets \`shutdown\` and ends, /ready stops answering 200, exit 0 within SHUTDOWN_TIMEOUT_MS`, async (t) => {
    const server = await spawnServer(t, {
      JWT_SECRET: TEST_SECRET,
      HOST: '127.0.0.1',
      SHUTDOWN_TIMEOUT_MS: String(SHUTDOWN_TIMEOUT_MS),
      LOG_LEVEL: 'info'
    })
    const streams: SseClient[] = []
    for (const user of ['u1', 'u2', 'u2']) streams.push((await openConnected(`${server.url}/v1/stream?token=${userToken(user)}`, { t })).stream)
    t.equal((await request(`${server.url}/ready`)).status, 200, 'ready before the signal')

    t.ok(server.child.kill(signal), `${signal} sent`)
    for (const [n, stream] of streams.entries()) {
      const event = await stream.nextEvent('shutdown', SHUTDOWN_TIMEOUT_MS)
      t.equal(event.id, undefined, `stream ${n}: shutdown carries no id line`)
      await stream.waitEnd(SHUTDOWN_TIMEOUT_MS)
      t.ok(stream.ended, `stream ${n}: ended by the server`)
      t.equal(stream.unread().length, 0, `stream ${n}: nothing after shutdown`)
    }
    const ready = await refused(`${server.url}/ready`)
    t.not(ready, '200', `/ready during or after the drain: ${ready}`)
    t.match(ready, /^(503|ECONNREFUSED|ECONNRESET|UND_ERR_SOCKET|network error)$/)
    const late = await openStream(`${server.url}/v1/stream?token=${userToken('u3')}`).catch((error: Error) => error)
    if (late instanceof Error) t.pass(`a new stream is refused (${late.message})`)
    else {
      t.not(late.status, 200, `a new stream is refused (${late.status})`)
      late.close()
    }

    const exit = await server.waitExit(SHUTDOWN_TIMEOUT_MS + 5000)
    t.same(exit, { code: 0, signal: null }, 'exit code 0')
    t.match(server.stdout(), /"msg":"stopped"/, 'the drain finished by itself')
    t.notMatch(server.stdout(), /drain timed out/, 'not by the shutdown deadline')
    t.equal(server.stderr(), '', 'nothing on stderr')
  })
}

t.test('stop signals in turn: the first drains, a second gives the drain up, any later one, or one once the drain is over, changes nothing', async (t) => {
  const during = new StopSequence()
  t.same([during.next(), during.next(), during.next()], ['drain', 'give up', 'ignore'])
  const after = new StopSequence()
  t.equal(after.next(), 'drain')
  after.drainOver()
  t.equal(after.next(), 'ignore', 'a signal while the last lines are written does not turn exit 0 into 1')
})

t.test('a stop signal that comes while the server\'s modules still load is kept: the start is abandoned and the process exits 0 (as PID 1 in a container, a signal without a handler is ignored)', async (t) => {
  for (const signal of ['SIGTERM', 'SIGINT'] as const) {
    const server = launch(t, { JWT_SECRET: TEST_SECRET, HOST: '127.0.0.1', PORT: '0', SLOW_LOAD_MS: '2000' }, 0, { nodeArgs: ['-r', join(__dirname, 'helpers', 'slow-load.js')], withoutRunnerPreload: true })
    await eventually(() => server.stderr().includes('loading fastify') || server.child.exitCode !== null, 'the server to be loading its modules')
    t.ok(server.child.kill(signal))
    t.same(await server.waitExit(15_000), { code: 0, signal: null }, `${signal}: exit 0, not killed by the signal`)
    t.notMatch(server.stdout(), /gateway ready/, 'it never started serving')
  }
})

t.test('Redis mode: SIGTERM with streams open logs no warning or error (a stop is not a lost subscription)', async (t) => {
  if (!(await needRedis(t))) return
  const server = await spawnServer(t, {
    JWT_SECRET: TEST_SECRET,
    HOST: '127.0.0.1',
    REDIS_URL,
    REDIS_PREFIX: uniquePrefix('cleanstop'),
    SHUTDOWN_TIMEOUT_MS: String(SHUTDOWN_TIMEOUT_MS),
    LOG_LEVEL: 'info'
  })
  const streams: SseClient[] = []
  for (const user of ['u1', 'u2']) streams.push((await openConnected(`${server.url}/v1/stream?token=${userToken(user)}`, { t })).stream)
  t.ok(server.child.kill('SIGTERM'))
  const exit = await server.waitExit(SHUTDOWN_TIMEOUT_MS + 5000)
  t.same(exit, { code: 0, signal: null }, 'exit code 0')
  const lines = server.stdout().split('\n').filter((line) => line !== '').map((line) => JSON.parse(line) as { level: number, msg: string })
  t.ok(lines.some((line) => line.msg === 'stopped'), 'stopped')
  t.same(lines.filter((line) => line.level >= 40).map((line) => line.msg), [], 'no line at warn or above')
})

t.test('a log reader that stopped reading: the gateway still serves, and SIGTERM still exits 0 (the unwritten lines are given up)', async (t) => {
  const server = await spawnServer(t, { JWT_SECRET: TEST_SECRET, HOST: '127.0.0.1', SHUTDOWN_TIMEOUT_MS: '2000', LOG_LEVEL: 'info' }, 20_000, { unreadStdout: true })
  // One log line each, far more than a pipe holds.
  for (let batch = 0; batch < 40; batch++) {
    const answers = await Promise.all(Array.from({ length: 100 }, async () => (await fetch(`${server.url}/v1/missing-${'x'.repeat(200)}`)).status))
    if (answers.some((status) => status !== 404)) t.fail(`batch ${batch}: ${answers.join(',')}`)
  }
  t.equal((await fetch(`${server.url}/health`)).status, 200, 'still serving with its log blocked')
  server.child.kill('SIGTERM')
  t.same(await server.waitExit(20_000), { code: 0, signal: null }, 'exited 0')
})

t.test('while a stream that stopped reading holds the drain, the listener stays open: /ready, publishes and new streams get 503 in the contract\'s shape, /health 200', async (t) => {
  const origin = 'https://app.example'
  // Half of it bounds how long the listener stays open: longer than the drain is held here.
  const { app, url, port } = await startGateway(t, { MAX_BUFFERED_BYTES: String(16 * 1024 * 1024), CORS_ORIGINS: origin, RETRY_MS: '60000' })
  const { raw, connection } = await backedUpStream(t, app, url, port)
  // fetch keeps its connections alive: the publishes after the first reuse one while it stays open.
  const refusals = new Set<string>()
  const publish = async (): Promise<number> => {
    const answer = await request(`${url}/v1/publish`, { token: publisherToken(), body: { to: { user: 'u1' }, event: 'note', data: 1 } })
    if (answer.status === 503) refusals.add(answer.text)
    return answer.status
  }
  const readableBy = new Set<string | null>()
  const openNew = async (): Promise<string> => {
    const answer = await request(`${url}/v1/stream?token=${userToken('u2')}`, { headers: { origin } })
    if (answer.status === 503) {
      refusals.add(answer.text)
      readableBy.add(answer.headers.get('access-control-allow-origin'))
    }
    return String(answer.status)
  }
  t.equal(await publish(), 202, 'a publish before the close')

  let drained = false
  const streamSocketClosed = connection.sinkClosed().then(() => { drained = true })
  const closing = app.close()
  const duringDrain: string[] = []
  // An answer that arrives once the drain is over may come from the closing listener.
  const whileDraining = async (answer: Promise<string>): Promise<void> => {
    const value = await answer
    if (!drained) duringDrain.push(value)
  }
  const health: string[] = []
  while (!drained) {
    await whileDraining(refused(`${url}/ready`))
    await whileDraining(publish().then(String, () => 'reset'))
    await whileDraining(openNew().catch(() => 'reset'))
    const alive = await refused(`${url}/health`)
    const metrics = await refused(`${url}/metrics`)
    if (!drained) health.push(alive, metrics)
    // Enough seen: the client reads again, its stream's end flushes, and the
    // drain ends, well before the force-close grace cuts everything.
    if (duringDrain.length >= 10) raw.resume()
    await new Promise<void>((resolve) => setTimeout(resolve, 50))
  }
  await streamSocketClosed
  await closing
  t.ok(duringDrain.length >= 10, `probed during the drain (${duringDrain.length} answers)`)
  t.same([...new Set(duringDrain)], ['503'], 'every answer during the drain was 503')
  t.same([...new Set(health)], ['200'], '/health and /metrics answered 200 throughout: the process is alive')
  t.same([...readableBy], [origin], 'a page of an allowed origin can read the refusal')
  t.same([...refusals].map((text) => JSON.parse(text)), [{ statusCode: 503, code: 'GW_UNAVAILABLE', error: 'Service Unavailable', message: 'the gateway is shutting down' }], 'every refusal in the contract\'s shape')
})

t.test('a stream that stopped reading holds the drain past half of RETRY_MS: the public listener then takes no connection, so streams reconnecting RETRY_MS after their `shutdown` are refused (which EventSource retries), not answered 503 (which ends it); the internal one still answers 503', async (t) => {
  const { app, url, port } = await startGateway(t, { MAX_BUFFERED_BYTES: String(16 * 1024 * 1024), RETRY_MS: '1000', INTERNAL_PORT: '0' })
  const internalServer = await listenInternal(app, 0, '127.0.0.1')
  const internalAddress = internalServer.address()
  if (internalAddress === null || typeof internalAddress === 'string') throw new Error('the internal listener has no TCP address')
  const internalUrl = `http://127.0.0.1:${internalAddress.port}`
  const { connection } = await backedUpStream(t, app, internalUrl, port)
  const reading = (await openConnected(`${url}/v1/stream?token=${userToken('u1')}`, { t })).stream
  let stalledClosed = false
  void connection.sinkClosed().then(() => { stalledClosed = true })
  const closing = app.close()
  await reading.nextEvent('shutdown', 5000)
  await reading.waitEnd(5000)
  // As the reading stream's EventSource would, until its connect is refused
  // (the stalled stream is cut only after 5 s, the grace).
  const answers: string[] = []
  await eventually(async () => {
    const answer = await refused(`${url}/v1/stream?token=${userToken('u1')}`)
    answers.push(answer)
    return answer === 'ECONNREFUSED'
  }, 'a reconnect to be refused', 4000)
  t.notOk(stalledClosed, 'while the stalled stream still holds the drain')
  // A connect that raced the listener's close is reset, which EventSource retries too.
  const notRetried = answers.filter((answer) => !/^(503|ECONNREFUSED|ECONNRESET|UND_ERR_SOCKET|network error)$/.test(answer))
  t.same(notRetried, [], `before that, 503s or dropped connections only (${answers.length} tries)`)
  t.equal(await refused(`${internalUrl}/ready`), '503', 'the internal listener, which no browser reaches, still answers 503')
  await closing
  t.ok(stalledClosed, 'the stalled stream was cut within the grace')
})

t.test('a stream that stopped reading and a request never finished do not outlast the stop: both are cut within the grace, and the stop completes before SHUTDOWN_TIMEOUT_MS', async (t) => {
  // Grace: half of 4 s. The deadline: 3.5 s. A 5 s wait on the stream would miss it.
  const server = await spawnServer(t, { JWT_SECRET: TEST_SECRET, HOST: '127.0.0.1', SHUTDOWN_TIMEOUT_MS: '4000', MAX_BUFFERED_BYTES: String(64 * 1024 * 1024), LOG_LEVEL: 'info' })
  await neverReadingStream(t, server.url, server.port, 'stalled')
  // More than the kernel holds on both ends: the stream's last frames cannot flush.
  await flood(server.url, { user: 'stalled' }, () => false, floodMaxBytes(0))
  const halfSent = await rawConnect(t, server.port)
  halfSent.write(`POST /v1/publish HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 100\r\nAuthorization: Bearer ${publisherToken()}\r\n\r\n{"to":`)

  t.ok(server.child.kill('SIGTERM'), 'SIGTERM sent')
  t.same(await server.waitExit(10_000), { code: 0, signal: null }, 'exit code 0')
  t.match(server.stdout(), /"msg":"stopped"/, 'the stop completed')
  t.notMatch(server.stdout(), /drain timed out/, 'not cut short by the deadline')
})

t.test('a second stop signal during a drain held by a stalled stream exits at once, with code 1 and a line saying so', async (t) => {
  for (const signal of ['SIGTERM', 'SIGINT'] as const) {
    const server = await spawnServer(t, { JWT_SECRET: TEST_SECRET, HOST: '127.0.0.1', SHUTDOWN_TIMEOUT_MS: '60000', MAX_BUFFERED_BYTES: String(64 * 1024 * 1024), LOG_LEVEL: 'info' })
    await neverReadingStream(t, server.url, server.port, 'stalled')
    // More than the kernel holds on both ends: the stream's last frames cannot
    // flush, so the drain would wait out its grace (5 s).
    await flood(server.url, { user: 'stalled' }, () => false, floodMaxBytes(0))
    t.ok(server.child.kill(signal))
    await eventually(() => server.stdout().includes('"msg":"draining"'), 'the drain to begin')
    t.ok(server.child.kill(signal))
    t.same(await server.waitExit(10_000), { code: 1, signal: null }, `${signal} twice: exit code 1`)
    t.match(server.stdout(), /second stop signal: exiting without finishing the drain/)
    t.notMatch(server.stdout(), /"msg":"stopped"/, 'the drain did not complete')
  }
})

t.test('a drain whose watermark does not come (Redis frozen) still sends `shutdown` within a short SHUTDOWN_TIMEOUT_MS', async (t) => {
  if (!(await needRedis(t))) return
  const { redis, server } = await spawnOnOwnRedis(t, { SHUTDOWN_TIMEOUT_MS: '1000', LOG_LEVEL: 'warn' })
  // Without an event: the drain asks for a watermark to give it a cursor.
  const { stream } = await openConnected(`${server.url}/v1/stream?token=${userToken('frozen-u1')}`, { t })
  redis.freeze()
  t.teardown(() => redis.thaw())
  t.ok(server.child.kill('SIGTERM'), 'SIGTERM sent')
  await stream.nextEvent('shutdown', 5000)
  t.pass('shutdown arrived, the watermark\'s wait bounded by the grace')
  await server.waitExit(10_000)
})

t.test('a stop against a Redis that froze completes on its own, not cut short by SHUTDOWN_TIMEOUT_MS: the lease steps and the unsubscribe do not wait on it', async (t) => {
  if (!(await needRedis(t))) return
  const { redis, server } = await spawnOnOwnRedis(t, {
    REDIS_COMMAND_TIMEOUT_MS: '1000',
    // Lease checks far apart: most often none is in flight when Redis freezes,
    // so the stop itself meets the frozen Redis (the hand-over, the unsubscribe).
    INSTANCE_TTL_MS: '60000',
    // Above the stop's own waits (a hand-over's PUBLISH timed out, 1 s for the
    // UNSUBSCRIBE), below the bus's detection of a silent subscriber (about
    // 8 s), which was what ended an UNSUBSCRIBE waiting on a frozen Redis.
    SHUTDOWN_TIMEOUT_MS: '6000',
    LOG_LEVEL: 'info'
  })
  await eventually(() => /took the ingress lease/.test(server.stdout()), 'the instance to hold the ingress lease')
  redis.freeze()
  t.teardown(() => redis.thaw())
  t.ok(server.child.kill('SIGTERM'), 'SIGTERM sent')
  t.same(await server.waitExit(20_000), { code: 0, signal: null }, 'exit code 0')
  t.match(server.stdout(), /"msg":"stopped"/, 'the stop completed')
  t.notMatch(server.stdout(), /drain timed out/, 'not cut short by the deadline')
})

/** A gateway process on a Redis server of its own, which the test may freeze. */
async function spawnOnOwnRedis (t: Test, env: Record<string, string>): Promise<{ redis: OwnRedis, server: ServerProcess }> {
  const redis = await startOwnRedis(t)
  const server = await spawnServer(t, { JWT_SECRET: TEST_SECRET, HOST: '127.0.0.1', REDIS_URL: redis.url, ...env })
  return { redis, server }
}
