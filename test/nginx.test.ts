/**
 * The real nginx (Debian's package) running deploy/nginx.conf in front of two
 * gateway processes in Redis mode, as docker-compose.yml deploys them: public
 * port behind nginx, publish routes on INTERNAL_PORT, TRUST_PROXY set to
 * nginx's address.
 */
import t, { type Test } from 'tap'
import {
  freePort,
  openStream,
  publishOk,
  publisherToken,
  request,
  spawnServer,
  TEST_SECRET,
  userToken,
  eventually,
  type ServerProcess,
  type ConnectedData,
  type SseClient
} from './helpers'
import { readFile } from 'node:fs/promises'
import {
  hardFileLimit,
  LISTEN_LINE,
  NGINX_CONF,
  haveNginx,
  PROXY_HTTP_VERSION_LINE,
  SHUTDOWN_TIMEOUT_LINE,
  startGatewayProcess,
  startNginx,
  UPSTREAM_LINES,
  WORKER_PROCESSES_LINE,
  type Nginx,
  type NginxOptions,
  type StackGateway
} from './helpers/nginx'
import { needRedis, uniquePrefix } from './helpers/redis'
import { launchBrowser, needChromium, pageEventSource, startServerOnPort, type PageRecord } from './helpers/browser'
import { metricValue, scrape } from './helpers/raw'

interface LogLine {
  msg?: string
  reqId?: string
  req?: { method?: string, url?: string, remoteAddress?: string }
  res?: { statusCode?: number }
  connectionId?: string
  userId?: string
  remoteAddress?: string
}

/** pino's JSON lines from a process's stdout. */
function logLines (text: string): LogLine[] {
  const lines: LogLine[] = []
  for (const line of text.split('\n')) {
    if (!line.startsWith('{')) continue
    try {
      lines.push(JSON.parse(line) as LogLine)
    } catch {
      // A line still being written.
    }
  }
  return lines
}

interface Stack {
  gateways: [StackGateway, StackGateway]
  nginx: Nginx
}

/** Two gateways of one cluster (a fresh Redis prefix) and nginx in front of them. */
async function startStack (t: Test, env: Record<string, string> = {}, options: NginxOptions = {}): Promise<Stack> {
  const prefix = uniquePrefix('nginx')
  const a = await startGatewayProcess(t, prefix, env)
  const b = await startGatewayProcess(t, prefix, env)
  const nginx = await startNginx(t, [`127.0.0.1:${a.port}`, `127.0.0.1:${b.port}`], options)
  return { gateways: [a, b], nginx }
}

/** The lines of deploy/nginx.conf that the running config changed, trimmed. */
async function changedLines (nginx: Nginx): Promise<string[]> {
  const original = (await readFile(NGINX_CONF, 'utf8')).split('\n')
  const running = nginx.config.split('\n')
  if (running.length !== original.length) throw new Error(`the running config has ${running.length} lines, deploy/nginx.conf ${original.length}`)
  return original.filter((line, index) => line !== running[index]).map((line) => line.trim())
}

function streamOpenedLine (gateways: readonly ServerProcess[], connectionId: string): LogLine | undefined {
  for (const gateway of gateways) {
    const line = logLines(gateway.stdout()).find((entry) => entry.msg === 'stream opened' && entry.connectionId === connectionId)
    if (line !== undefined) return line
  }
  return undefined
}

const publisher = publisherToken()

t.test('every line a test may substitute in deploy/nginx.conf is marked there as one', async (t) => {
  const lines = (await readFile(NGINX_CONF, 'utf8')).split('\n').map((line) => line.trim())
  const substitutable: string[] = [...UPSTREAM_LINES, LISTEN_LINE, WORKER_PROCESSES_LINE, SHUTDOWN_TIMEOUT_LINE, PROXY_HTTP_VERSION_LINE]
  for (const line of substitutable) {
    const index = lines.indexOf(line)
    t.ok(index !== -1, `holds "${line}"`)
    // The nearest marker above it, with only other substitutable lines in between.
    let above = index - 1
    while (above >= 0 && substitutable.includes(lines[above])) above--
    t.match(lines[above] ?? '', /^# --- .*\(tests substitute th(is line|ese lines)\) ---$/, `"${line}" sits under a marker`)
  }
})

t.test('through nginx (deploy/nginx.conf) in front of two Redis-mode gateways', async (t) => {
  if (!(await haveNginx(t)) || !(await needRedis(t))) return
  const { gateways, nginx } = await startStack(t)

  t.test('the config under test is deploy/nginx.conf with only its three marked lines changed', async (t) => {
    t.same(await changedLines(nginx), [...UPSTREAM_LINES, 'listen 80;'])
    const running = nginx.config.split('\n')
    for (const directive of ['proxy_buffering off;', 'proxy_http_version 1.1;', 'proxy_set_header Connection "";', 'proxy_read_timeout 1h;', 'proxy_set_header X-Forwarded-For   $proxy_add_x_forwarded_for;']) {
      t.ok(running.some((line) => line.trim().startsWith(directive)), `keeps ${directive}`)
    }
  })

  t.test('events arrive one by one without buffering: each is received through nginx before the next is published', async (t) => {
    const user = 'u-nobuffer'
    const stream = await openStream(`${nginx.url}/v1/stream?token=${userToken(user)}`, {
      t,
      // nginx's gzip is off in the config: a compressing proxy would hold events back.
      headers: { 'accept-encoding': 'gzip' }
    })
    t.equal(stream.status, 200, 'the stream opens through nginx')
    t.match(stream.headers['content-type'], /^text\/event-stream/, 'content type passes through')
    t.equal(stream.headers['cache-control'], 'no-cache, no-transform', 'cache-control passes through')
    t.notOk(stream.headers['content-encoding'], 'nginx does not compress the stream')
    await stream.nextEvent('connected')
    for (let k = 1; k <= 5; k++) {
      // Alternate the instance that accepts the publish: Redis carries it to the stream's instance.
      const gateway = gateways[k % 2]
      const [id] = await publishOk(gateway.internalUrl, publisher, { to: { user }, event: 'tick', data: { k } })
      // Event k+1 is published only once event k came out of nginx: no buffer could have held it.
      const event = await stream.nextEvent('tick', 5000)
      t.equal(event.id, id, `event ${k} arrives with its id before event ${k + 1} is published`)
      t.same(JSON.parse(event.data), { k }, `event ${k} carries its data`)
    }
    t.same(stream.unread(), [], 'nothing else arrived')
  })

  t.test('Last-Event-ID replay through nginx: a reconnect gets exactly the missed events, in order', async (t) => {
    const user = 'u-replay'
    const url = `${nginx.url}/v1/stream?token=${userToken(user)}`
    const first = await openStream(url, { t })
    t.equal(first.status, 200)
    await first.nextEvent('connected')
    const early = await publishOk(gateways[0].internalUrl, publisher, [
      { to: { user }, event: 'note', data: { k: 1 } },
      { to: { user }, event: 'note', data: { k: 2 } }
    ])
    const read = [await first.nextEvent('note'), await first.nextEvent('note')]
    t.same(read.map((event) => event.id), early, 'the first two events arrive')
    const cursor = read[1].id ?? ''
    first.close()

    const missed = await publishOk(gateways[1].internalUrl, publisher, [
      { to: { user }, event: 'note', data: { k: 3 } },
      { to: { user }, event: 'note', data: { k: 4 } },
      { to: { user }, event: 'note', data: { k: 5 } }
    ])
    const second = await openStream(url, { t, headers: { 'last-event-id': cursor } })
    t.equal(second.status, 200, 'the reconnect opens through nginx')
    await second.nextEvent('connected')
    const replayed = await second.take(3)
    t.same(replayed.map((event) => event.event), ['note', 'note', 'note'], 'no reset: the three missed events follow connected')
    t.same(replayed.map((event) => event.id), missed, 'exactly the missed ids, in order')
    t.same(replayed.map((event) => JSON.parse(event.data) as unknown), [{ k: 3 }, { k: 4 }, { k: 5 }], 'with their data')
    // Nothing doubled or extra after them: the next event is a live one published now.
    const [live] = await publishOk(gateways[0].internalUrl, publisher, { to: { user }, event: 'note', data: { k: 6 } })
    const next = await second.next()
    t.equal(next.id, live, 'the next event after the replay is the live one')
  })

  t.test('the client address from X-Forwarded-For reaches the gateway log; the token reaches no log', async (t) => {
    const user = 'u-xff'
    const token = userToken(user)
    const stream = await openStream(`${nginx.url}/v1/stream?token=${token}`, { t, headers: { 'x-forwarded-for': '203.0.113.7' } })
    t.equal(stream.status, 200)
    const connected = JSON.parse((await stream.nextEvent('connected')).data) as ConnectedData
    await eventually(() => streamOpenedLine(gateways, connected.connectionId) !== undefined, 'the gateway\'s "stream opened" log line')
    const line = streamOpenedLine(gateways, connected.connectionId)
    t.equal(line?.remoteAddress, '203.0.113.7', 'the stream is logged with the client\'s forwarded address, not nginx\'s')
    t.equal(line?.userId, user)
    stream.close()
    // nginx writes its access log line when the request ends.
    await eventually(() => nginx.stdout().includes('"GET /v1/stream HTTP/1.1" 200'), 'nginx\'s access log line for the stream')
    t.notOk(nginx.stdout().includes(token), 'nginx\'s access log holds no token')
    t.notOk(nginx.stdout().includes('token='), 'nginx\'s access log holds no query string')
    for (const gateway of gateways) t.notOk(gateway.stdout().includes(token), 'the gateway log holds no token')
  })

  t.test('publisher and admin routes are not reachable through nginx: 404 in the gateway\'s JSON error shape', async (t) => {
    const blocked: Array<[string, string, unknown?]> = [
      ['POST', '/v1/publish', { to: { broadcast: true }, data: 'x' }],
      ['GET', '/v1/connections'],
      ['PUT', '/v1/conversations/c1/members', { members: ['u1'] }],
      ['GET', '/v1/presence/u1'],
      ['GET', '/v1/stats'],
      ['GET', '/metrics'],
      ['GET', '/admin'],
      ['PUT', '/v1/jobs/j1', { status: 'running' }]
    ]
    for (const [method, path, body] of blocked) {
      const response = await request(`${nginx.url}${path}`, { method, token: publisher, body })
      t.equal(response.status, 404, `${method} ${path}: 404`)
      t.match(response.headers.get('content-type'), /^application\/json/, `${method} ${path}: JSON`)
      t.same(response.json, { statusCode: 404, code: 'GW_NOT_FOUND', error: 'Not Found', message: 'not found' }, `${method} ${path}: in the gateway's own error shape`)
    }
  })
})

t.test('through nginx with one gateway down, its error log holds no token (its lines carry the whole request line)', async (t) => {
  if (!(await haveNginx(t)) || !(await needRedis(t))) return
  const prefix = uniquePrefix('nginx-down')
  const up = await startGatewayProcess(t, prefix, {})
  // A port nobody listens on: nginx's connect to it fails.
  const down = await freePort()
  const nginx = await startNginx(t, [`127.0.0.1:${up.port}`, `127.0.0.1:${down}`])
  const token = userToken('u-down')
  for (let attempt = 0; attempt < 4; attempt++) {
    const stream = await openStream(`${nginx.url}/v1/stream?token=${token}`, { t })
    t.equal(stream.status, 200, 'served by the gateway that is up')
    stream.close()
  }
  await eventually(() => (nginx.stdout().match(/"GET \/v1\/stream HTTP\/1\.1" 200/g) ?? []).length === 4, 'nginx\'s access log lines')
  t.notOk(nginx.stderr().includes(token), 'nginx\'s error log holds no token')
  t.notOk(nginx.stderr().includes('token='), 'nor any query string')
})

t.test('through nginx, the stream rate limit is keyed by the forwarded client address', async (t) => {
  if (!(await haveNginx(t)) || !(await needRedis(t))) return
  const { gateways, nginx } = await startStack(t, { RATE_LIMIT_STREAMS_PER_MIN: '2' })
  const url = `${nginx.url}/v1/stream?token=${userToken('u-limit')}`
  const clientA = '203.0.113.7'
  const clientB = '198.51.100.23'

  // nginx spreads the opens over both instances, and the limit counts them
  // together: open as A until each instance has answered A with 429 (read
  // from its own log).
  const refusedIds = (gateway: ServerProcess, address: string): string[] => {
    const lines = logLines(gateway.stdout())
    return lines.filter((line) => line.msg === 'request completed' && line.res?.statusCode === 429 && line.req?.remoteAddress === address)
      .map((line) => line.reqId ?? '')
  }
  const openedFor = (gateway: ServerProcess, address: string): number =>
    logLines(gateway.stdout()).filter((line) => line.msg === 'stream opened' && line.remoteAddress === address).length
  const limitedFor = (gateway: ServerProcess, address: string): boolean => refusedIds(gateway, address).length > 0
  const statuses: number[] = []
  for (let attempt = 0; attempt < 12 && !gateways.every((gateway) => limitedFor(gateway, clientA)); attempt++) {
    const stream = await openStream(url, { t, headers: { 'x-forwarded-for': clientA } })
    statuses.push(stream.status)
    if (stream.status === 200) await stream.nextEvent('connected')
    else t.equal(stream.json<{ statusCode: number }>().statusCode, 429, 'a refused open answers the JSON 429 body')
    stream.close()
    // Each answer so far is in some instance's log (opened, or refused) before deciding whether to go on.
    await eventually(() => gateways.reduce((sum, gateway) => sum + openedFor(gateway, clientA) + refusedIds(gateway, clientA).length, 0) >= statuses.length,
      'the gateways\' log lines for client A\'s opens')
  }
  t.ok(statuses.includes(429), `client A is limited (statuses ${statuses.join(', ')})`)
  t.ok(gateways.every((gateway) => limitedFor(gateway, clientA)), 'both instances limited client A')
  const opened = gateways.map((gateway) => openedFor(gateway, clientA))
  t.equal(opened[0] + opened[1], 2, `the two instances opened 2 streams for client A in all (${opened.join(' + ')})`)

  // Client B, behind the same nginx (same peer address), is not limited by A's opens.
  for (let index = 0; index < 2; index++) {
    const stream = await openStream(url, { t, headers: { 'x-forwarded-for': clientB } })
    t.equal(stream.status, 200, `client B's open ${index + 1} is accepted while A is limited`)
    if (stream.status !== 200) continue
    const connected = JSON.parse((await stream.nextEvent('connected')).data) as ConnectedData
    await eventually(() => streamOpenedLine(gateways, connected.connectionId) !== undefined, 'the "stream opened" log line')
    t.equal(streamOpenedLine(gateways, connected.connectionId)?.remoteAddress, clientB, 'logged with client B\'s address')
    stream.close()
  }
})

t.test('through nginx, a client that stops reading is still seen by the gateway as a slow consumer (nginx holds no backlog)', async (t) => {
  if (!(await haveNginx(t)) || !(await needRedis(t))) return
  // A small history: the large events below need not stay in Redis.
  const { gateways, nginx } = await startStack(t, { HISTORY_SIZE: '5', HISTORY_TTL_S: '60', MAX_BUFFERED_BYTES: '1048576' })
  const user = 'u-slow'
  const stream = await openStream(`${nginx.url}/v1/stream?token=${userToken(user)}`, { t })
  t.equal(stream.status, 200)
  const connected = JSON.parse((await stream.nextEvent('connected')).data) as ConnectedData
  stream.pause()
  const closedSlow = (): boolean => gateways.some((gateway) => logLines(gateway.stdout())
    .some((line) => line.msg === 'stream closed' && line.connectionId === connected.connectionId && (line as { reason?: string }).reason === 'slow'))
  // With proxy_buffering on, nginx would spool up to proxy_max_temp_file_size (1 GiB)
  // and the gateway would never see the backlog. With it off, nginx holds one
  // buffer and only the sockets' kernel buffers can absorb: well under 60 MiB.
  const chunk = 'x'.repeat(200_000)
  let published = 0
  for (; published < 300 && !closedSlow(); published++) {
    await publishOk(gateways[published % 2].internalUrl, publisher, { to: { user }, event: 'bulk', data: chunk })
  }
  await eventually(closedSlow, 'the gateway closing the stream as a slow consumer', 10_000)
  t.ok(closedSlow(), `the gateway closed the paused stream as slow after ${published} events of 200 kB`)
  stream.close()
})

t.test('X-Forwarded-For from a peer that is not a trusted proxy changes neither the logged address nor the limit', async (t) => {
  const cases: Array<{ name: string, env: Record<string, string> }> = [
    { name: 'no TRUST_PROXY', env: {} },
    { name: 'TRUST_PROXY names another proxy', env: { TRUST_PROXY: '192.0.2.1' } }
  ]
  for (const { name, env } of cases) {
    t.test(name, async (t) => {
      const gateway = await spawnServer(t, { JWT_SECRET: TEST_SECRET, HOST: '127.0.0.1', LOG_LEVEL: 'info', RATE_LIMIT_STREAMS_PER_MIN: '2', ...env })
      const url = `${gateway.url}/v1/stream?token=${userToken('u-spoof')}`
      const first = await openStream(url, { t, headers: { 'x-forwarded-for': '203.0.113.7' } })
      t.equal(first.status, 200)
      const connected = JSON.parse((await first.nextEvent('connected')).data) as ConnectedData
      await eventually(() => streamOpenedLine([gateway], connected.connectionId) !== undefined, 'the "stream opened" log line')
      t.equal(streamOpenedLine([gateway], connected.connectionId)?.remoteAddress, '127.0.0.1', 'the peer\'s own address is logged, not the spoofed one')
      t.notOk(gateway.stdout().includes('203.0.113.7'), 'the spoofed address appears in no log line')
      first.close()
      const second = await openStream(url, { t, headers: { 'x-forwarded-for': '203.0.113.8' } })
      t.equal(second.status, 200)
      second.close()
      const third = await openStream(url, { t, headers: { 'x-forwarded-for': '203.0.113.9' } })
      t.equal(third.status, 429, 'a third open is limited although it claims yet another address')
      third.close()
    })
  }
})

t.test('through nginx started under a soft limit of 256 open files, its one worker holds 300 streams (worker_rlimit_nofile)', async (t) => {
  if (!(await haveNginx(t)) || !(await needRedis(t))) return
  const wanted = Number(/^\s*worker_rlimit_nofile\s+(\d+);/m.exec(await readFile(NGINX_CONF, 'utf8'))?.[1] ?? 0)
  if (process.getuid?.() !== 0 && hardFileLimit() < wanted) {
    // Only a root master may raise its workers' limit past the hard one.
    const reason = `not root, and the hard limit of open files (${hardFileLimit()}) is below worker_rlimit_nofile (${wanted})`
    if (process.env.CI === 'true') t.fail(reason)
    else t.plan(0, `skipped: ${reason}`)
    return
  }
  const prefix = uniquePrefix('nginx-nofile')
  const a = await startGatewayProcess(t, prefix, {})
  const b = await startGatewayProcess(t, prefix, {})
  // One worker, so that all the streams below are its own: 300 streams are 600 connections.
  const nginx = await startNginx(t, [`127.0.0.1:${a.port}`, `127.0.0.1:${b.port}`], { workerProcesses: 1, softFileLimit: 256 })
  t.same(await changedLines(nginx), ['worker_processes auto;', ...UPSTREAM_LINES, 'listen 80;'], 'only marked lines changed')

  const count = 300
  const streams: SseClient[] = []
  t.teardown(() => { for (const stream of streams) stream.close() })
  const failed: string[] = []
  let opened = 0
  // In batches, and none after a batch with a failure: a worker out of files
  // may leave opens to run out their timeout.
  for (let from = 0; from < count && failed.length === 0; from += 50) {
    await Promise.all(Array.from({ length: Math.min(50, count - from) }, async (_unused, offset) => {
      const index = from + offset
      try {
        const stream = await openStream(`${nginx.url}/v1/stream?token=${userToken(`u-nofile-${index}`)}`)
        streams.push(stream)
        if (stream.status !== 200) throw new Error(`status ${stream.status}`)
        await stream.nextEvent('connected')
        opened++
      } catch (error) {
        failed.push(`stream ${index}: ${(error as Error).message}`)
      }
    }))
  }
  t.equal(opened, count, `every stream opens with 200 and gets its connected event${failed.length > 0 ? ` (${failed.length} failed, first: ${failed[0]})` : ''}`)
  t.notMatch(nginx.stderr(), /Too many open files/, 'nginx does not run out of files')
  t.notOk(nginx.stderr().includes('token='), 'nginx\'s error log holds no token')
  for (const stream of streams) stream.close()
})

t.test('through nginx, a reload ends the streams of the old workers after worker_shutdown_timeout; the reconnect replays what they missed', async (t) => {
  if (!(await haveNginx(t)) || !(await needRedis(t))) return
  const prefix = uniquePrefix('nginx-reload')
  const a = await startGatewayProcess(t, prefix, {})
  const b = await startGatewayProcess(t, prefix, {})
  // 1s rather than 30s: the test waits it out.
  const nginx = await startNginx(t, [`127.0.0.1:${a.port}`, `127.0.0.1:${b.port}`], { shutdownTimeout: '1s' })
  t.same(await changedLines(nginx), ['worker_shutdown_timeout 30s;', ...UPSTREAM_LINES, 'listen 80;'], 'only marked lines changed')

  const user = 'u-reload'
  const url = `${nginx.url}/v1/stream?token=${userToken(user)}`
  const before = await openStream(url, { t })
  t.equal(before.status, 200)
  await before.nextEvent('connected')
  const [seen] = await publishOk(a.internalUrl, publisher, { to: { user }, event: 'note', data: { k: 1 } })
  t.equal((await before.nextEvent('note')).id, seen, 'the stream is live before the reload')

  // What `nginx -s reload` sends: the master starts new workers and tells the old ones to finish.
  nginx.child.kill('SIGHUP')
  const ended = await before.waitEnd(10_000).then(() => true, () => false)
  t.ok(ended, 'the stream opened before the reload is closed within 10 s')
  before.close()

  const [missed] = await publishOk(b.internalUrl, publisher, { to: { user }, event: 'note', data: { k: 2 } })
  const after = await openStream(url, { t, headers: { 'last-event-id': before.lastEventId } })
  t.equal(after.status, 200, 'the reconnect opens through the new workers')
  await after.nextEvent('connected')
  t.equal((await after.nextEvent('note')).id, missed, 'and gets the event published while it was away')
  t.equal(nginx.child.exitCode, null, 'the master runs on')
})

/**
 * Two gateways behind nginx, the first full (MAX_CONNECTIONS=1, held by a
 * stream opened on it directly): it answers 503, as a restarting or draining
 * gateway does.
 */
async function oneGatewayFull (t: Test, name: string): Promise<{ full: StackGateway, other: StackGateway, nginx: Nginx, filler: SseClient }> {
  const prefix = uniquePrefix(name)
  const full = await startGatewayProcess(t, prefix, { MAX_CONNECTIONS: '1' })
  const other = await startGatewayProcess(t, prefix, {})
  const nginx = await startNginx(t, [`127.0.0.1:${full.port}`, `127.0.0.1:${other.port}`])
  // Opened directly: nginx does not count it, and keeps sending streams to the full gateway.
  const filler = await openStream(`${full.url}/v1/stream?token=${userToken('filler')}`, { t })
  t.equal(filler.status, 200)
  return { full, other, nginx, filler }
}

t.test('through nginx, a stream one gateway refuses with 503 (here: MAX_CONNECTIONS reached) is opened on the other, since EventSource never retries a 503', async (t) => {
  if (!(await haveNginx(t)) || !(await needRedis(t))) return
  const { full, nginx } = await oneGatewayFull(t, 'nginx-503')
  const refused = await request(`${full.url}/v1/stream?token=${userToken('direct')}`)
  t.equal(refused.status, 503, 'the full gateway refuses streams')
  const statuses: number[] = []
  for (let index = 0; index < 6; index++) {
    const stream = await openStream(`${nginx.url}/v1/stream?token=${userToken(`u503-${index}`)}`, { t })
    statuses.push(stream.status)
    await stream.nextEvent('connected')
  }
  t.same(statuses, [200, 200, 200, 200, 200, 200], 'every stream opened through nginx')
})

t.test('through nginx, a stream the only reachable gateway refuses with 503 (full) while the other is down gets a 503, whichever nginx asks first; never a closed connection', async (t) => {
  if (!(await haveNginx(t)) || !(await needRedis(t))) return
  const { full, other, nginx } = await oneGatewayFull(t, 'nginx-503-down')
  other.child.kill('SIGKILL')
  await other.waitExit(10_000)
  const answers: Array<number | string> = []
  const bodies = new Set<string>()
  // least_conn with equal counts takes turns: ten requests ask each gateway first about half the time.
  for (let index = 0; index < 10; index++) {
    const answer = await request<{ code?: unknown }>(`${nginx.url}/v1/stream?token=${userToken(`u503-down-${index}`)}`).catch((error: unknown) => String(error))
    if (typeof answer === 'string') {
      answers.push(answer)
      continue
    }
    answers.push(answer.status)
    t.match(answer.json, { statusCode: 503, code: 'GW_UNAVAILABLE', error: 'Service Unavailable', message: String }, `answer ${index}: in the JSON shape (${answer.text})`)
    t.ok(answer.headers.get('retry-after') !== null, `answer ${index}: with Retry-After`)
    bodies.add(answer.text)
  }
  t.same(answers, Array(10).fill(503), `every stream refused with 503, as ${full.url} refused it`)
  // One body is the gateway's own refusal, the other nginx's (the full gateway's 503 passed over before the other turned out down).
  t.ok(bodies.has('{"statusCode":503,"code":"GW_UNAVAILABLE","error":"Service Unavailable","message":"no gateway could answer right now"}'), 'nginx\'s own 503 came too, in the same shape')
  // The case that turned into a closed connection: the full gateway asked first, its 503 passed over, then the other refused.
  const askedInOrder = [...nginx.stdout().matchAll(/upstream=(\S+), (\S+)/g)].map((match) => `${match[1]} ${match[2]}`)
  t.ok(askedInOrder.includes(`127.0.0.1:${full.port} 127.0.0.1:${other.port}`), `nginx asked the full gateway first at least once (${askedInOrder.length} requests went to both)`)
})

t.test('through nginx, a gateway that once refused a stream is not shut out: with the other one gone, new streams still open on it', async (t) => {
  if (!(await haveNginx(t)) || !(await needRedis(t))) return
  // Full for a moment: nginx asks the other gateway.
  const { full: once, other, nginx, filler } = await oneGatewayFull(t, 'nginx-fails')
  for (let index = 0; index < 2; index++) {
    const stream = await openStream(`${nginx.url}/v1/stream?token=${userToken(`early-${index}`)}`, { t })
    t.equal(stream.status, 200, 'opened on the other gateway')
    await stream.nextEvent('connected')
  }
  filler.close()
  await eventually(async () => metricValue(await scrape(once.internalUrl), 'sse_connections') === 0, 'the gateway to take streams again')
  other.child.kill('SIGKILL')
  await other.exited
  const late = await openStream(`${nginx.url}/v1/stream?token=${userToken('late')}`, { t })
  t.equal(late.status, 200, 'the gateway left serves the new stream (nginx did not keep it marked down)')
  t.equal(JSON.parse((await late.nextEvent('connected')).data).userId, 'late')
})

t.test('behind nginx left at its default upstream HTTP/1.0: streams open, events come through unbuffered and in order, and a replay works', async (t) => {
  if (!(await haveNginx(t)) || !(await needRedis(t))) return
  const { gateways, nginx } = await startStack(t, {}, { upstreamHttp10: true })
  t.same(await changedLines(nginx), [...UPSTREAM_LINES, 'listen 80;', PROXY_HTTP_VERSION_LINE], 'only the upstream HTTP version differs from the tested config')
  const user = 'u-http10'
  const stream = await openStream(`${nginx.url}/v1/stream?token=${userToken(user)}`, { t })
  t.equal(stream.status, 200)
  await stream.nextEvent('connected')
  const ids: string[] = []
  for (let k = 1; k <= 3; k++) {
    const [id] = await publishOk(gateways[k % 2].internalUrl, publisher, { to: { user }, event: 'tick', data: { k } })
    ids.push(id)
    // Event k+1 is published only once event k came out of nginx.
    t.equal((await stream.nextEvent('tick', 5000)).id, id, `event ${k} arrives before the next is published`)
  }
  stream.close()
  const again = await openStream(`${nginx.url}/v1/stream?token=${userToken(user)}`, { t, headers: { 'last-event-id': ids[0] } })
  await again.nextEvent('connected')
  t.same([(await again.nextEvent('tick')).id, (await again.nextEvent('tick')).id], ids.slice(1), 'the replay after the cursor, in order')
})

t.test('through nginx with every gateway unreachable: other routes get 503 in the JSON shape with Retry-After, not nginx\'s HTML 502; a stream gets no answer at all', async (t) => {
  if (!(await haveNginx(t)) || !(await needRedis(t))) return
  const up = await startGatewayProcess(t, uniquePrefix('nginx-none'), {})
  const down = await freePort()
  const nginx = await startNginx(t, [`127.0.0.1:${up.port}`, `127.0.0.1:${down}`])
  up.child.kill('SIGKILL')
  await up.waitExit(10_000)
  for (const path of ['/health', '/v1/jobs/j1']) {
    const answer = await request(`${nginx.url}${path}`)
    t.equal(answer.status, 503, `${path}: 503`)
    t.equal(answer.headers.get('retry-after'), '3', 'Retry-After')
    t.match(answer.headers.get('content-type'), /^application\/json/)
    t.same(answer.json, { statusCode: 503, code: 'GW_UNAVAILABLE', error: 'Service Unavailable', message: 'no gateway could answer right now' })
  }
  // An EventSource ends for good on a 503, and retries a connection closed unanswered.
  for (const path of [`/v1/stream?token=${userToken('u1')}`, `/v1/jobs/stream?token=${userToken('u1')}`]) {
    const failure = await request(`${nginx.url}${path}`).then((answer) => `answered ${answer.status}`, (error: unknown) => error)
    t.type(failure, TypeError, `${path.split('?')[0]}: the connection closed without an answer (${String(failure)})`)
  }
})

t.test('in Chromium, through nginx over HTTP/1.1 and over HTTPS with HTTP/2, a page\'s EventSource outlives an outage of every gateway: it retries and reconnects when one is back', async (t) => {
  if (!(await haveNginx(t, { tls: true })) || !needChromium(t)) return
  const env = { JWT_SECRET: TEST_SECRET, HOST: '127.0.0.1', RETRY_MS: '300', LOG_LEVEL: 'warn' }
  const port = await freePort()
  const first = await startServerOnPort(t, env, port)
  const nginx = await startNginx(t, [`127.0.0.1:${port}`, `127.0.0.1:${await freePort()}`], { tls: true })
  if (nginx.https === null) throw new Error('nginx started without its HTTPS listener')
  const browser = await launchBrowser(t, ['--ignore-certificate-errors'])
  const pages = await Promise.all([nginx.url, nginx.https.url].map(async (origin, n) => {
    const page = await browser.newPage()
    await page.goto(`${origin}/demo`)
    const recorder = await pageEventSource(page, `/v1/stream?token=${encodeURIComponent(userToken(`u-outage-${n}`))}`, { names: ['connected'] })
    await recorder.waitEvents('connected', 1)
    return { what: origin.startsWith('https') ? 'HTTP/2' : 'HTTP/1.1', recorder }
  }))

  first.child.kill('SIGKILL')
  await first.waitExit(10_000)
  for (const { what, recorder } of pages) {
    const failures = (): PageRecord[] => recorder.records.filter((record) => record.kind === 'error')
    // The first error is the stream's drop; the next ones are refused reconnects (or, refused with a 503, the end).
    await recorder.until(() => failures().length >= 3 || failures().some((record) => record.readyState === 2), `the drop and two failed reconnects over ${what} while no gateway answers`)
    t.same(failures().filter((record) => record.readyState === 2), [], `${what}: the EventSource kept retrying (readyState never CLOSED)`)
  }
  // What nginx did with them (its access log has the path without the query).
  for (const protocol of ['HTTP/1.1', 'HTTP/2.0']) t.match(nginx.stdout(), `"GET /v1/stream ${protocol}" 444`, `reconnects over ${protocol} closed unanswered`)

  await startServerOnPort(t, env, port)
  for (const { what, recorder } of pages) {
    await recorder.waitEvents('connected', 2, 15_000)
    t.pass(`${what}: it reconnected by itself once a gateway was back`)
  }
})
