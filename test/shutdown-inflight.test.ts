import { once } from 'node:events'
import { connect } from 'node:net'
import t from 'tap'
import { forEachMode, listenInternalPort, openStream, publisherToken, request, startCluster, startGateway, userToken } from './helpers'
import { redisClient } from './helpers/redis'
import { within } from './helpers/wait'
import { beginDrain, gate } from './helpers/drain'

forEachMode(t, 'a stream still waiting on admission when the drain begins is refused with 503, not reset, and holds no slot', async (t, mode) => {
  const [draining] = await startCluster(t, mode)
  const admission = gate(draining.app.state, 'admit')
  // A reset would reject: kept as a value, so the test fails on it, not the process.
  const opening = openStream(`${draining.url}/v1/stream?token=${userToken('late')}`, { t }).catch((error: Error) => error)
  await admission.entered
  const { closed } = await beginDrain(t, draining.app)
  admission.open()

  const stream = await opening
  if (stream instanceof Error) throw new Error(`the open was not answered: ${stream.message}`)
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
