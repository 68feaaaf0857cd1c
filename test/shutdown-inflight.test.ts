import { EventEmitter, once } from 'node:events'
import { connect, type Socket } from 'node:net'
import { setFlagsFromString } from 'node:v8'
import { runInNewContext } from 'node:vm'
import t from 'tap'
import { forEachMode, listenInternalPort, publisherToken, request, startCluster, startGateway, userToken } from './helpers'
import { rawConnect } from './helpers/raw'
import { redisClient } from './helpers/redis'
import { within } from './helpers/wait'
import { beginDrain, gate, openAdmittedAsDrainBegins } from './helpers/drain'

forEachMode(t, 'a stream still waiting on admission when the drain begins is refused with 503, not reset, and holds no slot', async (t, mode) => {
  const [draining] = await startCluster(t, mode)
  const { answer: stream, closed } = await openAdmittedAsDrainBegins(t, draining, 'late')
  t.equal(stream.status, 503, 'answered 503')
  t.match(stream.headers['retry-after'], /^\d+$/, 'with Retry-After')
  t.match(stream.json(), { statusCode: 503, error: 'Service Unavailable', message: /shutting down/ })
  t.notMatch(stream.text, /event: (connected|shutdown)/, 'no stream was opened')
  t.equal(stream.headers.connection, 'close', 'the answer ends its connection')
  await within(closed, 10_000, 'the close to finish')

  // The admission it was granted is given back before the answer: the user
  // holds no stream (in Redis, the per-user set that limits and presence read).
  if (mode === 'memory') t.match(await draining.app.state.presence('late'), { connections: 0 }, 'the user holds no stream')
  else t.equal(await redisClient(t).zcard(`${draining.app.config.redisPrefix}uc:late`), 0, 'the user holds no stream in Redis')
})

for (const listener of ['public', 'internal'] as const) {
  forEachMode(t, `a publish in flight on the ${listener} listener when the drain begins is answered 202, not reset`, async (t, mode) => {
    const [gateway] = await startCluster(t, mode, 1, listener === 'internal' ? { INTERNAL_PORT: '0' } : {})
    let url = gateway.url
    if (listener === 'internal') {
      url = `http://127.0.0.1:${await listenInternalPort(gateway.app)}`
    }
    const event = `late-${listener}-${mode}`
    const publishing = gate(gateway.app.publisher, 'publishItems', (args) => JSON.stringify(args[0]).includes(event))
    const body = { to: { user: 'u1' }, event, data: { n: 1 } }
    const answer = request<{ id?: string }>(`${url}/v1/publish`, { token: publisherToken(), body }).catch((error: Error) => error)
    await publishing.entered
    const { closed } = await beginDrain(t, gateway.app)
    publishing.open()

    const answered = await answer
    if (answered instanceof Error) throw new Error(`the publish was not answered: ${answered.message}`)
    // In Redis mode the event goes out through Redis: still open when it is sent.
    t.equal(answered.status, 202, 'answered 202')
    t.match(answered.json, { id: /^\d+$/ }, 'with the event id')
    // Or the keep-alive connection, idle, would hold the close for its timeout.
    t.equal(answered.headers.get('connection'), 'close', 'the answer ends its connection')
    await within(closed, 10_000, 'the close to finish')
  })
}

t.test('a request that never finishes arriving does not hold the close: cut after a grace', async (t) => {
  const gateway = await startGateway(t, { SHUTDOWN_TIMEOUT_MS: '2000' })
  const socket = connect(gateway.port, '127.0.0.1')
  t.teardown(() => socket.destroy())
  await once(socket, 'connect')
  // Headers without the blank line that ends them.
  socket.write('GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n')
  const cut = once(socket, 'close')
  await within(gateway.app.close(), 10_000, 'the close to finish')
  t.pass('the close finished')
  await within(cut, 5000, 'the half-sent request\'s connection to be cut')
  t.pass('its connection was cut')
})

for (const listener of ['public', 'internal'] as const) {
  t.test(`a publish sent on a kept-alive connection of the ${listener} listener as the close begins is answered 503 with Connection: close, not reset`, async (t) => {
    const gateway = await startGateway(t, listener === 'internal' ? { INTERNAL_PORT: '0' } : {})
    const port = listener === 'internal' ? await listenInternalPort(gateway.app) : gateway.port
    const socket = connect(port, '127.0.0.1')
    t.teardown(() => socket.destroy())
    await once(socket, 'connect')
    let received = ''
    socket.setEncoding('utf8').on('data', (chunk: string) => { received += chunk })
    const publishRequest = (n: number): string => {
      const body = JSON.stringify({ to: { user: 'u1' }, event: 'kept', data: { n } })
      return `POST /v1/publish HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer ${publisherToken()}\r\nContent-Type: application/json\r\nContent-Length: ${Buffer.byteLength(body)}\r\n\r\n${body}`
    }
    socket.write(publishRequest(1))
    await within(new Promise<void>((resolve) => {
      const check = (): void => { if (received.includes('"id"')) resolve(); else socket.once('data', check) }
      check()
    }), 5000, 'the first answer')
    t.match(received, /^HTTP\/1\.1 202 /, 'the first publish answered 202')
    const closing = gateway.app.close()
    // On its way as the close begins: the connection was idle, its next request not read yet.
    socket.write(publishRequest(2))
    const ended = await within(once(socket, 'close').then(() => 'closed'), 10_000, 'the connection to end')
    t.equal(ended, 'closed')
    const second = received.slice(received.indexOf('HTTP/1.1', 1))
    t.match(second, /^HTTP\/1\.1 503 /, 'the second publish answered 503')
    t.match(second, /\r\nconnection: close\r\n/i, 'with Connection: close')
    t.match(second, /"code":"GW_UNAVAILABLE"/)
    await within(closing, 10_000, 'the close to finish')
  })
}

t.test('once the listeners are closed, a stream reopened on a kept-alive connection has it closed without an answer (an EventSource retries that, where a 503 ends it for good)', async (t) => {
  const gateway = await startGateway(t)
  const open = async (): Promise<{ socket: ReturnType<typeof connect>, received: () => string }> => {
    const socket = connect(gateway.port, '127.0.0.1')
    t.teardown(() => socket.destroy())
    await once(socket, 'connect')
    let text = ''
    socket.setEncoding('utf8').on('data', (chunk: string) => { text += chunk })
    return { socket, received: () => text }
  }
  const answered = async (client: { socket: ReturnType<typeof connect>, received: () => string }, pattern: RegExp): Promise<void> => {
    await within(new Promise<void>((resolve) => {
      const check = (): void => { if (pattern.test(client.received())) resolve(); else client.socket.once('data', check) }
      check()
    }), 5000, `an answer matching ${String(pattern)}`)
  }
  // A publisher's connection: the close waits for it (it may still send).
  const publisher = await open()
  const body = JSON.stringify({ to: { user: 'u1' }, event: 'e', data: 1 })
  publisher.socket.write(`POST /v1/publish HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer ${publisherToken()}\r\nContent-Type: application/json\r\nContent-Length: ${body.length}\r\n\r\n${body}`)
  await answered(publisher, /"id"/)
  // A browser's, idle after a page load.
  const browser = await open()
  browser.socket.write('GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n')
  await answered(browser, /"ok"/)

  const closing = gateway.app.close()
  // The listener refuses new connections once the drain is over.
  for (let attempt = 0; ; attempt++) {
    const refused = await new Promise<boolean>((resolve) => {
      const probe = connect(gateway.port, '127.0.0.1')
      probe.once('connect', () => { probe.destroy(); resolve(false) })
      probe.once('error', () => resolve(true))
    })
    if (refused) break
    if (attempt === 200) throw new Error('the listener still takes connections')
    await new Promise((resolve) => setImmediate(resolve))
  }
  const before = browser.received().length
  browser.socket.write(`GET /v1/stream?token=${userToken('u1')} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n`)
  await within(once(browser.socket, 'close'), 5000, 'the connection to close')
  t.equal(browser.received().slice(before), '', 'closed without an answer')
  await within(closing, 10_000, 'the close to finish')
})

t.test('a kept-alive connection alternating writes and reads is watched once: its close listeners do not grow with its requests', async (t) => {
  const gateway = await startGateway(t)
  let serverSide: ReturnType<typeof connect> | null = null
  gateway.app.server.once('connection', (socket: ReturnType<typeof connect>) => { serverSide = socket })
  const socket = connect(gateway.port, '127.0.0.1')
  t.teardown(() => socket.destroy())
  await once(socket, 'connect')
  let received = ''
  socket.setEncoding('utf8').on('data', (chunk: string) => { received += chunk })
  const body = JSON.stringify({ to: { user: 'u1' }, event: 'e', data: 1 })
  const pair = async (n: number): Promise<void> => {
    socket.write(`POST /v1/publish HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer ${publisherToken()}\r\nContent-Type: application/json\r\nContent-Length: ${body.length}\r\n\r\n${body}GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n`)
    await within(new Promise<void>((resolve) => {
      const check = (): void => { if ((received.match(/"status":"ok"/g) ?? []).length >= n) resolve(); else socket.once('data', check) }
      check()
    }), 5000, `answer pair ${n}`)
  }
  await pair(1)
  const closeListeners = (serverSide as ReturnType<typeof connect> | null)?.listenerCount('close') ?? -1
  t.ok(closeListeners > 0, 'the server side of the connection is seen')
  for (let n = 2; n <= 15; n++) await pair(n)
  t.equal((serverSide as ReturnType<typeof connect> | null)?.listenerCount('close'), closeListeners, 'as many close listeners after 15 pairs as after one')
})

t.test('a kept-alive connection that a stream held, handed back, then written on, is let go once it closes (not kept for the stop\'s wait)', async (t) => {
  setFlagsFromString('--expose-gc')
  const gc = runInNewContext('gc') as () => void
  const gateway = await startGateway(t)
  let letGo = false
  const sockets = new FinalizationRegistry<string>(() => { letGo = true })
  // Held weakly, or the test itself would keep it.
  let serverSide: WeakRef<Socket> | null = null
  gateway.app.server.once('connection', (socket: Socket) => {
    sockets.register(socket, 'server side')
    serverSide = new WeakRef(socket)
  })
  const client = await rawConnect(t, gateway.port)
  const ask = async (head: string, body: string, answered: () => boolean, what: string): Promise<void> => {
    client.write(`${head}\r\nHost: 127.0.0.1\r\n${body === '' ? '' : `Content-Type: application/json\r\nContent-Length: ${Buffer.byteLength(body)}\r\n`}\r\n${body}`)
    await client.until(answered, 5000, what)
  }
  const answers = (pattern: RegExp): number => (client.text().match(pattern) ?? []).length
  const job = JSON.stringify({ userId: 'u1', status: 'completed' })
  await ask(`PUT /v1/jobs/kept HTTP/1.1\r\nAuthorization: Bearer ${publisherToken()}`, job, () => answers(/HTTP\/1\.1 200/g) === 1, 'the job stored')
  // A finished job's stream: connected, initial_status, then its end; the connection goes back to the server.
  await ask(`GET /v1/jobs/kept/stream HTTP/1.1\r\nAuthorization: Bearer ${userToken('u1')}`, '', () => client.text().includes('\r\n0\r\n\r\n'), 'the job stream to end')
  const publish = JSON.stringify({ to: { user: 'u1' }, data: 1 })
  await ask(`POST /v1/publish HTTP/1.1\r\nAuthorization: Bearer ${publisherToken()}`, publish, () => answers(/HTTP\/1\.1 202/g) === 1, 'the publish on the same connection')
  // Listened to only now: the stream dropped the close listeners it found.
  const serverClosed = once((serverSide as WeakRef<Socket> | null)?.deref() ?? new EventEmitter(), 'close')
  client.destroy()
  await within(serverClosed, 5000, 'the server side to close')
  for (let round = 0; round < 100 && !letGo; round++) {
    gc()
    await new Promise((resolve) => setTimeout(resolve, 20))
  }
  t.ok(letGo, 'the closed connection is collected')
})
