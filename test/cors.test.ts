import t from 'tap'
import type { Test } from 'tap'
import http from 'node:http'
import { openConnected, openStream, publisherToken, startGateway, userToken } from './helpers'

const ALLOWED = 'https://app.example.com'
const ALSO_ALLOWED = 'https://admin.example.com:8443'
const DENIED = 'https://evil.example.net'

interface Head {
  status: number
  headers: http.IncomingHttpHeaders
  body: string
}

/** A request whose headers are sent exactly as given (an Origin above all). */
async function send (url: string, method: string, headers: Record<string, string>, body?: string): Promise<Head> {
  return await new Promise((resolve, reject) => {
    const req = http.request(url, { method, headers, agent: false, timeout: 5000 }, (response) => {
      let body = ''
      response.setEncoding('utf8')
      response.on('data', (chunk: string) => { body += chunk })
      response.on('end', () => resolve({ status: response.statusCode ?? 0, headers: response.headers, body }))
    })
    req.on('timeout', () => req.destroy(new Error(`${method} ${url} timed out`)))
    req.on('error', reject)
    req.end(body)
  })
}

function assertAllowed (t: Test, headers: http.IncomingHttpHeaders, origin: string, what: string): void {
  t.equal(headers['access-control-allow-origin'], origin, `${what}: the origin is echoed`)
  t.equal(headers['access-control-allow-credentials'], 'true', `${what}: credentials allowed`)
  t.match(String(headers.vary ?? ''), /origin/i, `${what}: Vary: Origin`)
}

function assertDenied (t: Test, headers: http.IncomingHttpHeaders, what: string): void {
  t.equal(headers['access-control-allow-origin'], undefined, `${what}: no Access-Control-Allow-Origin`)
  t.equal(headers['access-control-allow-credentials'], undefined, `${what}: no Access-Control-Allow-Credentials`)
  t.equal(headers['access-control-allow-methods'], undefined, `${what}: no Access-Control-Allow-Methods`)
}

async function preflight (url: string, path: string, origin: string, method: string, requestHeaders: string): Promise<Head> {
  return await send(`${url}${path}`, 'OPTIONS', {
    origin,
    'access-control-request-method': method,
    'access-control-request-headers': requestHeaders
  })
}

t.test('CORS_ORIGINS list: an allowed origin is echoed with credentials on JSON routes, preflights and streams', async (t) => {
  const { url } = await startGateway(t, { CORS_ORIGINS: `${ALLOWED}, ${ALSO_ALLOWED}` })

  t.test('a JSON route without auth (/health)', async (t) => {
    const head = await send(`${url}/health`, 'GET', { origin: ALLOWED })
    t.equal(head.status, 200)
    assertAllowed(t, head.headers, ALLOWED, 'GET /health')
  })

  t.test('the second origin of the list', async (t) => {
    const head = await send(`${url}/health`, 'GET', { origin: ALSO_ALLOWED })
    assertAllowed(t, head.headers, ALSO_ALLOWED, 'GET /health')
  })

  t.test('an authenticated JSON route (POST /v1/subscriptions)', async (t) => {
    const head = await send(`${url}/v1/subscriptions`, 'POST', {
      origin: ALLOWED,
      authorization: `Bearer ${userToken('u1')}`,
      'content-type': 'application/json'
    }, JSON.stringify({ topics: ['news'] }))
    t.equal(head.status, 200)
    assertAllowed(t, head.headers, ALLOWED, 'POST /v1/subscriptions')
  })

  t.test('an error answer carries the headers too, so the page can read it (401)', async (t) => {
    const head = await send(`${url}/v1/subscriptions`, 'POST', { origin: ALLOWED, 'content-type': 'application/json' }, JSON.stringify({ topics: ['news'] }))
    t.equal(head.status, 401)
    assertAllowed(t, head.headers, ALLOWED, '401')
  })

  t.test('a publish from an allowed origin', async (t) => {
    const head = await send(`${url}/v1/publish`, 'POST', {
      origin: ALLOWED,
      authorization: `Bearer ${publisherToken()}`,
      'content-type': 'application/json'
    }, JSON.stringify({ to: { user: 'u1' }, data: 1 }))
    t.equal(head.status, 202)
    assertAllowed(t, head.headers, ALLOWED, 'POST /v1/publish')
  })

  t.test('preflight OPTIONS for a JSON POST with Authorization', async (t) => {
    const head = await preflight(url, '/v1/subscriptions', ALLOWED, 'POST', 'authorization,content-type')
    t.ok(head.status === 204 || head.status === 200, `preflight answered ${head.status}`)
    assertAllowed(t, head.headers, ALLOWED, 'preflight')
    t.match(String(head.headers['access-control-allow-methods']), /POST/)
    t.match(String(head.headers['access-control-allow-headers']).toLowerCase(), /authorization/)
    t.match(String(head.headers['access-control-allow-headers']).toLowerCase(), /content-type/)
  })

  t.test('preflight OPTIONS for a stream with the headers EventSource polyfills and fetch-based clients send (Last-Event-ID, Authorization, Cache-Control, X-Requested-With)', async (t) => {
    const head = await preflight(url, '/v1/stream', ALLOWED, 'GET', 'authorization,last-event-id,cache-control,x-requested-with')
    t.ok(head.status === 204 || head.status === 200, `preflight answered ${head.status}`)
    assertAllowed(t, head.headers, ALLOWED, 'stream preflight')
    const allowed = String(head.headers['access-control-allow-headers']).toLowerCase().split(/\s*,\s*/)
    for (const header of ['authorization', 'last-event-id', 'cache-control', 'x-requested-with']) t.ok(allowed.includes(header), `${header} allowed`)
  })

  t.test('preflight for DELETE /v1/subscriptions', async (t) => {
    const head = await preflight(url, '/v1/subscriptions', ALLOWED, 'DELETE', 'authorization,content-type')
    assertAllowed(t, head.headers, ALLOWED, 'DELETE preflight')
    t.match(String(head.headers['access-control-allow-methods']), /DELETE/)
  })

  t.test('the stream response (EventSource withCredentials)', async (t) => {
    const stream = await openStream(`${url}/v1/stream?token=${userToken('u1')}`, { t, headers: { origin: ALLOWED } })
    t.equal(stream.status, 200)
    assertAllowed(t, stream.headers, ALLOWED, 'stream')
    t.equal(stream.headers['content-type'], 'text/event-stream; charset=utf-8', 'still an event stream')
    await stream.nextEvent('connected')
  })

  t.test('a refused stream (401) carries the headers too', async (t) => {
    const stream = await openStream(`${url}/v1/stream`, { t, headers: { origin: ALLOWED } })
    t.equal(stream.status, 401)
    assertAllowed(t, stream.headers, ALLOWED, 'refused stream')
  })
})

t.test('CORS_ORIGINS list: a disallowed origin gets no Access-Control-Allow-Origin anywhere', async (t) => {
  const { url } = await startGateway(t, { CORS_ORIGINS: `${ALLOWED},${ALSO_ALLOWED}` })
  assertDenied(t, (await send(`${url}/health`, 'GET', { origin: DENIED })).headers, 'GET /health')
  const denied = await preflight(url, '/v1/subscriptions', DENIED, 'POST', 'authorization,content-type')
  assertDenied(t, denied.headers, 'preflight')
  t.equal(denied.status, 204, 'a preflight is answered (the browser then says the origin is not allowed, not that a route is missing)')
  assertDenied(t, (await preflight(url, '/v1/stream', DENIED, 'GET', 'authorization')).headers, 'stream preflight')
  const stream = await openStream(`${url}/v1/stream?token=${userToken('u1')}`, { t, headers: { origin: DENIED } })
  assertDenied(t, stream.headers, 'stream')
  // A look-alike of an allowed origin is not allowed.
  assertDenied(t, (await send(`${url}/health`, 'GET', { origin: `${ALLOWED}.evil.example.net` })).headers, 'a suffixed look-alike')
  assertDenied(t, (await send(`${url}/health`, 'GET', { origin: 'http://app.example.com' })).headers, 'another scheme')
})

t.test('CORS_ORIGINS=*: the request origin is echoed (never a literal *) with credentials', async (t) => {
  const { url } = await startGateway(t, { CORS_ORIGINS: '*' })
  const origin = 'https://anything.example.org'
  const health = await send(`${url}/health`, 'GET', { origin })
  assertAllowed(t, health.headers, origin, 'GET /health')
  t.not(health.headers['access-control-allow-origin'], '*')

  const pre = await preflight(url, '/v1/publish', origin, 'POST', 'authorization,content-type')
  assertAllowed(t, pre.headers, origin, 'preflight')

  const { stream } = await openConnected(`${url}/v1/stream?token=${userToken('u1')}`, { t, headers: { origin } })
  assertAllowed(t, stream.headers, origin, 'stream')

  const other = 'http://localhost:5173'
  assertAllowed(t, (await send(`${url}/health`, 'GET', { origin: other })).headers, other, 'another origin')
})

t.test('CORS_ORIGINS unset: no CORS headers', async (t) => {
  const { url } = await startGateway(t)
  assertDenied(t, (await send(`${url}/health`, 'GET', { origin: ALLOWED })).headers, 'GET /health')
  const stream = await openStream(`${url}/v1/stream?token=${userToken('u1')}`, { t, headers: { origin: ALLOWED } })
  assertDenied(t, stream.headers, 'stream')
})

t.test('with CORS_ORIGINS, an OPTIONS that is not a preflight is answered as without CORS (405 with Allow, in the JSON shape), and a preflight for a path not served here gets 204 without CORS headers', async (t) => {
  for (const origins of [ALLOWED, '*']) {
    const { url } = await startGateway(t, { CORS_ORIGINS: origins, INTERNAL_PORT: '0' })
    const notPreflights: Array<Record<string, string>> = [{ origin: ALLOWED }, {}, { 'access-control-request-method': 'GET' }]
    for (const headers of notPreflights) {
      const plain = await send(`${url}/v1/stream`, 'OPTIONS', headers)
      t.equal(plain.status, 405, `CORS_ORIGINS=${origins}, OPTIONS with ${JSON.stringify(headers)}`)
      t.equal(plain.headers.allow, 'GET')
      t.match(plain.headers['content-type'], /^application\/json/)
      t.same(JSON.parse(plain.body), { statusCode: 405, code: 'GW_METHOD_NOT_ALLOWED', error: 'Method Not Allowed', message: 'OPTIONS is not allowed here: GET' })
    }
    const unknown = await send(`${url}/no/such/route`, 'OPTIONS', { origin: ALLOWED })
    t.equal(unknown.status, 404, 'an unknown path: 404')
    t.equal(JSON.parse(unknown.body).code, 'GW_NOT_FOUND')

    for (const path of ['/no/such/route', '/v1/publish']) {
      const head = await preflight(url, path, ALLOWED, 'POST', 'authorization,content-type')
      t.equal(head.status, 204, `preflight for ${path} (unknown, or internal only with INTERNAL_PORT) answered`)
      assertDenied(t, head.headers, `preflight for ${path}`)
    }
    assertAllowed(t, (await preflight(url, '/v1/stream', ALLOWED, 'GET', 'authorization')).headers, ALLOWED, 'a served path\'s preflight')
    assertAllowed(t, (await preflight(url, '/v1/jobs/j1', ALLOWED, 'GET', 'authorization')).headers, ALLOWED, 'a path with a public route beside an internal one')
  }
})
