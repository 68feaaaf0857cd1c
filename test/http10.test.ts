/**
 * Streams for HTTP/1.0 clients, nginx's default to an upstream: the same
 * events without chunked coding, the body ended by the connection's close.
 */
import t from 'tap'
import { adminToken, eventually, loggedAs, publishOk, publisherToken, startGateway, userToken } from './helpers'
import { rawConnect, rawExchange, type RawClient } from './helpers/raw'

const publisher = publisherToken()

async function openHttp10 (t: Parameters<typeof rawConnect>[0], port: number, userId: string, headers = ''): Promise<RawClient> {
  const client = await rawConnect(t, port)
  client.write(`GET /v1/stream?token=${userToken(userId)} HTTP/1.0\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n${headers}\r\n`)
  await client.until(() => client.events().some((event) => event.event === 'connected'), 5000, 'the connected event')
  return client
}

/** Lines of a body that read as chunk sizes (a hex number alone on a line). */
function chunkSizeLines (body: string): string[] {
  return body.split(/\r?\n/).filter((line) => /^[0-9a-f]+$/i.test(line))
}

t.test('an HTTP/1.0 stream gets the events unchunked, with Connection: close, and its end closes the connection', async (t) => {
  const { port, url, logText } = await startGateway(t, { MAX_CONNECTIONS_PER_USER: '1', CONNECTION_LIMIT_POLICY: 'evict-oldest' }, { captureLogs: true })
  const client = await openHttp10(t, port, 'u1')
  const head = client.response()
  t.equal(head.status, 200)
  t.equal(head.headers['transfer-encoding'], undefined, 'not chunked')
  t.equal(head.headers.connection, 'close')
  t.equal(head.headers['content-type'], 'text/event-stream; charset=utf-8')
  t.match(head.body, /^retry: \d+\n\nevent: connected\ndata: \{/, 'retry, then connected')

  const [id] = await publishOk(url, publisher, { to: { user: 'u1' }, event: 'note', data: 'two\nlines' })
  await client.until(() => client.events().some((event) => event.event === 'note'), 5000, 'the published event')
  t.same(client.events().find((event) => event.event === 'note'), { id, event: 'note', data: 'two\nlines' })

  // A second stream of the user evicts this one: its last event, then the close.
  const second = await openHttp10(t, port, 'u1')
  await client.waitClose()
  const events = client.events()
  t.equal(events[events.length - 1].event, 'evicted', 'the last event before the close')
  t.same(chunkSizeLines(client.response().body), [], 'no chunk framing anywhere in the body')
  t.notOk(second.closed, 'the new stream stays')
  const closed = (): Array<{ bytes: number }> => loggedAs(logText(), 'stream closed')
  await eventually(() => closed().length === 1, 'the stream closed line')
  t.same(closed().map((line) => line.bytes), [client.raw().length], 'its log line counts the bytes sent, not the chunk framing dropped')
})

t.test('an HTTP/1.0 reconnect with Last-Event-ID gets what it missed, unchunked and in order', async (t) => {
  const { port, url } = await startGateway(t)
  const ids: string[] = []
  for (let n = 0; n < 5; n++) ids.push(...await publishOk(url, publisher, { to: { user: 'u2' }, event: 'seq', data: String(n) }))
  const client = await openHttp10(t, port, 'u2', `Last-Event-ID: ${ids[0]}\r\n`)
  await client.until(() => client.events().filter((event) => event.event === 'seq').length === 4, 5000, 'the four events after the cursor')
  t.same(client.events().filter((event) => event.event === 'seq').map((event) => [event.id, event.data]), ids.slice(1).map((id, index) => [id, String(index + 1)]))
  t.same(chunkSizeLines(client.response().body), [])
})

t.test('a stream asked for in another HTTP version is refused with 400, and opens nothing', async (t) => {
  const { port, url } = await startGateway(t)
  // Node's parser takes any one-digit version in HTTP/1 syntax; the others it refuses itself.
  for (const version of ['2.0', '0.9']) {
    const answer = (await rawExchange(port, `GET /v1/stream?token=${userToken('u3')} HTTP/${version}\r\nHost: 127.0.0.1\r\n\r\n`)).response()
    t.equal(answer.status, 400, `HTTP/${version}`)
    t.match(JSON.parse(answer.body), { statusCode: 400, code: 'GW_BAD_REQUEST', message: 'streams need HTTP/1.1 or HTTP/1.0' })
  }
  const stats = await fetch(`${url}/v1/stats`, { headers: { authorization: `Bearer ${adminToken()}` } })
  t.match(await stats.json(), { connections: 0 }, 'no stream was opened')
})
