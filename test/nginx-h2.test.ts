/**
 * The HTTPS listener with HTTP/2 that deploy/nginx.conf ships commented out,
 * enabled as its README section says (uncommented, with a certificate where
 * its lines point), in front of two Redis-mode gateways: many streams share
 * one connection, which over HTTP/1.1 a browser caps at six per host.
 */
import t, { type Test } from 'tap'
import { readFile } from 'node:fs/promises'
import {
  eventually,
  publishOk,
  publisherToken,
  userToken,
  type ConnectedData
} from './helpers'
import { connectH2, negotiatedProtocol, openH2Stream, type H2SseStream } from './helpers/h2'
import {
  haveNginx,
  LISTEN_LINE,
  NGINX_CONF,
  startGatewayProcess,
  startNginx,
  tlsLines,
  UPSTREAM_LINES,
  type Nginx,
  type StackGateway
} from './helpers/nginx'
import { launchBrowser, needChromium, pageEventSource, type PageRecorder } from './helpers/browser'
import { needRedis, uniquePrefix } from './helpers/redis'

const publisher = publisherToken()

interface Stack {
  /** Their internal listeners (publish), never reached through nginx. */
  internalUrls: [string, string]
  gateways: [StackGateway, StackGateway]
  nginx: Nginx
  https: NonNullable<Nginx['https']>
}

/** Two gateways of one cluster, as docker-compose.yml runs them, and nginx in front with its HTTPS listener on. */
async function startTlsStack (t: Test): Promise<Stack> {
  const prefix = uniquePrefix('nginx-h2')
  const a = await startGatewayProcess(t, prefix)
  const b = await startGatewayProcess(t, prefix)
  const nginx = await startNginx(t, [`127.0.0.1:${a.port}`, `127.0.0.1:${b.port}`], { tls: true })
  if (nginx.https === null) throw new Error('nginx started without its HTTPS listener')
  return { internalUrls: [a.internalUrl, b.internalUrl], gateways: [a, b], nginx, https: nginx.https }
}

/** The lines of deploy/nginx.conf that the running config changed, trimmed. */
async function changedLines (nginx: Nginx): Promise<string[]> {
  const original = (await readFile(NGINX_CONF, 'utf8')).split('\n')
  const running = nginx.config.split('\n')
  if (running.length !== original.length) throw new Error(`the running config has ${running.length} lines, deploy/nginx.conf ${original.length}`)
  return original.filter((line, index) => line !== running[index]).map((line) => line.trim())
}

/** nginx's access log lines for streams, as `<path> <protocol> <status>`. */
function streamLogLines (nginx: Nginx): string[] {
  return [...nginx.stdout().matchAll(/"GET (\/v1\/stream) (HTTP\/[\d.]+)" (\d+)/g)].map((match) => `${match[1]} ${match[2]} ${match[3]}`)
}

t.test('the HTTPS listener ships commented out, under a marker, next to the plain one', async (t) => {
  const source = await readFile(NGINX_CONF, 'utf8')
  const lines = source.split('\n').map((line) => line.trim())
  const tls = tlsLines(source)
  t.equal(tls.length, 3, 'listen, ssl_certificate and ssl_certificate_key')
  t.match(tls[0], /^# listen 443 ssl http2;$/, 'HTTP/2 as a listen parameter, which nginx 1.22 understands (it has no `http2 on;`)')
  const first = lines.indexOf(tls[0])
  t.same(lines.slice(first, first + 3), tls, 'the three lines together')
  t.match(lines[first - 1], /^# --- .*\(tests substitute these lines\) ---$/, 'under a marker')
  // In the plain listener's server block: the same locations serve both.
  const listen = lines.indexOf(LISTEN_LINE)
  const between = lines.slice(listen + 1, first)
  t.ok(listen !== -1 && listen < first, 'after `listen 80;`')
  t.notOk(between.some((line) => /^(server|location)\b/.test(line)), 'with no server or location block in between')
  t.equal(lines.filter((line) => /^server\s*\{/.test(line)).length, 1, 'one server block: the locations are not duplicated')
  for (const line of UPSTREAM_LINES) t.ok(lines.includes(line), `the upstream line "${line}" is still there`)
})

t.test('through nginx over HTTPS with HTTP/2 (deploy/nginx.conf, HTTPS listener enabled)', async (t) => {
  if (!(await haveNginx(t, { tls: true })) || !(await needRedis(t))) return
  const { internalUrls, gateways, nginx, https } = await startTlsStack(t)

  t.test('the running config is the committed one with the marked lines changed, the HTTPS ones only uncommented', async (t) => {
    const tls = tlsLines(await readFile(NGINX_CONF, 'utf8'))
    t.same(await changedLines(nginx), [...UPSTREAM_LINES, 'listen 80;', ...tls])
    const running = nginx.config.split('\n').map((line) => line.trim())
    t.ok(running.includes(`listen 127.0.0.1:${https.port} ssl http2;`), 'the listen line keeps its parameters')
    t.ok(running.includes(tls[1].slice(2)) && running.includes(tls[2].slice(2)), 'the certificate lines keep their paths')
  })

  t.test('ten streams on one HTTP/2 connection each get connected, then every event published, in order; a Last-Event-ID reconnect on it replays', async (t) => {
    t.equal(await negotiatedProtocol(https), 'h2', 'offered h2 and http/1.1, nginx picks h2 (ALPN)')
    const session = await connectH2(t, https)
    t.equal(session.alpnProtocol, 'h2', 'the session negotiated h2')

    const user = 'u-h2'
    const path = `/v1/stream?token=${userToken(user)}`
    const count = 10
    const streams: H2SseStream[] = await Promise.all(Array.from({ length: count }, async () => await openH2Stream(session, path, { t })))
    t.same(streams.map((stream) => stream.status), Array(count).fill(200), `all ${count} streams open with 200`)
    t.match(streams[0].headers['content-type'], /^text\/event-stream/)
    t.equal(streams[0].headers['cache-control'], 'no-cache, no-transform')
    t.notOk(streams[0].headers.connection, 'no Connection header on HTTP/2 (nginx drops the hop-by-hop one)')
    const connected = await Promise.all(streams.map(async (stream) => JSON.parse((await stream.nextEvent('connected')).data) as ConnectedData))
    t.equal(new Set(connected.map((entry) => entry.connectionId)).size, count, 'ten distinct gateway connections')
    t.ok(connected.every((entry) => entry.userId === user), 'all of the user')

    const ids = await publishOk(internalUrls[0], publisher, [1, 2, 3].map((k) => ({ to: { user }, event: 'note', data: { k } })))
    for (const [index, stream] of streams.entries()) {
      const events = await stream.take(3)
      t.same(events.map((event) => [event.event, event.id, JSON.parse(event.data)]), ids.map((id, k) => ['note', id, { k: k + 1 }]),
        `stream ${index + 1} receives the three events, in order, with their ids`)
    }

    const replay = await openH2Stream(session, path, { t, headers: { 'last-event-id': ids[0] } })
    t.equal(replay.status, 200, 'an eleventh stream opens on the same connection with Last-Event-ID')
    await replay.nextEvent('connected')
    const replayed = await replay.take(2)
    t.same(replayed.map((event) => event.id), ids.slice(1), 'it replays the events after the cursor')
    const [live] = await publishOk(internalUrls[1], publisher, { to: { user }, event: 'note', data: { k: 4 } })
    t.equal((await replay.next()).id, live, 'then goes live')

    for (const stream of [...streams, replay]) stream.close()
    await eventually(() => streamLogLines(nginx).length >= count + 1, 'nginx\'s access log lines for the streams')
    t.same(streamLogLines(nginx), Array(count + 1).fill('/v1/stream HTTP/2.0 200'), 'nginx logged each stream as HTTP/2.0, without its query string')
    const token = userToken(user)
    t.notOk(nginx.stdout().includes(token) || nginx.stderr().includes(token), 'no token in nginx\'s logs')
    for (const gateway of gateways) t.notOk(gateway.stdout().includes(token), 'nor in the gateways\'')
  })
})

t.test('Chromium over HTTPS through nginx: the page arrives over h2 and its eight EventSources all connect and receive', async (t) => {
  if (!(await haveNginx(t, { tls: true })) || !needChromium(t) || !(await needRedis(t))) return
  const { internalUrls, nginx, https } = await startTlsStack(t)
  const browser = await launchBrowser(t, ['--ignore-certificate-errors'])
  const page = await browser.newPage()
  await page.goto(`${https.url}/demo`)
  // A string: this project compiles without DOM types.
  const protocol = await page.evaluate('performance.getEntriesByType("navigation")[0].nextHopProtocol')
  t.equal(protocol, 'h2', 'the page was loaded over HTTP/2')

  // Over HTTP/1.1 the seventh and eighth would wait for a free connection
  // (six per host); over HTTP/2 they share one.
  const user = 'u-h2-browser'
  const count = 8
  const recorders: PageRecorder[] = []
  for (let index = 0; index < count; index++) {
    recorders.push(await pageEventSource(page, `/v1/stream?token=${encodeURIComponent(userToken(user))}`, { names: ['connected', 'note'] }))
  }
  for (const [index, recorder] of recorders.entries()) {
    const [connected] = await recorder.waitEvents('connected', 1)
    t.match(JSON.parse(connected.data ?? 'null'), { userId: user }, `EventSource ${index + 1} gets connected`)
  }
  const [id] = await publishOk(internalUrls[0], publisher, { to: { user }, event: 'note', data: { text: 'to every tab' } })
  for (const [index, recorder] of recorders.entries()) {
    const [note] = await recorder.waitEvents('note', 1)
    t.same([note.lastEventId, JSON.parse(note.data ?? 'null')], [id, { text: 'to every tab' }], `EventSource ${index + 1} gets the event published after`)
  }

  await page.evaluate('for (const source of window.__sources) source.close()')
  await eventually(() => streamLogLines(nginx).length >= count, 'nginx\'s access log lines for the page\'s streams')
  t.same(streamLogLines(nginx), Array(count).fill('/v1/stream HTTP/2.0 200'), 'each EventSource went over HTTP/2')
  t.same(browser.problems, [], 'no page errors')
})
