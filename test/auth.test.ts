import { generateKeyPairSync } from 'node:crypto'
import t from 'tap'
import { metricValue, rawExchange, scrape } from './helpers/raw'
import {
  adminToken,
  ecKeyPair,
  nowS,
  openStream,
  publish,
  publisherToken,
  request,
  rsaKeyPair,
  secondsAhead,
  startGateway,
  token,
  userToken,
  type SseClient
} from './helpers'

const event = { to: { user: 'nobody' }, event: 'ping', data: 'x' }

/** A stream that must be refused: 401 with the JSON error shape, no stream registered. */
async function expect401 (t: tap.Test, url: string, headers: Record<string, string> = {}, query = ''): Promise<void> {
  const stream = await openStream(`${url}/v1/stream${query}`, { headers, t })
  t.equal(stream.status, 401, 'answered 401')
  if (stream.status !== 401) {
    t.fail(`a stream was opened: ${stream.text.slice(0, 200)}`)
    stream.close()
    return
  }
  t.match(stream.headers['content-type'], /^application\/json/)
  const body = stream.json<{ statusCode: number, error: string, message: string }>()
  t.match(body, { statusCode: 401, error: 'Unauthorized', message: String })
  t.ok(body.message.length > 0, 'the message says why')
  t.equal(stream.events.length, 0, 'no event was sent')
}

async function connectedUser (t: tap.Test, stream: SseClient): Promise<string> {
  t.equal(stream.status, 200, `answered 200${stream.status !== 200 ? `: ${stream.text}` : ''}`)
  if (stream.status !== 200) return ''
  const connected = await stream.nextEvent('connected')
  return (JSON.parse(connected.data) as { userId: string }).userId
}

t.test('a token is accepted from each source', async (t) => {
  const { url } = await startGateway(t)
  const jwt = userToken('u1')
  t.test('Authorization: Bearer', async (t) => {
    t.equal(await connectedUser(t, await openStream(`${url}/v1/stream`, { headers: { authorization: `Bearer ${jwt}` }, t })), 'u1')
  })
  t.test('Authorization: bearer (scheme is case-insensitive)', async (t) => {
    t.equal(await connectedUser(t, await openStream(`${url}/v1/stream`, { headers: { authorization: `bearer ${jwt}` }, t })), 'u1')
  })
  t.test('X-Auth-Token', async (t) => {
    t.equal(await connectedUser(t, await openStream(`${url}/v1/stream`, { headers: { 'x-auth-token': jwt }, t })), 'u1')
  })
  t.test('?token=', async (t) => {
    t.equal(await connectedUser(t, await openStream(`${url}/v1/stream?token=${jwt}`, { t })), 'u1')
  })
})

t.test('the first source present is the only one verified', async (t) => {
  const { url } = await startGateway(t)
  const good = userToken('u1')
  const bad = token({ sub: 'u1' }, { secret: 'wrong-secret' })
  t.test('a bad Authorization header with a good query token: 401', async (t) => {
    await expect401(t, url, { authorization: `Bearer ${bad}` }, `?token=${good}`)
  })
  t.test('an Authorization header of another scheme (Basic, as a browser sends on a site behind HTTP auth) is not a token source: the next one is used', async (t) => {
    const basic = `Basic ${Buffer.from('a:b').toString('base64')}`
    t.equal(await connectedUser(t, await openStream(`${url}/v1/stream`, { headers: { authorization: basic, 'x-auth-token': good }, t })), 'u1', 'X-Auth-Token')
    t.equal(await connectedUser(t, await openStream(`${url}/v1/stream?token=${good}`, { headers: { authorization: 'Digest username="a"' }, t })), 'u1', '?token=')
    await expect401(t, url, { authorization: basic, 'x-auth-token': bad }, `?token=${good}`)
    await expect401(t, url, { authorization: basic })
  })
  t.test('a malformed Bearer header with a good X-Auth-Token: 401', async (t) => {
    await expect401(t, url, { authorization: 'Bearer', 'x-auth-token': good })
    await expect401(t, url, { authorization: 'Bearer a b', 'x-auth-token': good })
    await expect401(t, url, { authorization: bad }, `?token=${good}`)
  })
  t.test('a bad X-Auth-Token with a good query token: 401', async (t) => {
    await expect401(t, url, { 'x-auth-token': bad }, `?token=${good}`)
  })
  t.test('two Authorization headers are ambiguous (a proxy may read the other one): 401, whichever comes first', async (t) => {
    const port = Number(new URL(url).port)
    const publisher = publisherToken()
    const body = JSON.stringify(event)
    for (const [first, second] of [[`Bearer ${publisher}`, 'Bearer bad'], [`Bearer ${publisher}`, `Bearer ${publisher}`], [`Basic ${Buffer.from('a:b').toString('base64')}`, `Bearer ${publisher}`]]) {
      const exchange = await rawExchange(port, `POST /v1/publish HTTP/1.1\r\nHost: x\r\nAuthorization: ${first}\r\nauthorization: ${second}\r\nContent-Type: application/json\r\nContent-Length: ${Buffer.byteLength(body)}\r\nConnection: close\r\n\r\n${body}`)
      const answer = exchange.response()
      t.equal(answer.status, 401, `${first.slice(0, 6)} then ${second.slice(0, 6)}: 401`)
      t.match(JSON.parse(answer.body), { statusCode: 401, error: 'Unauthorized' })
    }
    const one = await rawExchange(port, `POST /v1/publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${publisher}\r\nContent-Type: application/json\r\nContent-Length: ${Buffer.byteLength(body)}\r\nConnection: close\r\n\r\n${body}`)
    t.equal(one.response().status, 202, 'one header: 202')
  })
  t.test('a good Authorization header wins over a bad X-Auth-Token and a bad query token', async (t) => {
    const stream = await openStream(`${url}/v1/stream?token=${bad}`, { headers: { authorization: `Bearer ${good}`, 'x-auth-token': bad }, t })
    t.equal(await connectedUser(t, stream), 'u1')
  })
})

t.test('bad tokens get 401 with {statusCode: 401, error: "Unauthorized", message}', async (t) => {
  const { url } = await startGateway(t)
  const cases: Array<[string, Record<string, string>, string]> = [
    ['no token at all', {}, ''],
    ['an empty query token', {}, '?token='],
    ['an empty Bearer', { authorization: 'Bearer ' }, ''],
    ['a malformed token (not a JWT)', { authorization: 'Bearer not-a-jwt' }, ''],
    ['a token with two parts', { authorization: `Bearer ${userToken('u1').split('.').slice(0, 2).join('.')}` }, ''],
    ['a bad signature', { authorization: `Bearer ${token({ sub: 'u1' }, { secret: 'another-secret' })}` }, ''],
    ['a tampered payload', { authorization: `Bearer ${tamper(userToken('u1'), { sub: 'admin-user', roles: ['admin'] })}` }, ''],
    ['an expired token (exp one second ago)', { authorization: `Bearer ${token({ sub: 'u1', exp: nowS() - 1 })}` }, ''],
    ['a token not yet valid (nbf in the future)', { authorization: `Bearer ${token({ sub: 'u1', nbf: nowS() + 60 })}` }, ''],
    ['alg none (unsigned)', { authorization: `Bearer ${token({ sub: 'u1' }, { alg: 'none' })}` }, ''],
    ['alg none without the trailing dot', { authorization: `Bearer ${token({ sub: 'u1' }, { alg: 'none' }).replace(/\.$/, '')}` }, ''],
    ['alg None (case variant) signed with the secret', { authorization: `Bearer ${token({ sub: 'u1' }, { header: { alg: 'None' } })}` }, ''],
    ['a token with no user id claim', { authorization: `Bearer ${token({ roles: ['publisher'] })}` }, '']
  ]
  for (const [name, headers, query] of cases) {
    t.test(name, async (t) => await expect401(t, url, headers, query))
  }
  t.test('a JSON route answers the same shape', async (t) => {
    const response = await request(`${url}/v1/publish`, { method: 'POST', body: event })
    t.equal(response.status, 401)
    t.match(response.json, { statusCode: 401, error: 'Unauthorized', message: String })
  })
})

function tamper (jwt: string, claims: Record<string, unknown>): string {
  const [header, payload, signature] = jwt.split('.')
  const decoded = JSON.parse(Buffer.from(payload, 'base64url').toString()) as Record<string, unknown>
  return `${header}.${Buffer.from(JSON.stringify({ ...decoded, ...claims })).toString('base64url')}.${signature}`
}

t.test('JWT_ISSUER and JWT_AUDIENCE are enforced when set', async (t) => {
  const { url } = await startGateway(t, { JWT_ISSUER: 'https://issuer.test', JWT_AUDIENCE: 'sse-gateway' })
  t.test('the right iss and aud pass', async (t) => {
    const jwt = token({ sub: 'u1', iss: 'https://issuer.test', aud: 'sse-gateway' })
    t.equal(await connectedUser(t, await openStream(`${url}/v1/stream?token=${jwt}`, { t })), 'u1')
  })
  t.test('an aud array holding the audience passes', async (t) => {
    const jwt = token({ sub: 'u1', iss: 'https://issuer.test', aud: ['other', 'sse-gateway'] })
    t.equal(await connectedUser(t, await openStream(`${url}/v1/stream?token=${jwt}`, { t })), 'u1')
  })
  t.test('a wrong issuer: 401', async (t) => {
    await expect401(t, url, {}, `?token=${token({ sub: 'u1', iss: 'https://evil.test', aud: 'sse-gateway' })}`)
  })
  t.test('a wrong audience: 401', async (t) => {
    await expect401(t, url, {}, `?token=${token({ sub: 'u1', iss: 'https://issuer.test', aud: 'another-service' })}`)
  })
  t.test('no issuer claim: 401', async (t) => {
    await expect401(t, url, {}, `?token=${token({ sub: 'u1', aud: 'sse-gateway' })}`)
  })
  t.test('no audience claim: 401', async (t) => {
    await expect401(t, url, {}, `?token=${token({ sub: 'u1', iss: 'https://issuer.test' })}`)
  })
})

t.test('RS256 tokens verify with JWT_PUBLIC_KEY (no JWT_SECRET)', async (t) => {
  const keys = rsaKeyPair()
  const { url } = await startGateway(t, { JWT_SECRET: '', JWT_PUBLIC_KEY: keys.publicKeyPem })
  const good = token({ sub: 'rs-user' }, { alg: 'RS256', privateKey: keys.privateKey })
  t.equal(await connectedUser(t, await openStream(`${url}/v1/stream?token=${good}`, { t })), 'rs-user')
  t.test('signed by another key: 401', async (t) => {
    await expect401(t, url, {}, `?token=${token({ sub: 'u1' }, { alg: 'RS256', privateKey: rsaKeyPair().privateKey })}`)
  })
  t.test('an HS256 token (no secret configured): 401', async (t) => {
    await expect401(t, url, {}, `?token=${userToken('u1')}`)
  })
  t.test('an HS256 token signed with the public key PEM as HMAC secret: 401', async (t) => {
    await expect401(t, url, {}, `?token=${token({ sub: 'u1' }, { secret: keys.publicKeyPem })}`)
  })
  t.test('an expired RS256 token: 401', async (t) => {
    await expect401(t, url, {}, `?token=${token({ sub: 'u1', exp: nowS() - 1 }, { alg: 'RS256', privateKey: keys.privateKey })}`)
  })
})

t.test('ES256 tokens verify with JWT_PUBLIC_KEY', async (t) => {
  const keys = ecKeyPair()
  const { url } = await startGateway(t, { JWT_SECRET: '', JWT_PUBLIC_KEY: keys.publicKeyPem })
  const good = token({ sub: 'es-user' }, { alg: 'ES256', privateKey: keys.privateKey })
  t.equal(await connectedUser(t, await openStream(`${url}/v1/stream?token=${good}`, { t })), 'es-user')
  await expect401(t, url, {}, `?token=${token({ sub: 'u1' }, { alg: 'ES256', privateKey: ecKeyPair().privateKey })}`)
})

t.test('with JWT_SECRET and JWT_PUBLIC_KEY: HS verifies with the secret, RS with the key, never HS with the key', async (t) => {
  const keys = rsaKeyPair()
  const { url } = await startGateway(t, { JWT_PUBLIC_KEY: keys.publicKeyPem })
  t.test('HS256 with the secret passes', async (t) => {
    t.equal(await connectedUser(t, await openStream(`${url}/v1/stream?token=${userToken('hs-user')}`, { t })), 'hs-user')
  })
  t.test('RS256 with the key passes', async (t) => {
    const jwt = token({ sub: 'rs-user' }, { alg: 'RS256', privateKey: keys.privateKey })
    t.equal(await connectedUser(t, await openStream(`${url}/v1/stream?token=${jwt}`, { t })), 'rs-user')
  })
  t.test('algorithm confusion: HS256 signed with the PEM public key text: 401', async (t) => {
    await expect401(t, url, {}, `?token=${token({ sub: 'u1' }, { secret: keys.publicKeyPem })}`)
  })
  t.test('algorithm confusion with the PEM minus its trailing newline: 401', async (t) => {
    await expect401(t, url, {}, `?token=${token({ sub: 'u1' }, { secret: keys.publicKeyPem.trim() })}`)
  })
  t.test('alg none: 401', async (t) => {
    await expect401(t, url, {}, `?token=${token({ sub: 'u1', roles: ['admin'] }, { alg: 'none' })}`)
  })
})

t.test('roles: a user token on POST /v1/publish is 403; publisher and admin pass', async (t) => {
  const { url } = await startGateway(t)
  t.test('user: 403 with the error shape', async (t) => {
    const answer = await publish(url, userToken('u1'), event)
    t.equal(answer.status, 403)
    t.match(answer.json, { statusCode: 403, error: 'Forbidden', message: String })
  })
  t.test('an unknown role is a user: 403', async (t) => {
    t.equal((await publish(url, token({ sub: 'u1', roles: ['editor'] }), event)).status, 403)
  })
  t.test('publisher (roles array): 202', async (t) => {
    t.equal((await publish(url, publisherToken(), event)).status, 202)
  })
  t.test('publisher (role string): 202', async (t) => {
    t.equal((await publish(url, token({ sub: 'svc', role: 'publisher' }), event)).status, 202)
  })
  t.test('admin: 202', async (t) => {
    t.equal((await publish(url, adminToken(), event)).status, 202)
  })
  t.test('publisher via X-Auth-Token and ?token=: 202', async (t) => {
    const jwt = publisherToken()
    t.equal((await request(`${url}/v1/publish`, { method: 'POST', headers: { 'x-auth-token': jwt }, body: event })).status, 202)
    t.equal((await request(`${url}/v1/publish?token=${jwt}`, { method: 'POST', body: event })).status, 202)
  })
  t.test('no token: 401', async (t) => {
    t.equal((await request(`${url}/v1/publish`, { method: 'POST', body: event })).status, 401)
  })
})

t.test('the user id comes from JWT_USER_CLAIM (default sub), falling back to userId, then id', async (t) => {
  t.test('default claim: sub wins over userId and id', async (t) => {
    const { url } = await startGateway(t)
    const jwt = token({ sub: 'from-sub', userId: 'from-userId', id: 'from-id' })
    t.equal(await connectedUser(t, await openStream(`${url}/v1/stream?token=${jwt}`, { t })), 'from-sub')
  })
  t.test('a user id that holds a JWT (it would be logged with each stream): 401; a dotted id is not one', async (t) => {
    const { url } = await startGateway(t)
    const inner = token({ sub: 'x' })
    for (const sub of [inner, `user-${inner}`]) {
      const refused = await openStream(`${url}/v1/stream?token=${token({ sub })}`, { t })
      t.equal(refused.status, 401)
      t.match(refused.json(), { statusCode: 401, message: /user id holds a JWT/ })
    }
    // Ids that merely look like one (eyJ, then two dots): emails, dotted names.
    for (const sub of ['first.last.example', 'MickeyJ.R.Smith@example.com', 'bob@heyJude.co.uk', 'tenant.surveyJobs.eu.42', 'eyJ.a.b']) {
      t.equal(await connectedUser(t, await openStream(`${url}/v1/stream?token=${token({ sub })}`, { t })), sub)
    }
  })
  t.test('no sub: userId', async (t) => {
    const { url } = await startGateway(t)
    const jwt = token({ userId: 'from-userId', id: 'from-id' })
    t.equal(await connectedUser(t, await openStream(`${url}/v1/stream?token=${jwt}`, { t })), 'from-userId')
  })
  t.test('no sub, no userId: id', async (t) => {
    const { url } = await startGateway(t)
    const jwt = token({ id: 'from-id' })
    t.equal(await connectedUser(t, await openStream(`${url}/v1/stream?token=${jwt}`, { t })), 'from-id')
  })
  t.test('JWT_USER_CLAIM=uid: uid wins over sub', async (t) => {
    const { url } = await startGateway(t, { JWT_USER_CLAIM: 'uid' })
    const jwt = token({ uid: 'from-uid', sub: 'from-sub' })
    t.equal(await connectedUser(t, await openStream(`${url}/v1/stream?token=${jwt}`, { t })), 'from-uid')
  })
  t.test('JWT_USER_CLAIM=uid without uid: userId, then id (not sub)', async (t) => {
    const { url } = await startGateway(t, { JWT_USER_CLAIM: 'uid' })
    const withUserId = token({ sub: 'from-sub', userId: 'from-userId' })
    t.equal(await connectedUser(t, await openStream(`${url}/v1/stream?token=${withUserId}`, { t })), 'from-userId')
    const withId = token({ sub: 'from-sub', id: 'from-id' })
    t.equal(await connectedUser(t, await openStream(`${url}/v1/stream?token=${withId}`, { t })), 'from-id')
  })
  t.test('JWT_USER_CLAIM=user.id reads a nested claim ({"user":{"id"}}); a claim named user.id wins; no such path falls back', async (t) => {
    const { url } = await startGateway(t, { JWT_USER_CLAIM: 'user.id' })
    const nested = token({ user: { id: 'from-nested' }, sub: 'from-sub' })
    t.equal(await connectedUser(t, await openStream(`${url}/v1/stream?token=${nested}`, { t })), 'from-nested')
    const numeric = token({ user: { id: 42 } })
    t.equal(await connectedUser(t, await openStream(`${url}/v1/stream?token=${numeric}`, { t })), '42')
    const dotted = token({ 'user.id': 'from-dotted', user: { id: 'from-nested' } })
    t.equal(await connectedUser(t, await openStream(`${url}/v1/stream?token=${dotted}`, { t })), 'from-dotted')
    const noPath = token({ user: 'not-an-object', userId: 'from-userId' })
    t.equal(await connectedUser(t, await openStream(`${url}/v1/stream?token=${noPath}`, { t })), 'from-userId')
    const emptyUser = token({ user: {}, sub: 'from-sub' })
    const refused = await openStream(`${url}/v1/stream?token=${emptyUser}`, { t })
    t.equal(refused.status, 401, 'no user id at the path, nor userId or id: 401')
    t.match(refused.json(), { statusCode: 401, error: 'Unauthorized' })
  })
})

t.test('tokens never appear in any log line', async (t) => {
  const { url, app, logs, logText } = await startGateway(t, {}, { captureLogs: true })
  const user = userToken('log-user', { jti: 'user-token-for-log-test' })
  const publisher = token({ sub: 'log-backend', roles: ['publisher'], jti: 'publisher-token-for-log-test' })
  const forged = token({ sub: 'log-user', jti: 'forged-token-for-log-test' }, { secret: 'not-the-secret' })
  const expired = token({ sub: 'log-user', exp: nowS() - 10, jti: 'expired-token-for-log-test' })
  const unsigned = token({ sub: 'log-user', jti: 'unsigned-token-for-log-test' }, { alg: 'none' })
  const garbage = 'GARBAGE-TOKEN-7f3a9c2e51b8d4'
  const secrets = [user, publisher, forged, expired, unsigned, garbage]

  // Streams with a valid token from each source: opened, then closed (both log a line).
  const streams = [
    await openStream(`${url}/v1/stream?token=${user}&topics=news`, { t }),
    await openStream(`${url}/v1/stream`, { headers: { authorization: `Bearer ${user}` }, t }),
    await openStream(`${url}/v1/stream`, { headers: { 'x-auth-token': user }, t })
  ]
  for (const stream of streams) await stream.nextEvent('connected')
  // Rejected streams, from each source.
  for (const bad of [forged, expired, unsigned, garbage]) {
    const sources: Array<{ query: string, headers: Record<string, string> }> = [
      { query: `?token=${bad}`, headers: {} },
      { query: '', headers: { authorization: `Bearer ${bad}` } },
      { query: '', headers: { 'x-auth-token': bad } }
    ]
    for (const options of sources) {
      const stream = await openStream(`${url}/v1/stream${options.query}`, { headers: options.headers, t })
      t.equal(stream.status, 401)
    }
  }
  // JSON routes: accepted, forbidden and rejected publishes from each source.
  t.equal((await request(`${url}/v1/publish?token=${publisher}`, { method: 'POST', body: { to: { user: 'log-user' }, data: 'hi' } })).status, 202)
  t.equal((await request(`${url}/v1/publish`, { method: 'POST', headers: { 'x-auth-token': publisher }, body: { to: { user: 'log-user' }, data: 'hi' } })).status, 202)
  t.equal((await request(`${url}/v1/publish`, { method: 'POST', token: publisher, body: { to: { user: 'log-user' }, data: 'hi' } })).status, 202)
  t.equal((await request(`${url}/v1/publish`, { method: 'POST', token: publisher, body: '{"broken' })).status, 400)
  t.equal((await request(`${url}/v1/publish?token=${user}`, { method: 'POST', body: { to: { user: 'x' }, data: 'hi' } })).status, 403)
  t.equal((await request(`${url}/v1/publish`, { method: 'POST', token: forged, body: { to: { user: 'x' }, data: 'hi' } })).status, 401)
  t.equal((await request(`${url}/v1/publish?token=${expired}`, { method: 'POST', body: { to: { user: 'x' }, data: 'hi' } })).status, 401)
  // Unknown routes and unauthenticated ones, with tokens in query and headers.
  t.equal((await request(`${url}/no/such/route?token=${user}`, { headers: { 'x-auth-token': publisher } })).status, 404)
  t.equal((await request(`${url}/v1/nothing-here?a=1&token=${garbage}&b=2`, { token: user })).status, 404)
  t.equal((await request(`${url}/health?token=${user}`, { token: publisher })).status, 200)
  for (const stream of streams) stream.close()
  // Each close writes its own log line; wait for them so they are searched too.
  await new Promise<void>((resolve, reject) => {
    const deadline = Date.now() + 5000
    const poll = (): void => {
      if (app.registry.size === 0 && logs.filter((line) => line.includes('stream closed')).length >= 3) resolve()
      else if (Date.now() > deadline) reject(new Error('streams did not log their close'))
      else setTimeout(poll, 10)
    }
    poll()
  })

  const text = logText()
  t.ok(logs.length > 20, `log lines were captured (${logs.length})`)
  t.match(text, /stream opened/, 'stream opens are logged')
  // The message telling a client where a token goes says "?token=" with nothing after it.
  const queryTokens = [...text.matchAll(/token=([^&"\s]*)/g)].map((match) => match[1])
  t.ok(queryTokens.includes('[redacted]'), 'logged URLs with a query token were logged')
  t.same(queryTokens.filter((value) => value !== '[redacted]' && value !== ''), [], 'every query token in a logged URL is replaced')
  for (const secret of secrets) {
    const parts = secret.split('.')
    t.notOk(text.includes(secret), `token ${secret.slice(0, 12)}… is not logged`)
    // A payload or signature alone would leak it too.
    for (const part of parts.slice(1)) if (part.length > 10) t.notOk(text.includes(part), 'no part of it is logged')
  }
})

t.test('a stream whose token expires while open gets `auth-expired` (no id line) and is closed', async (t) => {
  const { url, app } = await startGateway(t)
  const exp = secondsAhead(2)
  const stream = await openStream(`${url}/v1/stream?token=${token({ sub: 'short-lived', exp })}`, { t })
  t.equal(await connectedUser(t, stream), 'short-lived')
  const bound = exp * 1000 - Date.now() + 3000
  const expired = await stream.nextEvent('auth-expired', bound)
  t.equal(expired.id, undefined, 'auth-expired carries no id line')
  await stream.waitEnd(3000)
  t.ok(stream.ended, 'the server closed the stream')
  t.equal(app.registry.size, 0, 'and forgot it')
})

t.test('a token not valid yet and a token whose exp is not a number say why, in the answer and in sse_auth_failures_total', async (t) => {
  const { url } = await startGateway(t)
  const early = await request(`${url}/v1/stream?token=${token({ sub: 'u1', nbf: nowS() + 60 })}`)
  t.equal(early.status, 401)
  t.match(early.json, { statusCode: 401, error: 'Unauthorized', message: 'token is not valid yet (nbf)' })
  const oddExp = await request(`${url}/v1/stream?token=${token({ sub: 'u1', exp: String(nowS() + 60) })}`)
  t.equal(oddExp.status, 401)
  t.match(oddExp.json, { message: 'token is invalid' })
  const samples = await scrape(url)
  t.equal(metricValue(samples, 'sse_auth_failures_total', { reason: 'inactive' }), 1)
  t.equal(metricValue(samples, 'sse_auth_failures_total', { reason: 'invalid' }), 1)
})

t.test('an ES256 token whose signature the key cannot check (signed on another curve) is invalid, not malformed', async (t) => {
  const { privateKey, publicKey } = generateKeyPairSync('ec', { namedCurve: 'P-384' })
  const { url } = await startGateway(t, { JWT_PUBLIC_KEY: publicKey.export({ type: 'spki', format: 'pem' }).toString() })
  // A P-384 signature is 96 bytes where ES256 takes 64: the verifier throws rather than answering false.
  const answer = await request(`${url}/v1/stream?token=${token({ sub: 'u1' }, { alg: 'ES256', privateKey })}`)
  t.equal(answer.status, 401)
  t.match(answer.json, { message: 'token is invalid' })
  const samples = await scrape(url)
  t.equal(metricValue(samples, 'sse_auth_failures_total', { reason: 'invalid' }), 1, 'counted as invalid')
  t.equal(metricValue(samples, 'sse_auth_failures_total', { reason: 'malformed' }), 0, 'not as malformed')
})
