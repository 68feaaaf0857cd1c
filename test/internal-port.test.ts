import t from 'tap'
import type { Test } from 'tap'
import { listenInternal } from '../src/app'
import {
  adminToken, openConnected, openStream, publishOk, publisherToken, request, startGateway, userToken, type Gateway
} from './helpers'
import { FLOOD_EVENT_BYTES, floodData, floodMaxBytes, neverReadingStream } from './helpers/raw'

const publisher = publisherToken()
const admin = adminToken()

interface Split {
  gateway: Gateway
  /** The public listener (PORT). */
  pub: string
  /** The internal listener (INTERNAL_PORT). */
  internal: string
}

async function startSplit (t: Test, env: Record<string, string> = {}): Promise<Split> {
  const gateway = await startGateway(t, { INTERNAL_PORT: '0', ...env })
  const server = await listenInternal(gateway.app, 0, '127.0.0.1')
  const address = server.address()
  if (address === null || typeof address === 'string') throw new Error('the internal listener has no TCP address')
  return { gateway, pub: gateway.url, internal: `http://127.0.0.1:${address.port}` }
}

interface Call {
  name: string
  method: string
  path: string
  token?: string
  body?: unknown
  /** The status the call answers on the listener that serves it. */
  ok: number
}

/** The publisher and admin routes: internal only. */
const INTERNAL_ONLY: Call[] = [
  { name: 'publish', method: 'POST', path: '/v1/publish', token: publisher, body: { to: { user: 'u1' }, data: 1 }, ok: 202 },
  { name: 'stats', method: 'GET', path: '/v1/stats', token: admin, ok: 200 },
  { name: 'connections list', method: 'GET', path: '/v1/connections', token: admin, ok: 200 },
  { name: 'pre-created connection', method: 'POST', path: '/v1/connections', token: publisher, body: { userId: 'u1' }, ok: 201 },
  { name: 'metrics', method: 'GET', path: '/metrics', ok: 200 },
  { name: 'presence', method: 'GET', path: '/v1/presence/u1', token: publisher, ok: 200 },
  { name: 'conversation members (PUT)', method: 'PUT', path: '/v1/conversations/c1/members', token: publisher, body: { members: ['u1', 'u2'] }, ok: 200 },
  { name: 'conversation members (POST)', method: 'POST', path: '/v1/conversations/c1/members', token: publisher, body: { members: ['u3'] }, ok: 200 },
  { name: 'conversation members (DELETE)', method: 'DELETE', path: '/v1/conversations/c1/members', token: publisher, body: { members: ['u3'] }, ok: 200 },
  { name: 'job PUT', method: 'PUT', path: '/v1/jobs/job-1', token: publisher, body: { userId: 'u1', status: 'active', progress: 10 }, ok: 200 },
  { name: 'admin page', method: 'GET', path: '/admin', ok: 200 },
  { name: 'admin page script', method: 'GET', path: '/assets/admin.js', ok: 200 }
]

async function call (base: string, route: Call): Promise<{ status: number, json: unknown, text: string }> {
  return await request(`${base}${route.path}`, {
    method: route.method,
    ...(route.token !== undefined ? { token: route.token } : {}),
    ...(route.body !== undefined ? { body: route.body } : {})
  })
}

t.test('with INTERNAL_PORT, publisher and admin routes answer 404 on the public port and work on the internal one', async (t) => {
  const { pub, internal } = await startSplit(t)
  for (const route of INTERNAL_ONLY) {
    t.test(route.name, async (t) => {
      const onPublic = await call(pub, route)
      t.equal(onPublic.status, 404, `${route.method} ${route.path} on the public port: 404`)
      t.match(onPublic.json, { statusCode: 404, error: 'Not Found', message: String }, 'the usual 404 shape')
      const onInternal = await call(internal, route)
      t.equal(onInternal.status, route.ok, `${route.method} ${route.path} on the internal port: ${route.ok} (${onInternal.text.slice(0, 120)})`)
    })
  }
})

t.test('the public 404 of an internal route is the same as that of a route that does not exist', async (t) => {
  const { pub, internal } = await startSplit(t)
  const hidden = await request(`${pub}/v1/stats`, { token: admin })
  const missing = await request(`${pub}/v1/nothing-here`, { token: admin })
  t.equal(hidden.status, 404)
  t.equal(missing.status, 404)
  t.same(Object.keys(hidden.json as object).sort(), Object.keys(missing.json as object).sort(), 'same fields')
  t.notMatch(hidden.text, /internal|admin role|forbidden/i, 'nothing tells the route exists')
  t.equal((await request(`${pub}/v1/stats`)).status, 404, 'without a token: 404, not 401')
  t.equal((await request(`${pub}/v1/publish`, { method: 'GET', token: admin })).status, 404, 'another method of an internal route: 404, not 405')
  // The job path is public for GET and internal for PUT: every other method
  // answers as PUT does, or the one 404 among 405s would name the hidden one.
  for (const method of ['PUT', 'DELETE', 'POST', 'PATCH']) {
    t.equal((await request(`${pub}/v1/jobs/j1`, { method, token: admin })).status, 404, `${method} on a path with an internal route: 404`)
  }
  const onInternal = await request(`${internal}/v1/jobs/j1`, { method: 'PATCH', token: admin })
  t.same([onInternal.status, onInternal.headers.get('allow')], [405, 'GET, HEAD, PUT'], 'on the internal listener: 405 naming them all')
  t.equal((await request(`${pub}/v1/publish`, { method: 'POST', token: userToken('u1'), body: { to: { user: 'u1' }, data: 1 } })).status, 404, 'with a user token: 404, not 403')
  // A path parameter past the router's length: the router refuses it (414) where it finds a route.
  const long = 'a'.repeat(2400)
  for (const [method, path] of [['GET', `/v1/presence/${long}`], ['PUT', `/v1/conversations/${long}/members`], ['PUT', `/v1/jobs/${long}`]]) {
    const body = method === 'GET' ? undefined : {}
    const hiddenLong = await request(`${pub}${path}`, { method, token: admin, body })
    const missingLong = await request(`${pub}${path.replace(/^\/v1\/[a-z]+\//, '/v1/nothing/')}`, { method, token: admin, body })
    t.equal(hiddenLong.status, 404, `${method} ${path.slice(0, 20)}… with a long parameter on the public port: 404, not 414`)
    t.same([hiddenLong.headers.get('content-type'), Object.keys((hiddenLong.json ?? {}) as object).sort()], [missingLong.headers.get('content-type'), Object.keys(missingLong.json as object).sort()], 'the same 404 as a path that does not exist')
    t.equal((await request(`${internal}${path}`, { method, token: admin, body })).status, 414, 'and 414 on the internal one')
  }
  t.equal((await request(`${pub}/v1/jobs/${long}`, { token: admin })).status, 414, 'a public route with a long parameter: 414')
})

t.test('while a drain runs, the public listener still answers 404 to internal routes, not 503', async (t) => {
  const maxBufferedBytes = 16 * 1024 * 1024
  const { gateway, pub, internal } = await startSplit(t, { MAX_BUFFERED_BYTES: String(maxBufferedBytes) })
  const stalled = await neverReadingStream(t, internal, Number(new URL(pub).port), 'stalled')
  const connection = gateway.app.registry.get(stalled.connectionId)
  if (connection === undefined) throw new Error('the stalled stream is not registered')
  // Until the kernel takes no more: its end then cannot flush, and the drain waits on it.
  const sink = connection['sink']
  for (let n = 0; sink.writableLength === 0; n++) {
    if (n * FLOOD_EVENT_BYTES > floodMaxBytes(maxBufferedBytes)) throw new Error('the stream never backed up')
    await publishOk(internal, publisher, { to: { user: 'stalled' }, event: 'flood', data: floodData(n) })
  }
  const closing = gateway.app.close()
  t.teardown(async () => await closing)
  const draining = await request(`${pub}/v1/stream?token=${userToken('u1')}`)
  t.equal(draining.status, 503, 'a public route: 503, the gateway drains')
  for (const route of INTERNAL_ONLY) {
    t.equal((await call(pub, route)).status, 404, `${route.name} on the public port: 404 as before the close`)
  }
  t.equal((await request(`${pub}/v1/stream?token=${userToken('u1')}`)).status, 503, 'still draining after them')
  t.equal((await call(internal, INTERNAL_ONLY[0])).status, 503, 'the internal listener answers its own routes 503')
  stalled.raw.destroy()
  await closing
})

t.test('/health and /ready answer on both listeners', async (t) => {
  const { pub, internal } = await startSplit(t)
  for (const base of [pub, internal]) {
    const health = await request(`${base}/health`)
    t.equal(health.status, 200)
    t.same(health.json, { status: 'ok' })
    t.equal((await request(`${base}/ready`)).status, 200)
  }
})

t.test('streams, subscriptions, job reads and /demo stay public; events published on the internal port reach public streams', async (t) => {
  const { pub, internal } = await startSplit(t)
  const { stream, connected } = await openConnected(`${pub}/v1/stream?token=${userToken('u1')}`, { t })
  t.equal(stream.status, 200, 'a stream opens on the public port')

  const subscribed = await request(`${pub}/v1/subscriptions`, { method: 'POST', token: userToken('u1'), body: { topics: ['news'], connectionId: connected.connectionId } })
  t.equal(subscribed.status, 200, 'subscribe on the public port')
  t.same(subscribed.json, { topics: ['news'] })

  const [id] = await publishOk(internal, publisher, { to: { topic: 'news' }, event: 'headline', data: { n: 1 } })
  t.equal((await stream.nextEvent('headline')).id, id, 'a publish on the internal port reaches the public stream')

  const unsubscribed = await request(`${pub}/v1/subscriptions`, { method: 'DELETE', token: userToken('u1'), body: { topics: ['news'], connectionId: connected.connectionId } })
  t.equal(unsubscribed.status, 200, 'unsubscribe on the public port')

  t.equal((await request(`${internal}/v1/jobs/job-2`, { method: 'PUT', token: publisher, body: { userId: 'u1', status: 'queued' } })).status, 200)
  t.equal((await request(`${pub}/v1/jobs/job-2`, { token: userToken('u1') })).status, 200, 'GET /v1/jobs/:jobId is a user route: public')
  const jobStream = await openStream(`${pub}/v1/jobs/job-2/stream?token=${userToken('u1')}`, { t })
  t.equal(jobStream.status, 200, 'a job stream opens on the public port')
  await jobStream.nextEvent('initial_status')
  const jobsStream = await openStream(`${pub}/v1/jobs/stream?token=${userToken('u1')}`, { t })
  t.equal(jobsStream.status, 200, 'the jobs stream opens on the public port')

  const demo = await request(`${pub}/demo`)
  t.equal(demo.status, 200, '/demo is public')
  t.notMatch(demo.text, 'href="admin"', 'and links to no admin page, which is not there')
  for (const asset of ['style.css', 'common.js', 'demo.js', 'favicon.svg']) {
    t.equal((await request(`${pub}/assets/${asset}`)).status, 200, `so is its ${asset}`)
  }
})

t.test('a stream pre-created on the internal port is joined on the public one', async (t) => {
  const { pub, internal } = await startSplit(t)
  const created = await request<{ connectionId: string }>(`${internal}/v1/connections`, { method: 'POST', token: publisher, body: { userId: 'u1' } })
  t.equal(created.status, 201)
  const { connected } = await openConnected(`${pub}/v1/stream/${created.json.connectionId}?token=${userToken('u1')}`, { t })
  t.equal(connected.connectionId, created.json.connectionId)
  const stats = await request<{ connections: number }>(`${internal}/v1/stats`, { token: admin })
  t.equal(stats.json.connections, 1, 'stats on the internal port see the public stream')
})

t.test('without INTERNAL_PORT the same routes are served on the one port (role auth)', async (t) => {
  const { url } = await startGateway(t)
  for (const route of INTERNAL_ONLY) {
    const response = await call(url, route)
    t.equal(response.status, route.ok, `${route.method} ${route.path}: ${route.ok}`)
  }
})
