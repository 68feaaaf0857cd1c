import t from 'tap'
import {
  eventually, forEachMode, interceptNextAdmission, nowS, openConnected, openStream, publishOk, publisherToken, secondsAhead, startCluster, token
} from './helpers'
import { metricValue, scrape } from './helpers/raw'

const publisher = publisherToken()

forEachMode(t, 'a stream whose token expires in 2 s receives `auth-expired` (no id) and is closed', async (t, mode) => {
  const [gateway] = await startCluster(t, mode, 1, { KEEPALIVE_MS: '60000' })
  const { url, app } = gateway
  const exp = secondsAhead(2)
  const { stream, connected } = await openConnected(`${url}/v1/stream?token=${token({ sub: 'u1', exp })}`, { t })

  // Still served before it expires.
  const [id] = await publishOk(url, publisher, { to: { user: 'u1' }, event: 'before', data: 'still valid' })
  t.equal((await stream.nextEvent('before')).id, id)

  const expired = await stream.nextEvent('auth-expired', 8000)
  t.equal(expired.id, undefined, '`auth-expired` carries no id line')
  t.equal(stream.lastEventId, id, 'the browser cursor still points at the last real event')
  t.doesNotThrow(() => JSON.parse(expired.data), 'its data is JSON')
  t.ok(Date.now() >= exp * 1000, 'not before exp')
  await stream.waitEnd(3000)
  t.ok(stream.ended, 'the stream is closed')
  t.equal(stream.unread().length, 0, 'nothing after `auth-expired`')

  await eventually(() => app.registry.get(connected.connectionId) === undefined, 'the expired stream to leave the registry')
  const samples = await scrape(url)
  t.equal(metricValue(samples, 'sse_connections_closed_total', { reason: 'expired' }), 1, 'closed with reason expired')
  t.equal(metricValue(samples, 'sse_connections'), 0)
})

t.test('expiry closes only the expiring stream: one with a longer-lived token stays open and keeps receiving', async (t) => {
  const [gateway] = await startCluster(t, 'memory', 1)
  const { url } = gateway
  const { stream: short } = await openConnected(`${url}/v1/stream?token=${token({ sub: 'u1', exp: secondsAhead(2) })}`, { t })
  const { stream: long } = await openConnected(`${url}/v1/stream?token=${token({ sub: 'u1' })}`, { t })
  await short.nextEvent('auth-expired', 8000)
  await short.waitEnd(3000)
  const [id] = await publishOk(url, publisher, { to: { user: 'u1' }, event: 'after', data: 1 })
  t.equal((await long.nextEvent('after')).id, id, 'the other tab of the same user still receives')
  t.notOk(long.events.some((event) => event.event === 'auth-expired'))
})

t.test('a job stream is a stream: its token expiring closes it with `auth-expired`', async (t) => {
  const [gateway] = await startCluster(t, 'memory', 1)
  const { url } = gateway
  const { stream } = await openConnected(`${url}/v1/jobs/stream?token=${token({ sub: 'u1', exp: secondsAhead(2) })}`, { t })
  await stream.nextEvent('auth-expired', 8000)
  await stream.waitEnd(3000)
  t.ok(stream.ended)
})

t.test('a token that has already expired opens nothing: 401 with the JSON error shape', async (t) => {
  const [gateway] = await startCluster(t, 'memory', 1)
  const { url, app } = gateway
  for (const [name, exp] of [['a minute ago', nowS() - 60], ['one second ago', nowS() - 1], ['exactly now (no leeway)', nowS()]] as const) {
    const stream = await openStream(`${url}/v1/stream?token=${token({ sub: 'u1', exp })}`, { t })
    t.equal(stream.status, 401, `exp ${name}: 401`)
    t.match(stream.json(), { statusCode: 401, error: 'Unauthorized', message: String })
    t.notMatch(stream.text, /event: connected/)
  }
  t.equal(app.registry.size, 0, 'no stream was opened')
  t.ok(metricValue(await scrape(url), 'sse_auth_failures_total') >= 3, 'counted as auth failures')
})

t.test('a token that runs out while its stream waits to be admitted still gets `auth-expired` once the stream opens', async (t) => {
  const [gateway] = await startCluster(t, 'memory', 1, { KEEPALIVE_MS: '60000' })
  const exp = secondsAhead(1)
  // Admitted only once the token has been expired for a while: its expiry's
  // moment has passed when the stream is registered.
  interceptNextAdmission(t, gateway, async (admit) => {
    await eventually(() => Date.now() >= exp * 1000 + 600, 'the token to have expired 600 ms ago', 5000, 20)
    return await admit()
  })
  const { stream } = await openConnected(`${gateway.url}/v1/stream?token=${token({ sub: 'late-u1', exp })}`, { t, timeoutMs: 8000 })
  await stream.nextEvent('auth-expired', 5000)
  await stream.waitEnd(3000)
  t.ok(stream.ended, 'and closed')
})

t.test('streams whose tokens run out at many different moments each get `auth-expired` at theirs', async (t) => {
  const [gateway] = await startCluster(t, 'memory', 1, { KEEPALIVE_MS: '60000' })
  const base = secondsAhead(0)
  const streams = await Promise.all([1, 2, 3, 4].map(async (offset) => {
    const exp = base + offset
    const { stream } = await openConnected(`${gateway.url}/v1/stream?token=${token({ sub: `spread-u${offset}`, exp })}`, { t })
    return { stream, exp }
  }))
  for (const { stream, exp } of streams) {
    await stream.nextEvent('auth-expired', 8000)
    t.ok(Date.now() >= exp * 1000, `the token expiring at +${exp - base} s: not before its exp`)
  }
  // Expiries inside a tick's span (exp may be fractional, RFC 7519): each
  // is read again at every tick until its moment, not only at the first.
  const within = await Promise.all(Array.from({ length: 10 }, async (_, k) => {
    const exp = secondsAhead(1) + k * 0.024
    const { stream } = await openConnected(`${gateway.url}/v1/stream?token=${token({ sub: `within-u${k}`, exp })}`, { t })
    return { stream, exp }
  }))
  for (const { stream, exp } of within) {
    await stream.nextEvent('auth-expired', 5000)
    t.ok(Date.now() >= exp * 1000, `the token expiring at ${exp}: not before its exp`)
  }
  // Streams opened after the first ticks land in buckets still to come.
  const { stream: later } = await openConnected(`${gateway.url}/v1/stream?token=${token({ sub: 'spread-later', exp: secondsAhead(1) })}`, { t })
  await later.nextEvent('auth-expired', 5000)
  t.pass('a stream opened after the others expired is expired too')
})

t.test('after the clock steps back, a token still expires at its exp, not when the clock is back where it was', async (t) => {
  const [gateway] = await startCluster(t, 'memory', 1, { KEEPALIVE_MS: '60000' })
  const realNow = Date.now.bind(Date)
  // Set back 30 s, as a clock corrected by NTP would be: the gateway has
  // already read buckets up to the real now.
  Date.now = () => realNow() - 30_000
  t.teardown(() => { Date.now = realNow })
  const exp = Math.floor(Date.now() / 1000) + 2
  const { stream } = await openConnected(`${gateway.url}/v1/stream?token=${token({ sub: 'stepped-u1', exp })}`, { t })
  await stream.nextEvent('auth-expired', 8000)
  t.ok(Date.now() >= exp * 1000, 'at its exp by the stepped clock, within seconds, not 30 s later')
})
