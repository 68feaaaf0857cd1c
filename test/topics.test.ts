/**
 * Topics (seed 004): `?topics=` at open, per-stream and user-wide
 * subscriptions, publish to a topic, the token's `topics` claim, topic-name
 * validation and per-topic counts. Every test runs in embedded and Redis mode;
 * in Redis mode two instances share the work wherever that proves something.
 */
import t, { type Test } from 'tap'
import { eventually, openConnected, openStream, publish, userToken } from './helpers'
import {
  connect, namesOf, pair, presence, publishTo, PUBLISHER, settle, stats, subscriptions, tryOpen, type Connected
} from './helpers/channels'
import { forEachMode } from './helpers/modes'
import { startGateway, type Gateway } from './helpers/gateway'
import { needRedis, redisClient, startOwnRedis, uniquePrefix } from './helpers/redis'

const sorted = (values: string[]): string[] => [...values].sort()

forEachMode(t, '?topics=a,b subscribes at open: a topic event reaches the streams subscribed to it and no other', async (t, mode) => {
  const [a, b] = await pair(t, mode)
  const alice = await connect(t, a, 'alice', { topics: 'news,sport' })
  const bob = await connect(t, b, 'bob', { topics: 'weather' })
  const carol = await connect(t, b, 'carol')
  t.same(sorted(alice.connected.topics), ['news', 'sport'], 'connected lists the topics')
  t.same(bob.connected.topics, ['weather'])

  const news = await publishTo(b, { to: { topic: 'news' }, event: 'headline', data: { n: 1 } })
  const sport = await publishTo(a, { to: { topic: 'sport' }, event: 'score', data: { n: 2 } })
  const received = (await settle(a, alice.stream, alice.connectionId)).filter((event) => event.event !== 'marker')
  t.same(received.map((event) => [event.id, event.event, event.data]), [[news, 'headline', '{"n":1}'], [sport, 'score', '{"n":2}']])
  t.same(namesOf(await settle(b, bob.stream, bob.connectionId)), [], 'a stream subscribed to another topic receives nothing')
  t.same(namesOf(await settle(b, carol.stream, carol.connectionId)), [], 'a stream with no topics receives nothing')
})

t.test('?topics= repeated (topics=a&topics=b,c) is one list; more than 100 names in one request: 400', async (t) => {
  const { url } = await startGateway(t)
  const { connected } = await openConnected(`${url}/v1/stream?token=${userToken('rep')}&topics=news&topics=sport,weather&topics=news`, { t })
  t.same([...connected.topics].sort(), ['news', 'sport', 'weather'], 'every name, each once')
  // As a URL is typed or joined: spaces around names and empty entries do not count (README).
  const loose = await openConnected(`${url}/v1/stream?token=${userToken('rep')}&topics=news,%20sport%20,,&topics=`, { t })
  t.same([...loose.connected.topics].sort(), ['news', 'sport'], 'spaces and empty entries ignored')
  const inner = await openStream(`${url}/v1/stream?token=${userToken('rep')}&topics=a%20b`, { t })
  t.equal(inner.status, 400, 'a space inside a name: 400')
  const many = Array.from({ length: 101 }, (_, i) => `topics=t${i}`).join('&')
  const refused = await openStream(`${url}/v1/stream?token=${userToken('rep')}&${many}`, { t })
  t.equal(refused.status, 400)
  t.match(refused.json(), { statusCode: 400, error: 'Bad Request', message: String })
  // The list styles of qs and axios would open a stream subscribed to nothing.
  for (const query of ['topics[]=news&topics[]=sport', 'topics%5B%5D=news', 'topics[0]=news']) {
    const bracketed = await openStream(`${url}/v1/stream?token=${userToken('rep')}&${query}`, { t })
    t.equal(bracketed.status, 400, `${query}: 400`)
    t.match(bracketed.json(), { code: 'GW_BAD_REQUEST', message: /topics=a,b/ })
  }
})

forEachMode(t, 'POST /v1/subscriptions with a connectionId adds topics to that stream only; DELETE removes them', async (t, mode) => {
  const [a, b] = await pair(t, mode)
  const token = userToken('alice')
  const tab1 = await connect(t, b, 'alice', { topics: 'news' })
  const tab2 = await connect(t, b, 'alice')

  // Subscribed through instance A, the stream lives on instance B.
  const added = await subscriptions(a, token, 'POST', { topics: ['live', 'scores'], connectionId: tab1.connectionId })
  t.equal(added.status, 200)
  t.same(sorted(added.json.topics), ['live', 'news', 'scores'], "the answer lists that stream's topics")
  const goal = await publishTo(a, { to: { topic: 'live' }, event: 'goal', data: { minute: 12 } })
  t.same((await settle(a, tab1.stream, tab1.connectionId)).filter((event) => event.event === 'goal').map((event) => event.id), [goal])
  t.same(namesOf(await settle(a, tab2.stream, tab2.connectionId)), [], 'the other tab of the same user did not join')

  const removed = await subscriptions(a, token, 'DELETE', { topics: ['live'], connectionId: tab1.connectionId })
  t.equal(removed.status, 200)
  t.same(sorted(removed.json.topics), ['news', 'scores'])
  await publishTo(b, { to: { topic: 'live' }, event: 'goal', data: { minute: 80 } })
  const score = await publishTo(b, { to: { topic: 'scores' }, event: 'score', data: '2-1' })
  t.same((await settle(b, tab1.stream, tab1.connectionId)).filter((event) => event.id !== undefined && event.event !== 'marker').map((event) => [event.event, event.id]),
    [['score', score]], 'after DELETE only the topics it kept reach it')
})

forEachMode(t, 'POST /v1/subscriptions for another user\'s or an unknown connectionId is 404 and changes nothing', async (t, mode) => {
  const [a, b] = await pair(t, mode)
  const bob = await connect(t, b, 'bob')
  const foreign = await subscriptions(a, userToken('mallory'), 'POST', { topics: ['spy'], connectionId: bob.connectionId })
  t.equal(foreign.status, 404)
  t.match(foreign.json, { statusCode: 404, error: 'Not Found', message: String })
  const unknown = await subscriptions(a, userToken('mallory'), 'POST', { topics: ['spy'], connectionId: 'c_doesnotexist' })
  t.equal(unknown.status, 404)
  await publishTo(a, { to: { topic: 'spy' }, event: 'leak', data: 1 })
  t.same(namesOf(await settle(a, bob.stream, bob.connectionId)), [], "bob's stream did not join the topic")
})

forEachMode(t, 'a user-wide subscription joins every live stream of the user cluster-wide and the streams opened later, until DELETE', async (t, mode) => {
  const [a, b] = await pair(t, mode)
  const token = userToken('alice')
  const onA = await connect(t, a, 'alice')
  const onB = await connect(t, b, 'alice')
  const bob = await connect(t, b, 'bob')

  // Made through instance A: the stream on instance B must join as well.
  const answer = await subscriptions(a, token, 'POST', { topics: ['alerts'] })
  t.equal(answer.status, 200)
  t.same(answer.json.topics, ['alerts'], 'the answer lists the user-wide topics')
  const first = await publishTo(b, { to: { topic: 'alerts' }, event: 'alert', data: { level: 'high' } })
  for (const tab of [onA, onB]) t.equal((await tab.stream.nextEvent('alert')).id, first)
  t.same(namesOf(await settle(b, bob.stream, bob.connectionId)), [], 'another user does not join')

  const later = await connect(t, b, 'alice')
  t.same(later.connected.topics, ['alerts'], 'a stream opened later joins the user-wide topic')
  const second = await publishTo(a, { to: { topic: 'alerts' }, event: 'alert', data: { level: 'low' } })
  for (const tab of [onA, onB, later]) t.equal((await tab.stream.nextEvent('alert')).id, second)

  const removed = await subscriptions(b, token, 'DELETE', { topics: ['alerts'] })
  t.equal(removed.status, 200)
  t.same(removed.json.topics, [])
  await publishTo(a, { to: { topic: 'alerts' }, event: 'alert', data: { level: 'gone' } })
  for (const [gateway, tab] of [[a, onA], [b, onB], [b, later]] as const) {
    t.same(namesOf(await settle(gateway, tab.stream, tab.connectionId)), [], 'after DELETE no stream of the user receives the topic')
  }
  const fresh = await connect(t, a, 'alice')
  t.same(fresh.connected.topics, [], 'nor does a stream opened after DELETE')
})

forEachMode(t, 'a user-wide subscription made while the user has no stream applies to the next one, replay included (reconnecting to the other instance)', async (t, mode) => {
  const [a, b] = await pair(t, mode)
  const token = userToken('alice')
  const first = await connect(t, a, 'alice')
  const cursor = await publishTo(a, { to: { user: 'alice' }, event: 'hello', data: 1 })
  await first.stream.nextEvent('hello')
  first.stream.close()
  await eventually(async () => (await presence(a, 'alice')).connections === 0, 'the stream to be released')

  const answer = await subscriptions(b, token, 'POST', { topics: ['digest'] })
  t.equal(answer.status, 200)
  t.same(answer.json.topics, ['digest'])
  const missed = [
    await publishTo(a, { to: { topic: 'digest' }, event: 'digest', data: { n: 1 } }),
    await publishTo(b, { to: { user: 'alice' }, event: 'note', data: { n: 2 } }),
    await publishTo(a, { to: { topic: 'digest' }, event: 'digest', data: { n: 3 } })
  ]
  await publishTo(a, { to: { topic: 'other' }, event: 'digest', data: { n: 4 } })

  const back = await connect(t, b, 'alice', { lastEventId: cursor })
  t.same(back.connected.topics, ['digest'])
  const replayed = await back.stream.take(3)
  t.same(replayed.map((event) => event.id), missed, 'the topic and user events after the cursor, in id order')
  t.same(namesOf(await settle(b, back.stream, back.connectionId)), [], 'nothing else (no other topic, no duplicate)')
})

forEachMode(t, 'a user-wide subscription lapses HISTORY_TTL_S after the later of the subscribe and the user\'s last stream closing', async (t, mode) => {
  const [a, b] = await pair(t, mode, { HISTORY_TTL_S: '1' })
  const token = userToken('alice')
  const first = await connect(t, a, 'alice')
  t.equal((await subscriptions(b, token, 'POST', { topics: ['digest'] })).status, 200)
  // Longer than the TTL with a stream open: the subscription holds while the user is connected.
  await new Promise((resolve) => setTimeout(resolve, 1300))
  const second = await connect(t, b, 'alice')
  t.same(second.connected.topics, ['digest'], 'kept while a stream of the user is open')
  first.stream.close()
  second.stream.close()
  await eventually(async () => (await presence(a, 'alice')).connections === 0, 'the streams to be released')
  await new Promise((resolve) => setTimeout(resolve, 1300))
  const later = await connect(t, a, 'alice')
  t.same(later.connected.topics, [], 'gone HISTORY_TTL_S after the last stream closed')
  t.same((await subscriptions(b, token, 'POST', { topics: ['other'] })).json.topics, ['other'], 'a new subscription starts from an empty list')
})

forEachMode(t, 'DELETE after a user-wide subscription lapsed answers an empty list, like a read does', async (t, mode) => {
  const [a] = await pair(t, mode, { HISTORY_TTL_S: '1' })
  const token = userToken('dora')
  t.same((await subscriptions(a, token, 'POST', { topics: ['a', 'b'] })).json.topics.sort(), ['a', 'b'])
  // The lapse is a point in time; reading the subscription to see it would
  // itself clear the lapsed record in embedded mode, hiding what is tested.
  await new Promise((resolve) => setTimeout(resolve, 1300))
  const deleted = await subscriptions(a, token, 'DELETE', { topics: ['a'] })
  t.equal(deleted.status, 200)
  t.same(deleted.json.topics, [], 'nothing is left: b lapsed with a')
  t.same((await connect(t, a, 'dora')).connected.topics, [], 'and the next stream joins nothing')
})

forEachMode(t, 'the token\'s topics claim (patterns with *) restricts topics: 403 at open via ?topics= and at POST /v1/subscriptions', async (t, mode) => {
  const [a, b] = await pair(t, mode)
  const limited = userToken('alice', { topics: ['news.*', 'public'] })
  const ok = await connect(t, a, 'alice', { token: limited, topics: 'news.sport,public' })
  t.same(sorted(ok.connected.topics), ['news.sport', 'public'], 'topics matching the claim are allowed')

  for (const topics of ['public,secret', 'news', 'sports.news', 'public-x']) {
    const denied = await tryOpen(t, b, 'alice', { token: limited, topics })
    t.equal(denied.status, 403, `?topics=${topics} outside the claim: 403`)
    t.match(denied.json(), { statusCode: 403, error: 'Forbidden', message: String })
  }

  const userWide = await subscriptions(b, limited, 'POST', { topics: ['secret'] })
  t.equal(userWide.status, 403, 'a user-wide subscription outside the claim: 403')
  const mixed = await subscriptions(b, limited, 'POST', { topics: ['news.tech', 'secret'], connectionId: ok.connectionId })
  t.equal(mixed.status, 403, 'a per-stream subscription with one topic outside the claim: 403')
  await publishTo(a, { to: { topic: 'news.tech' }, event: 'headline', data: 'early' })
  t.same(namesOf(await settle(a, ok.stream, ok.connectionId)), [], 'a refused subscription adds none of its topics')

  const allowed = await subscriptions(b, limited, 'POST', { topics: ['news.tech'], connectionId: ok.connectionId })
  t.equal(allowed.status, 200)
  t.same(sorted(allowed.json.topics), ['news.sport', 'news.tech', 'public'])
  const id = await publishTo(b, { to: { topic: 'news.tech' }, event: 'headline', data: 'late' })
  t.equal((await ok.stream.nextEvent('headline')).id, id)
  t.same((await subscriptions(b, limited, 'POST', { topics: ['public'] })).json.topics, ['public'], 'a user-wide topic inside the claim: 200')
})

forEachMode(t, 'a stream never joins a user-wide topic its own token does not allow', async (t, mode) => {
  const [a, b] = await pair(t, mode)
  const limited = userToken('alice', { topics: ['public'] })
  const live = await connect(t, a, 'alice', { token: limited })
  // Another token of the same user (say, a backend-minted one) may subscribe to `secret`.
  const answer = await subscriptions(b, userToken('alice'), 'POST', { topics: ['secret'] })
  t.equal(answer.status, 200)
  const later = await connect(t, b, 'alice', { token: limited })
  t.same(later.connected.topics, [], 'a stream opened later with the limited token leaves it out')
  await publishTo(a, { to: { topic: 'secret' }, event: 'classified', data: 1 })
  t.same(namesOf(await settle(b, later.stream, later.connectionId)), [], 'the later stream does not receive it')
  t.same(namesOf(await settle(a, live.stream, live.connectionId)), [], 'the stream already open with the limited token does not receive it either')
  const seenByLimited = await subscriptions(a, limited, 'POST', { topics: ['public'] })
  t.same(seenByLimited.json.topics, ['public'], 'the limited token\'s answer leaves out the user-wide topic it does not allow')
  t.same((await subscriptions(b, userToken('alice'), 'DELETE', { topics: ['public'] })).json.topics, ['secret'], 'a token without the claim sees it')
  // Nor through another stream of the user's, opened with a broader token.
  const broad = await connect(t, b, 'alice', { topics: 'secret' })
  const throughOther = await subscriptions(a, limited, 'POST', { topics: ['public'], connectionId: broad.connectionId })
  t.equal(throughOther.status, 200)
  t.same(throughOther.json.topics, ['public'], 'naming a broader stream, the limited token is shown only the topics it allows')

  // The same for one stream: its own token is the bound, whichever token asks.
  const direct = await subscriptions(b, userToken('alice'), 'POST', { topics: ['public', 'secret'], connectionId: live.connectionId })
  t.equal(direct.status, 403, 'a per-stream subscription to a topic the stream\'s token refuses: 403, even asked with a broader token')
  t.match(direct.json, { statusCode: 403, error: 'Forbidden', code: 'GW_FORBIDDEN', message: /secret/ })
  await publishTo(b, { to: { topic: 'public' }, event: 'notice', data: 1 })
  t.same(namesOf(await settle(a, live.stream, live.connectionId)), [], 'and none of its topics is added')
  const allowed = await subscriptions(b, userToken('alice'), 'POST', { topics: ['public'], connectionId: live.connectionId })
  t.same(allowed.json.topics, ['public'], 'a topic the stream\'s token allows: 200')
})

forEachMode(t, 'bad topic names are 400 at open, at subscribe and at publish', async (t, mode) => {
  const [a] = await pair(t, mode)
  const token = userToken('alice')
  const bad = ['has space', 'star*', 'x'.repeat(129), 'semi;colon', 'caf\u00e9', 'new\nline']
  for (const name of bad) {
    const label = JSON.stringify(name.length > 20 ? `${name.slice(0, 10)}…(${name.length})` : name)
    const stream = await tryOpen(t, a, 'alice', { topics: `ok,${name}` })
    t.equal(stream.status, 400, `open with ${label}: 400`)
    t.match(stream.json(), { statusCode: 400, error: 'Bad Request', message: String })
    t.equal((await subscriptions(a, token, 'POST', { topics: [name] })).status, 400, `subscribe to ${label}: 400`)
    t.equal((await publish(a.url, PUBLISHER, { to: { topic: name }, data: 1 })).status, 400, `publish to ${label}: 400`)
  }
  for (const body of [{ topics: [] }, { topics: [''] }, { topics: 'news' }, { topics: [42] }, {}]) {
    t.equal((await subscriptions(a, token, 'POST', body)).status, 400, `subscribe with ${JSON.stringify(body)}: 400`)
  }
  const longest = 'a:b/c-d_e.'.repeat(12) + 'x'.repeat(8)
  t.equal(longest.length, 128)
  t.equal((await subscriptions(a, token, 'POST', { topics: [longest] })).status, 200, 'a 128-character name of every allowed character is fine')
})

forEachMode(t, 'GET /v1/stats counts the streams subscribed to each topic, cluster-wide, whichever way they joined', async (t, mode) => {
  const [a, b] = await pair(t, mode)
  const news1 = await connect(t, a, 'alice', { topics: 'news' })
  await connect(t, b, 'alice', { topics: 'news,sport' })
  const bob = await connect(t, b, 'bob')
  t.equal((await subscriptions(a, userToken('bob'), 'POST', { topics: ['sport'], connectionId: bob.connectionId })).status, 200)
  t.equal((await subscriptions(b, userToken('carol'), 'POST', { topics: ['alerts'] })).status, 200)
  await connect(t, a, 'carol')

  for (const gateway of [a, b]) {
    // Cluster counts are recorded as streams change; give them a moment, then compare.
    await eventually(async () => (await stats(gateway)).topics.alerts === 1, 'the counts to settle', 2000).catch(() => {})
    const answer = await stats(gateway)
    t.same(answer.topics, { news: 2, sport: 2, alerts: 1 }, 'per-topic counts (at open, per stream, user-wide)')
    t.equal(answer.connections, 4)
    t.equal(answer.users, 3)
    t.equal(answer.instances, mode === 'redis' ? 2 : 1)
  }
  news1.stream.close()
  await eventually(async () => (await stats(b)).topics.news === 1, 'the closed stream to leave the count')
  t.same((await stats(b)).topics, { news: 1, sport: 2, alerts: 1 })
})

forEachMode(t, 'MAX_TOPICS bounds a stream\'s topics and a user\'s user-wide topics: past it, 409 and nothing added', async (t, mode) => {
  const [a, b] = await pair(t, mode, { MAX_TOPICS: '3' })
  const token = userToken('alice')
  t.equal((await tryOpen(t, a, 'alice', { topics: 'a,b,c,d' })).status, 400, 'more than MAX_TOPICS at open: 400')
  const repeated = await connect(t, a, 'alice', { topics: 'a,b,c,a,b,c' })
  t.same(sorted(repeated.connected.topics), ['a', 'b', 'c'], 'a name given twice at open counts once')
  repeated.stream.close()
  const tab = await connect(t, b, 'alice', { topics: 'a,b' })

  // Subscribed through A, the stream lives on B (in Redis mode).
  const third = await subscriptions(a, token, 'POST', { topics: ['c'], connectionId: tab.connectionId })
  t.equal(third.status, 200, 'a third topic fits')
  const fourth = await subscriptions(a, token, 'POST', { topics: ['d', 'e'], connectionId: tab.connectionId })
  t.equal(fourth.status, 409, 'a fourth does not')
  t.match(fourth.json, { statusCode: 409, error: 'Conflict', message: /at most 3 topics/ })
  const again = await subscriptions(a, token, 'POST', { topics: ['c'], connectionId: tab.connectionId })
  t.same(sorted(again.json.topics), ['a', 'b', 'c'], 'nothing was added; one it holds is fine')
  await publishTo(a, { to: { topic: 'd' }, event: 'leak', data: 1 })
  t.same(namesOf(await settle(b, tab.stream, tab.connectionId)), [], 'the refused topic was not joined')

  const other = userToken('bob')
  t.equal((await subscriptions(a, other, 'POST', { topics: ['x', 'y', 'z'] })).status, 200, 'three user-wide topics')
  const over = await subscriptions(b, other, 'POST', { topics: ['w'] })
  t.equal(over.status, 409, 'a fourth user-wide topic is refused')
  t.match(over.json, { statusCode: 409, error: 'Conflict', message: /at most 3 user-wide topics/ })
  t.same(sorted((await subscriptions(a, other, 'DELETE', { topics: ['x'] })).json.topics), ['y', 'z'], 'nothing was added')
  t.same(sorted((await subscriptions(b, other, 'POST', { topics: ['w'] })).json.topics), ['w', 'y', 'z'], 'room again after a DELETE')
})

forEachMode(t, 'a user-wide DELETE takes away only what the user-wide subscription brought, not a topic a stream asked for itself', async (t, mode) => {
  const [a, b] = await pair(t, mode)
  const token = userToken('carol')
  const own = await connect(t, a, 'carol', { topics: 'scores' })
  const plain = await connect(t, b, 'carol')
  const joined = await connect(t, b, 'carol')
  t.equal((await subscriptions(b, token, 'POST', { topics: ['news'], connectionId: joined.connectionId })).status, 200, 'one stream subscribes to news itself')

  t.equal((await subscriptions(a, token, 'POST', { topics: ['scores', 'news'] })).status, 200, 'then the user subscribes to both')
  const both = await publishTo(a, { to: { topic: 'scores' }, event: 'score', data: 1 })
  for (const tab of [own, plain, joined]) t.equal((await tab.stream.nextEvent('score')).id, both, 'every stream of the user has scores')

  t.equal((await subscriptions(b, token, 'DELETE', { topics: ['scores', 'news'] })).status, 200)
  const score = await publishTo(b, { to: { topic: 'scores' }, event: 'score', data: 2 })
  const headline = await publishTo(b, { to: { topic: 'news' }, event: 'headline', data: 3 })
  t.equal((await own.stream.next((event) => event.id === score, 10_000, 'the second score')).event, 'score', 'the stream opened with ?topics=scores keeps it')
  t.equal((await joined.stream.next((event) => event.id === headline, 10_000, 'the headline')).event, 'headline', 'the stream that subscribed to news itself keeps it')
  const plainEvents = await settle(b, plain.stream, plain.connectionId)
  t.same(namesOf(plainEvents), [], 'the stream that only had them user-wide loses both')
  t.notOk(own.stream.events.some((event) => event.id === headline), 'nor did the first stream ever get news of its own')
})

/**
 * Opens a stream of alice on `gateway` with its read of the user-wide topics
 * held; `whileReading` runs with the stream's id while it is held.
 */
async function openWhileReadHeld (t: Test, gateway: Gateway, topics: string | undefined, whileReading: (connectionId: string) => Promise<void>): Promise<Connected> {
  const { state } = gateway.app
  const read = state.userTopics.bind(state)
  let readStarted = false
  let releaseRead = (): void => {}
  const held = new Promise<void>((resolve) => { releaseRead = resolve })
  state.userTopics = async (userId: string) => {
    const found = await read(userId)
    readStarted = true
    await held
    return found
  }
  t.teardown(() => { state.userTopics = read; releaseRead() })
  const opening = connect(t, gateway, 'alice', topics === undefined ? {} : { topics })
  await eventually(() => readStarted, 'the open to read the user-wide topics')
  const [opened] = gateway.app.registry.ofUser('alice')
  await whileReading(opened.id)
  releaseRead()
  return await opening
}

forEachMode(t, 'a stream\'s own unsubscribe while it is opening (reading the user-wide topics): the topic is left for good, not joined from the open\'s list', async (t, mode) => {
  const [a, b] = await pair(t, mode)
  const alice = await openWhileReadHeld(t, a, 'own,gone', async (connectionId) => {
    const removed = await subscriptions(b, userToken('alice'), 'DELETE', { topics: ['gone'], connectionId })
    t.same(removed.json, { topics: ['own'] }, 'the DELETE answers the stream\'s topics without it')
  })
  t.same(alice.connected.topics, ['own'], 'connected lists the topic left')
  await publishTo(b, { to: { topic: 'gone' }, event: 'gone', data: 1 })
  await publishTo(b, { to: { topic: 'own' }, event: 'own', data: 2 })
  t.same(namesOf(await settle(a, alice.stream, alice.connectionId)), ['own'], 'and the stream receives only its other topic\'s events')
})

forEachMode(t, 'a stream\'s own unsubscribe from a user-wide topic while it is opening (reading the user-wide topics): the read does not bring the topic back', async (t, mode) => {
  const [a, b] = await pair(t, mode)
  t.equal((await subscriptions(b, userToken('alice'), 'POST', { topics: ['news'] })).status, 200)
  const alice = await openWhileReadHeld(t, a, 'own', async (connectionId) => {
    t.equal((await subscriptions(b, userToken('alice'), 'DELETE', { topics: ['news'], connectionId })).status, 200)
  })
  t.same(alice.connected.topics, ['own'], 'connected lists no user-wide topic')
  await publishTo(b, { to: { topic: 'news' }, event: 'headline', data: 1 })
  t.same(namesOf(await settle(a, alice.stream, alice.connectionId)), [], 'and the stream receives none of its events')
})

forEachMode(t, 'a user-wide unsubscribe while a stream of the user is opening (reading the user-wide topics): the new stream does not keep the topic', async (t, mode) => {
  const [a, b] = await pair(t, mode)
  t.equal((await subscriptions(b, userToken('alice'), 'POST', { topics: ['news'] })).status, 200)
  const alice = await openWhileReadHeld(t, a, undefined, async () => {
    t.equal((await subscriptions(b, userToken('alice'), 'DELETE', { topics: ['news'] })).status, 200)
  })
  t.same(alice.connected.topics, [], 'connected lists no topic')
  await publishTo(b, { to: { topic: 'news' }, event: 'headline', data: 1 })
  t.same(namesOf(await settle(a, alice.stream, alice.connectionId)), [], 'and the stream receives none')
})

t.test('a per-stream subscription made while Redis refuses writes (out of memory): 200 and the topic joined, not 404', async (t) => {
  if (!(await needRedis(t))) return
  const redis = await startOwnRedis(t)
  const gateway = await startGateway(t, { REDIS_URL: redis.url, REDIS_PREFIX: uniquePrefix('oom') })
  const alice = await connect(t, gateway, 'alice')
  const client = redisClient(t, redis.url)
  await client.config('SET', 'maxmemory-policy', 'noeviction')
  await client.config('SET', 'maxmemory', '1')
  t.teardown(async () => { await client.config('SET', 'maxmemory', '0').catch(() => {}) })
  const answer = await subscriptions(gateway, userToken('alice'), 'POST', { topics: ['news'], connectionId: alice.connectionId })
  t.equal(answer.status, 200, `answered ${answer.status} ${answer.text}`)
  t.same(answer.json.topics, ['news'])
  await client.config('SET', 'maxmemory', '0')
  const id = await publishTo(gateway, { to: { topic: 'news' }, event: 'headline', data: 1 })
  t.equal((await alice.stream.nextEvent('headline')).id, id, 'the stream has the topic')
})
