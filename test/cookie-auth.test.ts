/**
 * JWT_COOKIE: a browser's EventSource (withCredentials) can carry the user's
 * token in a cookie instead of the URL, where proxies and histories log it.
 * The cookie counts on user routes only; headers and ?token= come first.
 */
import t from 'tap'
import { openConnected, openStream, publishOk, publisherToken, request, startGateway, token, userToken } from './helpers'

const COOKIE = 'sse_token'
/** What Chromium sends with an EventSource or fetch of a page of the gateway's own origin (no Origin). */
const SAME_ORIGIN_SCRIPT = { 'sec-fetch-site': 'same-origin', 'sec-fetch-mode': 'cors', 'sec-fetch-dest': 'empty' }
/** The same from a page of `origin`, another site. */
function scriptOf (origin: string): Record<string, string> {
  return { origin, 'sec-fetch-site': 'cross-site', 'sec-fetch-mode': 'cors', 'sec-fetch-dest': 'empty' }
}

t.test('the cookie opens a stream and reads a job; a header or ?token= still comes first', async (t) => {
  const gateway = await startGateway(t, { JWT_COOKIE: COOKIE, CORS_ORIGINS: 'https://app.example.com' })
  const stream = await openStream(`${gateway.url}/v1/stream`, { t, headers: { ...SAME_ORIGIN_SCRIPT, cookie: `theme=dark; ${COOKIE}=${userToken('alice')}; lang=en` } })
  t.equal(stream.status, 200)
  t.match(JSON.parse((await stream.nextEvent('connected')).data), { userId: 'alice' })

  // Quoted, as some cookie libraries write it.
  const quoted = await openStream(`${gateway.url}/v1/stream`, { t, headers: { ...SAME_ORIGIN_SCRIPT, cookie: `${COOKIE}="${userToken('bob')}"` } })
  t.match(JSON.parse((await quoted.nextEvent('connected')).data), { userId: 'bob' })

  await request(`${gateway.url}/v1/jobs/j1`, { method: 'PUT', token: publisherToken(), body: { userId: 'alice', status: 'queued' } })
  const job = await request(`${gateway.url}/v1/jobs/j1`, { headers: { ...SAME_ORIGIN_SCRIPT, cookie: `${COOKIE}=${userToken('alice')}` } })
  t.equal(job.status, 200, 'a GET user route reads the cookie')

  const header = await openStream(`${gateway.url}/v1/stream?token=${userToken('carol')}`, { t, headers: { ...SAME_ORIGIN_SCRIPT, cookie: `${COOKIE}=${userToken('alice')}` } })
  t.match(JSON.parse((await header.nextEvent('connected')).data), { userId: 'carol' }, '?token= wins over the cookie')
  const badHeader = await openStream(`${gateway.url}/v1/stream`, { t, headers: { ...SAME_ORIGIN_SCRIPT, authorization: 'Bearer nope', cookie: `${COOKIE}=${userToken('alice')}` } })
  t.equal(badHeader.status, 401, 'a bad header is not passed over for the cookie')

  // A page of an allowed origin, sending credentials: the stream opens, and CORS lets the page read it.
  const allowed = await openStream(`${gateway.url}/v1/stream`, { t, headers: { ...scriptOf('https://app.example.com'), cookie: `${COOKIE}=${userToken('alice')}` } })
  t.equal(allowed.status, 200)
  t.equal(allowed.headers['access-control-allow-credentials'], 'true')
  t.equal(allowed.headers['access-control-allow-origin'], 'https://app.example.com')
  // Chromium sends no Origin with an EventSource of the page's own origin (checked with /usr/bin/chromium).
  const own = await openStream(`${gateway.url}/v1/stream`, { t, headers: { ...SAME_ORIGIN_SCRIPT, cookie: `${COOKIE}=${userToken('alice')}` } })
  t.equal(own.status, 200)
  // fetch(url, { mode: 'same-origin', credentials: 'include' }) from the gateway's own page.
  const sameOriginMode = await request(`${gateway.url}/v1/jobs/j1`, { headers: { ...SAME_ORIGIN_SCRIPT, 'sec-fetch-mode': 'same-origin', cookie: `${COOKIE}=${userToken('alice')}` } })
  t.equal(sameOriginMode.status, 200)
})

t.test('a page of another origin cannot use the cookie, even to open a stream it could not read', async (t) => {
  const gateway = await startGateway(t, { JWT_COOKIE: COOKIE, CORS_ORIGINS: 'https://app.example.com', CONNECTION_LIMIT_POLICY: 'evict-oldest', MAX_CONNECTIONS_PER_USER: '1' })
  const { stream: mine } = await openConnected(`${gateway.url}/v1/stream?token=${userToken('alice')}`, { t })
  const refused: Array<Record<string, string>> = [
    scriptOf('https://evil.example'),
    scriptOf('null'),
    scriptOf('https://app.example.com.evil.example'),
    // The gateway's own host under another scheme is another origin.
    scriptOf(gateway.url.replace('http:', 'https:')),
    // A link on another site, and one opened from outside the browser or redirected to here.
    { 'sec-fetch-site': 'cross-site', 'sec-fetch-mode': 'navigate', 'sec-fetch-dest': 'document' },
    { 'sec-fetch-site': 'none', 'sec-fetch-mode': 'navigate', 'sec-fetch-dest': 'document' },
    // Not a script's request, even from the gateway's own pages.
    { 'sec-fetch-site': 'same-origin', 'sec-fetch-mode': 'no-cors', 'sec-fetch-dest': 'image' },
    { 'sec-fetch-site': 'same-origin', 'sec-fetch-mode': 'navigate', 'sec-fetch-dest': 'iframe' },
    // No Fetch Metadata: no browser, one too old, or a page over plain HTTP.
    {}
  ]
  for (const headers of refused) {
    const answer = await openStream(`${gateway.url}/v1/stream`, { t, headers: { ...headers, cookie: `${COOKIE}=${userToken('alice')}` } })
    t.equal(answer.status, 403, JSON.stringify(headers))
    t.match(answer.json(), { statusCode: 403, error: 'Forbidden', message: /cookie/ })
  }
  await publishOk(gateway.url, publisherToken(), { to: { user: 'alice' }, event: 'marker', data: 1 })
  await mine.nextEvent('marker')
  t.same(mine.events.map((event) => event.event), ['connected', 'marker'], 'the user\'s stream was not evicted by them')
  // A header token is the page's own business: CORS decides what it reads.
  const withHeader = await openStream(`${gateway.url}/v1/stream`, { t, headers: { origin: 'https://evil.example', authorization: `Bearer ${userToken('bob')}` } })
  t.equal(withHeader.status, 200)
})

t.test('a token in the cookie carries no role: a publisher\'s cannot read another user\'s job', async (t) => {
  const gateway = await startGateway(t, { JWT_COOKIE: COOKIE })
  await request(`${gateway.url}/v1/jobs/j2`, { method: 'PUT', token: publisherToken(), body: { userId: 'alice', status: 'queued' } })
  t.equal((await request(`${gateway.url}/v1/jobs/j2`, { token: publisherToken() })).status, 200, 'in a header, it can')
  const viaCookie = await request(`${gateway.url}/v1/jobs/j2`, { headers: { ...SAME_ORIGIN_SCRIPT, cookie: `${COOKIE}=${publisherToken()}` } })
  t.equal(viaCookie.status, 404, 'in the cookie, it is only its subject')
})

t.test('the cookie changes the topics of a live stream (POST and DELETE /v1/subscriptions) from a script of an allowed page, and not from a form or a script elsewhere', async (t) => {
  const gateway = await startGateway(t, { JWT_COOKIE: COOKIE, CORS_ORIGINS: 'https://app.example.com' })
  const cookie = `${COOKIE}=${userToken('alice')}`
  const { stream, connected } = await openConnected(`${gateway.url}/v1/stream`, { t, headers: { ...SAME_ORIGIN_SCRIPT, cookie } })
  const change = async (method: 'POST' | 'DELETE', topics: string[], headers: Record<string, string>): Promise<{ status: number, json: unknown }> =>
    await request(`${gateway.url}/v1/subscriptions`, { method, headers: { ...headers, cookie }, body: { topics, connectionId: connected.connectionId } })

  const own = await change('POST', ['news'], SAME_ORIGIN_SCRIPT)
  t.same([own.status, own.json], [200, { topics: ['news'] }], 'a script of the gateway\'s own origin')
  const listed = await change('POST', ['sport'], scriptOf('https://app.example.com'))
  t.same([listed.status, listed.json], [200, { topics: ['news', 'sport'] }], 'a script of an origin in CORS_ORIGINS')
  await publishOk(gateway.url, publisherToken(), { to: { topic: 'sport' }, event: 'goal', data: 1 })
  await stream.nextEvent('goal')
  t.pass('the stream joined the topic')

  const refused: Array<Record<string, string>> = [
    scriptOf('https://evil.example'),
    // A form posted from another site.
    { origin: 'https://evil.example', 'sec-fetch-site': 'cross-site', 'sec-fetch-mode': 'navigate', 'sec-fetch-dest': 'document' },
    {}
  ]
  for (const headers of refused) {
    const answer = await change('DELETE', ['news'], headers)
    t.equal(answer.status, 403, JSON.stringify(headers))
  }
  const left = await change('DELETE', ['news'], SAME_ORIGIN_SCRIPT)
  t.same([left.status, left.json], [200, { topics: ['sport'] }], 'only the allowed DELETE left the topic')
})

t.test('the cookie is not read on publisher or admin routes, or without JWT_COOKIE', async (t) => {
  const gateway = await startGateway(t, { JWT_COOKIE: COOKIE })
  const asCookie = (value: string): Record<string, string> => ({ ...SAME_ORIGIN_SCRIPT, cookie: `${COOKIE}=${value}` })

  const publish = await request(`${gateway.url}/v1/publish`, { method: 'POST', headers: asCookie(publisherToken()), body: { to: { user: 'alice' }, data: 1 } })
  t.equal(publish.status, 401, 'a publisher route, with a publisher\'s token')
  t.match(publish.json, { statusCode: 401, error: 'Unauthorized', message: /cookie/ })

  const presence = await request(`${gateway.url}/v1/presence/alice`, { headers: asCookie(publisherToken()) })
  t.equal(presence.status, 401, 'a publisher route')
  const stats = await request(`${gateway.url}/v1/stats`, { headers: asCookie(token({ sub: 'op', roles: ['admin'] })) })
  t.equal(stats.status, 401, 'an admin route')

  const invalid = await openStream(`${gateway.url}/v1/stream`, { t, headers: asCookie('not-a-jwt') })
  t.equal(invalid.status, 401, 'a cookie holding no valid token')
  const otherName = await openStream(`${gateway.url}/v1/stream`, { t, headers: { ...SAME_ORIGIN_SCRIPT, cookie: `other=${userToken('alice')}` } })
  t.equal(otherName.status, 401, 'another cookie')

  const without = await startGateway(t, {})
  const ignored = await openStream(`${without.url}/v1/stream`, { t, headers: asCookie(userToken('alice')) })
  t.equal(ignored.status, 401, 'no JWT_COOKIE, no cookie auth')
  t.notMatch(ignored.json<{ message: string }>().message, /cookie/)
})
