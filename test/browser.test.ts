/**
 * Headless Chromium (Debian's, driven by playwright-core): native EventSource
 * against the gateway, reconnection across a gateway restart in Redis mode,
 * CORS, and the admin and demo pages driven as a person would.
 */
import t from 'tap'
import {
  eventually,
  freePort,
  openConnected,
  publishOk,
  publisherToken,
  adminToken,
  spawnServer,
  startGateway,
  TEST_SECRET,
  userToken
} from './helpers'
import type { Page } from 'playwright-core'
import { needRedis, REDIS_URL, uniquePrefix } from './helpers/redis'
import { launchBrowser, needChromium, pageEventSource, startOrigin, startServerOnPort, type PageRecord } from './helpers/browser'
import { within } from './helpers/wait'
import { putJobOk } from './helpers/channels'

const publisher = publisherToken()

const parse = (record: PageRecord): unknown => JSON.parse(record.data ?? 'null')

t.test('a page opens a native EventSource with ?token= and receives named events', async (t) => {
  if (!needChromium(t)) return
  const gateway = await startGateway(t)
  const browser = await launchBrowser(t)
  const page = await browser.newPage()
  await page.goto(`${gateway.url}/demo`)
  const user = 'u-browser'
  const recorder = await pageEventSource(page, `/v1/stream?token=${encodeURIComponent(userToken(user))}`, {
    names: ['connected', 'notification', 'message:new', 'message', 'reset']
  })
  const [connected] = await recorder.waitEvents('connected', 1)
  t.match(parse(connected), { userId: user, topics: [] }, 'connected names the user')
  t.equal(connected.lastEventId, '', 'connected carries no id')

  const ids = await publishOk(gateway.url, publisher, [
    { to: { user }, event: 'notification', data: { text: 'hello' } },
    { to: { user }, event: 'message:new', data: { conversationId: 'c1', text: 'hi' } },
    { to: { user }, data: 'line one\nline two\r\nline three' }
  ])
  const [notification] = await recorder.waitEvents('notification', 1)
  const [message] = await recorder.waitEvents('message:new', 1)
  const [plain] = await recorder.waitEvents('message', 1)
  t.same(parse(notification), { text: 'hello' })
  t.equal(notification.lastEventId, ids[0], 'the notification carries its id')
  t.same(parse(message), { conversationId: 'c1', text: 'hi' })
  t.equal(message.lastEventId, ids[1])
  t.equal(plain.data, 'line one\nline two\nline three', 'a multi-line string arrives intact as one event')
  t.equal(plain.lastEventId, ids[2])
  t.same(recorder.events().map((record) => record.type), ['connected', 'notification', 'message:new', 'message'], 'in order, nothing else')
  t.same(browser.problems, [], 'no page errors')
})

t.test('evict-oldest: a page that does not close its EventSource on `evicted` does not come back to take the slot from the newer page', async (t) => {
  if (!needChromium(t)) return
  const gateway = await startGateway(t, { MAX_CONNECTIONS_PER_USER: '1', CONNECTION_LIMIT_POLICY: 'evict-oldest', RETRY_MS: '1000' })
  const browser = await launchBrowser(t)
  const user = 'u-tabs'
  const token = encodeURIComponent(userToken(user))
  const [older, newer] = [await browser.newPage(), await browser.newPage()]
  for (const page of [older, newer]) await page.goto(`${gateway.url}/demo`)
  // The seed's page: no handler for `evicted`, so the browser reconnects as after any end.
  const olderTab = await pageEventSource(older, `/v1/stream?token=${token}`, { names: ['connected', 'evicted'] })
  await olderTab.waitEvents('connected', 1)
  const newerTab = await pageEventSource(newer, `/v1/stream?token=${token}`, { names: ['connected', 'evicted'] })
  await newerTab.waitEvents('connected', 1)
  await olderTab.waitEvents('evicted', 1)

  // A clock in the browser: a job stream ended by its job's end reconnects
  // RETRY_MS later and gets 204, so each round lets at least RETRY_MS pass
  // after the eviction. Two rounds: the older page, back after its retry,
  // would have taken the slot by the end of the second.
  for (const jobId of ['clock-1', 'clock-2']) {
    await putJobOk(gateway, jobId, { userId: 'u-clock', status: 'active' })
    const clock = await pageEventSource(older, `/v1/jobs/${jobId}/stream?token=${encodeURIComponent(userToken('u-clock'))}`, { names: ['initial_status', 'job_update'] })
    await clock.waitEvents('initial_status', 1)
    await putJobOk(gateway, jobId, { userId: 'u-clock', status: 'completed' })
    await clock.until(() => clock.records.some((record) => record.kind === 'error' && record.readyState === 2), 'the job stream\'s reconnect to get 204')
  }
  t.equal(olderTab.events('connected').length, 1, 'the evicted page did not reconnect')
  t.equal(newerTab.events('evicted').length, 0, 'the newer page keeps the slot')
  t.equal(gateway.app.registry.ofUser(user).length, 1, 'one stream for the user')
  t.same(browser.problems, [], 'no page errors')
})

t.test('Redis mode: after the gateway restarts, the page reconnects by itself and gets what was published while it was down, once', async (t) => {
  if (!needChromium(t) || !(await needRedis(t))) return
  const env = {
    JWT_SECRET: TEST_SECRET,
    HOST: '127.0.0.1',
    REDIS_URL,
    REDIS_PREFIX: uniquePrefix('browser'),
    INSTANCE_TTL_MS: '3000',
    RETRY_MS: '500',
    LOG_LEVEL: 'warn'
  }
  // The instance that stays up while the page's one restarts.
  const other = await spawnServer(t, env)
  const port = await freePort()
  const first = await startServerOnPort(t, env, port)
  const browser = await launchBrowser(t)
  const page = await browser.newPage()
  await page.goto(`${first.url}/demo`)
  const user = 'u-restart'
  const recorder = await pageEventSource(page, `/v1/stream?token=${encodeURIComponent(userToken(user))}`, {
    names: ['connected', 'tick', 'shutdown', 'reset']
  })
  const [connected] = await recorder.waitEvents('connected', 1)
  t.match(parse(connected), { userId: user })

  const published: string[] = []
  const tick = async (url: string, k: number): Promise<void> => {
    published.push(...await publishOk(url, publisher, { to: { user }, event: 'tick', data: { k } }))
  }
  await tick(first.url, 1)
  await tick(other.url, 2)
  await recorder.waitEvents('tick', 2)

  first.child.kill('SIGTERM')
  await recorder.waitEvents('shutdown', 1)
  t.pass('the page got shutdown when the gateway was stopped')
  const exit = await first.waitExit(15_000)
  t.same(exit, { code: 0, signal: null }, 'the gateway exited 0 after draining')

  // The page's gateway is down; another instance accepts the events.
  for (const k of [3, 4, 5]) await tick(other.url, k)
  // Wait for at least one failed reconnect attempt while it is down.
  await recorder.until(() => recorder.records.filter((record) => record.kind === 'error').length >= 2, 'a failed reconnect attempt while the gateway is down')

  const second = await startServerOnPort(t, env, port)
  await recorder.waitEvents('connected', 2, 15_000)
  t.pass('the EventSource reconnected by itself to the restarted gateway')
  await recorder.waitEvents('tick', 5)
  await tick(second.url, 6)
  const ticks = await recorder.waitEvents('tick', 6)
  t.same(ticks.map((record) => record.lastEventId), published, 'every event exactly once, in order')
  t.same(ticks.map((record) => (parse(record) as { k: number }).k), [1, 2, 3, 4, 5, 6])
  t.same(recorder.events('reset'), [], 'no reset: the replay was complete')
  t.same(recorder.records.filter((record) => record.kind === 'error' && record.readyState === 2), [], 'the EventSource never gave up (readyState never CLOSED)')
  t.comment(`the page recorded: ${recorder.records.map((record) => record.kind === 'event' ? record.type : `${record.kind}(${String(record.readyState)})`).join(' ')}`)
  t.same(browser.problems.filter((problem) => !problem.includes('ERR_CONNECTION_REFUSED')), [], 'no page errors besides the refused reconnects')
})

t.test('a cross-origin page allowed by CORS_ORIGINS streams and fetches; a disallowed origin is refused', async (t) => {
  if (!needChromium(t)) return
  const allowed = await startOrigin(t, 'allowed origin')
  const denied = await startOrigin(t, 'denied origin')
  const gateway = await startGateway(t, { CORS_ORIGINS: allowed })
  const browser = await launchBrowser(t)
  const user = 'u-cors'
  const token = userToken(user)
  const streamUrl = `${gateway.url}/v1/stream?token=${encodeURIComponent(token)}`

  const fetchStream = `async (setup) => {
    try {
      const response = await fetch(setup.url + '/v1/stream', { headers: { Authorization: 'Bearer ' + setup.token }, credentials: 'include' });
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      let text = '';
      while (!text.includes('event: connected')) {
        const { value, done } = await reader.read();
        if (done) break;
        text += decoder.decode(value, { stream: true });
      }
      await reader.cancel();
      return { ok: true, status: response.status, contentType: response.headers.get('content-type'), text };
    } catch (error) {
      return { ok: false, error: String(error) };
    }
  }`
  const subscribe = `async (setup) => {
    try {
      const response = await fetch(setup.url + '/v1/subscriptions', {
        method: 'POST',
        headers: { Authorization: 'Bearer ' + setup.token, 'Content-Type': 'application/json' },
        body: JSON.stringify({ topics: ['news'] }),
        credentials: 'include'
      });
      return { ok: true, status: response.status, body: await response.json() };
    } catch (error) {
      return { ok: false, error: String(error) };
    }
  }`
  interface FetchResult { ok: boolean, status?: number, contentType?: string, text?: string, body?: unknown, error?: string }
  const run = async (page: Page, source: string): Promise<FetchResult> =>
    await within(page.evaluate(`(${source})(${JSON.stringify({ url: gateway.url, token })})`) as Promise<FetchResult>, 10_000, 'a fetch in the page')

  t.test('allowed origin', async (t) => {
    const page = await browser.newPage()
    await page.goto(`${allowed}/`)
    const recorder = await pageEventSource(page, streamUrl, { names: ['connected', 'notice'], withCredentials: true })
    await recorder.waitEvents('connected', 1)
    t.pass('EventSource (withCredentials) from the allowed origin opens')
    const [id] = await publishOk(gateway.url, publisher, { to: { user }, event: 'notice', data: { n: 1 } })
    const [notice] = await recorder.waitEvents('notice', 1)
    t.equal(notice.lastEventId, id, 'and receives events')

    const streamed = await run(page, fetchStream)
    t.equal(streamed.ok, true, `fetch streaming with an Authorization header passes the preflight (${streamed.error ?? ''})`)
    t.equal(streamed.status, 200)
    t.match(streamed.contentType, /^text\/event-stream/)
    t.match(streamed.text, /event: connected/, 'the fetch reads the stream')

    const subscribed = await run(page, subscribe)
    t.equal(subscribed.ok, true, `a JSON POST with credentials works (${subscribed.error ?? ''})`)
    t.equal(subscribed.status, 200)
    t.same(subscribed.body, { topics: ['news'] })
  })

  t.test('disallowed origin', async (t) => {
    const page = await browser.newPage()
    await page.goto(`${denied}/`)
    for (const withCredentials of [true, false]) {
      const recorder = await pageEventSource(page, streamUrl, { names: ['connected'], withCredentials })
      await recorder.until(() => recorder.records.some((record) => record.kind === 'error' && record.readyState === 2), `the EventSource (withCredentials: ${String(withCredentials)}) to fail`)
      t.same(recorder.events(), [], `EventSource (withCredentials: ${String(withCredentials)}) is refused: no event reaches the page`)
    }
    const streamed = await run(page, fetchStream)
    t.equal(streamed.ok, false, 'fetch streaming is refused')
    t.match(streamed.error, /TypeError/)
    const subscribed = await run(page, subscribe)
    t.equal(subscribed.ok, false, 'a JSON POST is refused')
  })
})

t.test('JWT_COOKIE: with the token in a cookie only, a page of the gateway\'s origin and one of an allowed origin open an EventSource and change its topics with a credentialed fetch', async (t) => {
  if (!needChromium(t)) return
  const allowed = await startOrigin(t, 'allowed origin')
  const gateway = await startGateway(t, { JWT_COOKIE: 'sse_token', CORS_ORIGINS: allowed })
  const browser = await launchBrowser(t)
  const user = 'u-cookie'
  // One host for both origins (ports differ): the cookie goes to the gateway from either page.
  await browser.context.addCookies([{ name: 'sse_token', value: userToken(user), domain: '127.0.0.1', path: '/', httpOnly: true }])
  const subscribe = `async (setup) => {
    const response = await fetch(setup.url + '/v1/subscriptions', {
      method: 'POST',
      headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify({ topics: [setup.topic], connectionId: setup.connectionId }),
      credentials: 'include'
    });
    return { status: response.status, body: await response.json() };
  }`
  for (const [name, origin] of [['the gateway\'s own origin', gateway.url], ['an allowed origin', allowed]]) {
    const page = await browser.newPage()
    await page.goto(`${origin}/${origin === gateway.url ? 'demo' : ''}`)
    const recorder = await pageEventSource(page, `${gateway.url}/v1/stream`, { names: ['connected', 'headline'], withCredentials: true })
    const [connected] = await recorder.waitEvents('connected', 1)
    const { connectionId, userId } = parse(connected) as { connectionId: string, userId: string }
    t.equal(userId, user, `${name}: the stream is the cookie's user's`)
    const topic = `news-${origin === gateway.url ? 'own' : 'allowed'}`
    const answer = await within(page.evaluate(`(${subscribe})(${JSON.stringify({ url: gateway.url, topic, connectionId })})`) as Promise<{ status: number, body: unknown }>, 10_000, 'the subscribe fetch')
    t.same(answer, { status: 200, body: { topics: [topic] } }, `${name}: the fetch changed the stream's topics`)
    const [id] = await publishOk(gateway.url, publisher, { to: { topic }, event: 'headline', data: { topic } })
    const [headline] = await recorder.waitEvents('headline', 1)
    t.equal(headline.lastEventId, id, `${name}: the topic's event arrives`)
  }
  t.same(browser.problems, [], 'no page errors')
})

t.test('the pages: an event sent from /admin appears on /demo', async (t) => {
  if (!needChromium(t)) return
  const gateway = await startGateway(t)
  const browser = await launchBrowser(t)
  const stamp = `${Date.now()}-${Math.random().toString(36).slice(2, 8)}`

  // The dashboard first: the stream opened after it must show up by its own refresh.
  const admin = await browser.newPage()
  await admin.goto(`${gateway.url}/admin`)
  await admin.fill('#token', adminToken())
  await admin.click('#connect')
  // A locator, not waitForFunction: a string predicate that is not true at
  // once is polled through eval, which the page's CSP (script-src 'self') refuses.
  await admin.locator('#updated', { hasText: /^updated/ }).waitFor()
  t.pass('the dashboard loaded with the admin token')

  const demo = await browser.newPage()
  await demo.goto(`${gateway.url}/demo`)
  await demo.fill('#token', userToken('u1'))
  await demo.fill('#topics', 'news')
  await demo.click('#connect')
  await demo.waitForSelector('#state[data-state="open"]')
  await demo.waitForSelector('#current-topics li[data-topic="news"]')
  t.pass('the demo page is connected as u1 with topic news')

  // Playwright's actionability checks use animation frames, which a background tab throttles.
  await admin.bringToFront()
  await admin.waitForSelector('#connections tbody tr[data-user-id="u1"]')
  await admin.waitForSelector('#topics tbody tr[data-topic="news"]')
  t.pass('the dashboard, refreshing by itself, lists u1\'s live connection and the topic news')
  t.equal(await admin.textContent('#stat-users'), '1', 'and counts one user')

  await admin.selectOption('#target-kind', 'user')
  await admin.fill('#target', 'u1')
  await admin.fill('#event', 'notification')
  await admin.fill('#data', JSON.stringify({ title: 'Hello u1', body: `from the dashboard ${stamp}` }))
  await admin.click('#send-button')
  const sent = await admin.waitForSelector('#send-result[data-id]')
  const id = await sent.getAttribute('data-id')
  t.match(id, /^\d+$/, 'the dashboard shows the event id')
  const item = await demo.waitForSelector(`#events li[data-event="notification"][data-id="${id ?? ''}"]`)
  t.match(await item.textContent(), `from the dashboard ${stamp}`, 'the demo page shows the event sent to user u1')

  // Names the replaced systems' backends send: shown without being added by hand (a backend, not the dashboard, sends them).
  const seedNames = ['message:read', 'conversation:updated', 'user-update', 'maintenance', 'job-completed', 'job-failed']
  const seedIds = await publishOk(gateway.url, publisher, seedNames.map((event) => ({ to: { user: 'u1' }, event, data: { stamp } })))
  for (const [index, event] of seedNames.entries()) await demo.waitForSelector(`#events li[data-event="${event}"][data-id="${seedIds[index]}"]`)
  t.pass(`the demo page shows ${seedNames.join(', ')}`)

  await admin.selectOption('#target-kind', 'topic')
  await admin.fill('#target', 'news')
  await admin.fill('#event', 'announcement')
  await admin.fill('#data', `plain text for news ${stamp}`)
  // The previous id stays until the answer replaces it: wait for a different one.
  await admin.click('#send-button')
  const topicId = await within((async () => {
    for (;;) {
      const value = await admin.getAttribute('#send-result', 'data-id')
      if (value !== null && value !== id) return value
      await new Promise<void>((resolve) => setTimeout(resolve, 50))
    }
  })(), 10_000, 'the dashboard to show the second event id')
  const topicItem = await demo.waitForSelector(`#events li[data-event="announcement"][data-id="${topicId}"]`)
  t.match(await topicItem.textContent(), `plain text for news ${stamp}`, 'the demo page shows the event sent to its topic')

  await admin.selectOption('#target-kind', 'broadcast')
  await admin.fill('#event', 'notification')
  await admin.fill('#data', JSON.stringify({ title: 'Everyone', body: `broadcast ${stamp}` }))
  await admin.click('#send-button')
  const broadcastId = await within((async () => {
    for (;;) {
      const value = await admin.getAttribute('#send-result', 'data-id')
      if (value !== null && value !== id && value !== topicId) return value
      await new Promise<void>((resolve) => setTimeout(resolve, 50))
    }
  })(), 10_000, 'the dashboard to show the third event id')
  const broadcastItem = await demo.waitForSelector(`#events li[data-event="notification"][data-id="${broadcastId}"]`)
  t.match(await broadcastItem.textContent(), `broadcast ${stamp}`, 'the demo page shows the event sent to everyone')

  // The demo page changes its topics on the live stream: subscribe to sports, leave news.
  await demo.bringToFront()
  await demo.fill('#topic', 'sports')
  await demo.click('#subscribe')
  await demo.waitForSelector('#current-topics li[data-topic="sports"]')
  await demo.fill('#topic', 'news')
  await demo.click('#unsubscribe')
  await demo.waitForSelector('#current-topics li[data-topic="news"]', { state: 'detached' })
  t.pass('the demo page subscribed its stream to sports and left news')
  await admin.bringToFront()
  await admin.selectOption('#target-kind', 'topic')
  await admin.fill('#target', 'sports')
  await admin.fill('#event', 'announcement')
  await admin.fill('#data', `sports ${stamp}`)
  await admin.click('#send-button')
  const sportsId = await within((async () => {
    for (;;) {
      const value = await admin.getAttribute('#send-result', 'data-id')
      if (value !== null && value !== id && value !== topicId && value !== broadcastId) return value
      await new Promise<void>((resolve) => setTimeout(resolve, 50))
    }
  })(), 10_000, 'the dashboard to show the fourth event id')
  const sportsItem = await demo.waitForSelector(`#events li[data-event="announcement"][data-id="${sportsId}"]`)
  t.match(await sportsItem.textContent(), `sports ${stamp}`, 'the demo page shows the event sent to the topic it subscribed to')

  // A name the demo page does not know: the dashboard tells it before sending.
  const customName = `custom-${stamp}`.slice(0, 64)
  await admin.selectOption('#target-kind', 'user')
  await admin.fill('#target', 'u1')
  await admin.fill('#event', customName)
  await admin.fill('#data', `custom ${stamp}`)
  await admin.click('#send-button')
  const customId = await within((async () => {
    for (;;) {
      const value = await admin.getAttribute('#send-result', 'data-id')
      if (value !== null && ![id, topicId, broadcastId, sportsId].includes(value)) return value
      await new Promise<void>((resolve) => setTimeout(resolve, 50))
    }
  })(), 10_000, 'the dashboard to show the fifth event id')
  const customItem = await demo.waitForSelector(`#events li[data-event="${customName}"][data-id="${customId}"]`)
  t.match(await customItem.textContent(), `custom ${stamp}`, 'the demo page shows an event whose name only the dashboard knew')
  t.ok(await demo.$(`#listening li[data-event="${customName}"]`), 'and lists the name among those it listens for')
  t.same(browser.problems, [], 'no page errors on either page')
})

t.test('the dashboard lists the newest 500 streams, and its filter asks the gateway, so it finds the others', async (t) => {
  if (!needChromium(t)) return
  const gateway = await startGateway(t)
  const browser = await launchBrowser(t)
  // The oldest stream: with 500 newer ones it is past the page's listing.
  const { connected: needle } = await openConnected(`${gateway.url}/v1/stream?token=${userToken('needle-user')}`, { t })
  const BULK = 500
  for (let next = 0; next < BULK;) {
    const batch = Array.from({ length: Math.min(25, BULK - next) }, (_, i) => `bulk-${next + i}`)
    next += batch.length
    await Promise.all(batch.map(async (user) => await openConnected(`${gateway.url}/v1/stream?token=${userToken(user)}`, { t })))
  }

  const admin = await browser.newPage()
  await admin.goto(`${gateway.url}/admin`)
  await admin.fill('#token', adminToken())
  await admin.click('#connect')
  await admin.locator('#connections-count', { hasText: `(newest 500 of ${BULK + 1})` }).waitFor()
  t.equal(await admin.locator('#connections tbody tr').count(), 500, 'the table holds 500 rows')
  t.equal(await admin.locator('#connections tbody tr[data-user-id="needle-user"]').count(), 0, 'the oldest stream is not among them')
  t.equal(await admin.textContent('#stat-connections'), String(BULK + 1), 'the figures still count every stream')

  // Longer than the gateway takes (256 characters), cut where a surrogate pair would split.
  const asked = admin.waitForRequest((request) => request.url().includes('/v1/connections?') && request.url().includes('q=x'), { timeout: 10_000 })
  await admin.fill('#filter', `x${'\u{1F600}'.repeat(300)}`)
  await asked
  await admin.locator('#connections-empty', { hasText: 'No stream matches the filter.' }).waitFor()
  await admin.fill('#filter', 'needle')
  await admin.waitForSelector(`#connections tbody tr[data-connection-id="${needle.connectionId}"]`)
  await admin.locator('#connections-count', { hasText: '(1)' }).waitFor()
  t.pass('the filter found it through the gateway')
  t.same(browser.problems, [], 'no page errors')
})

t.test('a quiet stream\'s cursor moved by an id line alone is taken by Chromium\'s EventSource: its reconnect replays instead of reset', async (t) => {
  if (!needChromium(t)) return
  // Moved after 1 s of quiet; the first event's id is out of the window after 2 s.
  const gateway = await startGateway(t, { HISTORY_TTL_S: '2', RETRY_MS: '300' })
  const browser = await launchBrowser(t)
  const page = await browser.newPage()
  await page.goto(`${gateway.url}/demo`)
  const user = 'u-quiet-browser'
  const recorder = await pageEventSource(page, `/v1/stream?token=${encodeURIComponent(userToken(user))}`, {
    names: ['connected', 'first', 'missed', 'reset']
  })
  await recorder.waitEvents('connected', 1)
  const [first] = await publishOk(gateway.url, publisher, { to: { user }, event: 'first', data: 1 })
  await recorder.waitEvents('first', 1)
  const [connection] = gateway.app.registry.ofUser(user)
  await eventually(() => connection.lastId > Number(first) + 2_000_000, 'the stream\'s cursor to be moved past the first event\'s window', 10_000)

  // Ended as a drain ends it: the browser reconnects by itself, with its Last-Event-ID.
  gateway.app.streams.close(connection, 'shutdown', 'shutdown', { reason: 'server shutting down' })
  const [missed] = await publishOk(gateway.url, publisher, { to: { user }, event: 'missed', data: 2 })
  const [replayed] = await recorder.waitEvents('missed', 1)
  t.equal(replayed.lastEventId, missed, 'what was published while it was away is replayed')
  t.same(recorder.events().map((record) => record.type), ['connected', 'first', 'connected', 'missed'], 'no reset: the browser reconnected with the moved cursor')
  t.same(browser.problems, [], 'no page errors')
})
