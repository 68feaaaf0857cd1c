import t from 'tap'
import { createHook } from 'node:async_hooks'
import type { Socket } from 'node:net'
import type { FastifyInstance } from 'fastify'
import { CLOSE_GRACE_MS } from '../src/core/connection'
import { eventually, openConnected, publishOk, publisherToken, request, startGateway, token, userToken, type SseClient } from './helpers'
import { flood, floodMaxBytes, neverReadingStream, serverSendQueue } from './helpers/raw'

const publisher = publisherToken()

/**
 * Counts live timers, unref'd ones included (getActiveResourcesInfo sees only
 * ref'd ones): a per-connection timer left behind shows up here.
 */
function timerCounter (): { live: () => number, stop: () => void } {
  const timers = new Set<number>()
  const hook = createHook({
    init (asyncId, type) {
      if (type === 'Timeout') timers.add(asyncId)
    },
    destroy (asyncId) {
      timers.delete(asyncId)
    }
  }).enable()
  return { live: () => timers.size, stop: () => hook.disable() }
}

/** Node's undocumented list of live handles (sockets, servers, pipes). */
function activeHandles (): number {
  return (process as unknown as { _getActiveHandles: () => unknown[] })._getActiveHandles().length
}

/** Two turns of the loop, so destroy hooks queued for timers that just fired have run. */
async function settle (): Promise<void> {
  for (let turn = 0; turn < 2; turn++) await new Promise((resolve) => setImmediate(resolve))
}

function count (items: string[], name: string): number {
  return items.filter((item) => item === name).length
}

/** What the stream service and hub hold per connection; private, so reached by name. */
function internals (app: FastifyInstance): { channels: number, expiries: number } {
  // Private members of StreamService and Hub: the test looks inside on purpose.
  const streams = app.streams as unknown as { hub: { channelCount: () => number }, expiries: Map<number, unknown> }
  return { channels: streams.hub.channelCount(), expiries: streams.expiries.size }
}

function empty (app: FastifyInstance): boolean {
  const inside = internals(app)
  return app.registry.size === 0 && app.registry.userCount === 0 && Object.keys(app.registry.topics()).length === 0 &&
    inside.channels === 0 && inside.expiries === 0
}

t.test('2,000 streams opened and closed over real sockets leave nothing behind', async (t) => {
  const { url, app } = await startGateway(t, { RATE_LIMIT_STREAMS_PER_MIN: '0', PRESENCE_GRACE_MS: '50' })
  // Warm up once so lazily created, long-lived resources exist before the baseline.
  const warm = await openConnected(`${url}/v1/stream?token=${token({ sub: 'warm' })}&topics=warm`)
  warm.stream.close()
  await eventually(() => empty(app), 'the warm-up stream to be gone')

  const timers = timerCounter()
  t.teardown(() => timers.stop())
  await settle()
  const baseline = { resources: process.getActiveResourcesInfo(), handles: activeHandles(), timers: timers.live() }

  const total = 2000
  const batch = 100
  for (let start = 0; start < total; start += batch) {
    const opened: SseClient[] = await Promise.all(Array.from({ length: batch }, async (_, n) => {
      const user = `user-${start + n}`
      // Tokens with exp put the stream in the expiry index; topics give it topic channels.
      const jwt = token({ sub: user }, { ttlS: 600 })
      return (await openConnected(`${url}/v1/stream?token=${jwt}&topics=room-${n % 7},all`)).stream
    }))
    if (start === 0) {
      t.equal(app.registry.size, batch, `${batch} streams registered at once`)
      t.ok(internals(app).channels > 0, 'their channels are in the hub')
      t.ok(internals(app).expiries > 0, 'their expiries are tracked')
    }
    for (const stream of opened) stream.close()
    await eventually(() => app.registry.size === 0, `batch ${start / batch}: the registry to empty`)
  }
  t.pass(`${total} streams opened and closed`)

  await eventually(() => empty(app), 'registry, topic counts, hub channels and expiry index to be empty')
  t.equal(app.registry.size, 0, 'registry empty')
  t.equal(app.registry.userCount, 0, 'no user left')
  t.same(app.registry.topics(), {}, 'no topic count left')
  t.same(internals(app), { channels: 0, expiries: 0 }, 'no hub channel, no expiry entry')
  t.same(await app.state.presence('user-0'), { userId: 'user-0', online: false, connections: 0 }, 'presence forgot the streams (after the grace)')

  const settled = async (): Promise<boolean> => {
    await settle()
    const now = process.getActiveResourcesInfo()
    return count(now, 'TCPSocketWrap') <= count(baseline.resources, 'TCPSocketWrap') &&
      count(now, 'Timeout') <= count(baseline.resources, 'Timeout') &&
      activeHandles() <= baseline.handles &&
      timers.live() <= baseline.timers
  }
  await eventually(settled, 'sockets, handles and timers back to the baseline', 15_000, 25).catch((error: Error) => {
    const now = process.getActiveResourcesInfo()
    t.fail(error.message, {
      sockets: [count(baseline.resources, 'TCPSocketWrap'), count(now, 'TCPSocketWrap')],
      refTimers: [count(baseline.resources, 'Timeout'), count(now, 'Timeout')],
      handles: [baseline.handles, activeHandles()],
      allTimers: [baseline.timers, timers.live()]
    })
  })
  t.ok(await settled(), 'no socket, handle or timer outlives its stream')

  // The gateway still serves.
  const again = await openConnected(`${url}/v1/stream?token=${token({ sub: 'after' })}`, { t })
  await publishOk(url, publisher, { to: { user: 'after' }, event: 'still', data: 'alive' })
  t.equal((await again.stream.nextEvent('still')).data, 'alive')
})

function leftovers (app: FastifyInstance): Record<string, unknown> {
  return { size: app.registry.size, users: app.registry.userCount, topics: app.registry.topics(), ...internals(app) }
}

// KEEPALIVE_MS stays at its 15 s default here: a write failing on a dead socket
// must not be what removes the stream.
t.test('a stream the client closes (FIN) is removed from the registry at once', async (t) => {
  const { url, app } = await startGateway(t)
  const { stream } = await openConnected(`${url}/v1/stream?token=${token({ sub: 'fin' })}&topics=news`, { t })
  const { stream: other } = await openConnected(`${url}/v1/stream?token=${token({ sub: 'fin' })}`, { t })
  t.equal(app.registry.size, 2)
  stream.close()
  await eventually(() => app.registry.size === 1, 'the closed stream to leave the registry')
    .catch((error: Error) => t.fail(error.message, leftovers(app)))
  t.same(app.registry.topics(), {}, 'its topic count went with it')
  const [id] = await publishOk(url, publisher, { to: { user: 'fin' }, event: 'after-close', data: 1 })
  t.equal((await other.nextEvent('after-close')).id, id, 'the user\'s other stream is still served')
  other.close()
  await eventually(() => empty(app), 'nothing left').catch((error: Error) => t.fail(error.message, leftovers(app)))
})

t.test('a stream whose socket is reset (RST) is removed from the registry at once', async (t) => {
  const { url, app } = await startGateway(t)
  const { stream } = await openConnected(`${url}/v1/stream?token=${token({ sub: 'rst' })}&topics=news`, { t })
  const { stream: other } = await openConnected(`${url}/v1/stream?token=${token({ sub: 'rst' })}`, { t })
  t.equal(app.registry.size, 2)
  stream.reset()
  await eventually(() => app.registry.size === 1, 'the reset stream to leave the registry')
    .catch((error: Error) => t.fail(error.message, leftovers(app)))
  t.same(app.registry.topics(), {}, 'its topic count went with it')
  const [id] = await publishOk(url, publisher, { to: { user: 'rst' }, event: 'after-reset', data: 1 })
  t.equal((await other.nextEvent('after-reset')).id, id, 'the user\'s other stream is still served')
  other.reset()
  await eventually(() => empty(app), 'nothing left').catch((error: Error) => t.fail(error.message, leftovers(app)))
})

t.test('a stream whose socket dies while events are being written is removed', async (t) => {
  const { url, app } = await startGateway(t)
  const { stream } = await openConnected(`${url}/v1/stream?token=${token({ sub: 'busy' })}`, { t })
  const big = 'x'.repeat(64 * 1024)
  // Writes are in flight (and, paused, the socket backs up) when the client vanishes.
  stream.pause()
  await publishOk(url, publisher, Array.from({ length: 10 }, () => ({ to: { user: 'busy' }, event: 'big', data: big })))
  stream.reset()
  await publishOk(url, publisher, Array.from({ length: 10 }, () => ({ to: { user: 'busy' }, event: 'big', data: big })))
  await eventually(() => empty(app), 'the dead stream to be removed').catch((error: Error) => t.fail(error.message, leftovers(app)))
  t.equal((await request(`${url}/health`)).status, 200, 'the gateway keeps serving')
})

t.test('a stream the gateway closes while its client has stopped reading still lets go of its socket, and the kernel of what it never read', async (t) => {
  const { app, url, port } = await startGateway(t, {
    MAX_CONNECTIONS_PER_USER: '1',
    CONNECTION_LIMIT_POLICY: 'evict-oldest',
    // Far above what is published here: the stream is never dropped as slow.
    MAX_BUFFERED_BYTES: String(64 * 1024 * 1024)
  })
  const serverSockets: Socket[] = []
  const track = (socket: Socket): void => { serverSockets.push(socket) }
  app.server.on('connection', track)
  t.teardown(() => { app.server.off('connection', track) })

  const { raw, connectionId } = await neverReadingStream(t, url, port, 'u1')
  const serverSide = serverSockets.find((socket) => socket.remotePort === raw.socket.localPort)
  if (serverSide === undefined) throw new Error('the stream\'s server-side socket was not seen')
  // Past what the kernel holds on both ends, so Node keeps bytes it cannot send.
  await flood(url, { user: 'u1' }, () => serverSide.writableLength > 0, floodMaxBytes(0) + 4 * 1024 * 1024)
  t.ok(serverSide.writableLength > 0, `${serverSide.writableLength} bytes wait in the gateway for a reader that does not read`)

  // A second stream of the same user evicts the first: a graceful close, with a last frame that cannot flush.
  await openConnected(`${url}/v1/stream?token=${userToken('u1')}`, { t })
  await eventually(() => app.registry.get(connectionId) === undefined, 'the first stream evicted')
  await eventually(() => serverSide.destroyed, 'its socket destroyed', CLOSE_GRACE_MS + 5000)
  t.pass('the evicted stream\'s socket was destroyed though its client never read')
  // Reset, with what it never read: closed behind it, the kernel kept those bytes while the client stayed.
  await eventually(() => serverSendQueue(port, raw.socket.localPort ?? 0) === null, 'the kernel to let go of the connection and its unsent bytes', 5000)
  t.pass('and the kernel holds nothing of it')
})
