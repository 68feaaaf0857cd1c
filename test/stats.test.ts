import t from 'tap'
import type { Test } from 'tap'
import {
  adminToken, eventually, forEachMode, openConnected, publisherToken, request, startCluster, userToken
} from './helpers'
import { redisClient } from './helpers/redis'

const admin = adminToken()

interface Stats {
  connections: number
  users: number
  averageConnectionsPerUser: number
  topics: Record<string, number>
  instances: number
}

interface ConnectionEntry {
  connectionId: string
  userId: string
  topics: string[]
  openedAt: string
  instance: string
}

const ISO_8601 = /^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$/

async function stats (url: string): Promise<Stats> {
  const response = await request<Stats>(`${url}/v1/stats`, { token: admin })
  if (response.status !== 200) throw new Error(`GET /v1/stats answered ${response.status}: ${response.text}`)
  return response.json
}

async function connections (url: string): Promise<ConnectionEntry[]> {
  const response = await request<{ connections: ConnectionEntry[] }>(`${url}/v1/connections`, { token: admin })
  if (response.status !== 200) throw new Error(`GET /v1/connections answered ${response.status}: ${response.text}`)
  return response.json.connections
}

/** Exactly the contract fields; the average may be rounded (to 0.01). */
function assertStats (t: Test, actual: Stats, expected: Stats, what: string): void {
  t.same(Object.keys(actual).sort(), ['averageConnectionsPerUser', 'connections', 'instances', 'topics', 'users'], `${what}: exactly the contract fields`)
  const { averageConnectionsPerUser: average, ...rest } = actual
  const { averageConnectionsPerUser: expectedAverage, ...expectedRest } = expected
  t.same(rest, expectedRest, what)
  t.ok(Math.abs(average - expectedAverage) <= 0.01, `${what}: averageConnectionsPerUser ${average} ≈ ${expectedAverage}`)
}

function streamUrl (url: string, userId: string, topics?: string): string {
  return `${url}/v1/stream?token=${userToken(userId)}${topics !== undefined ? `&topics=${topics}` : ''}`
}

forEachMode(t, 'GET /v1/stats and GET /v1/connections are admin routes: user 403, publisher 403, none 401', async (t, mode) => {
  const [gateway] = await startCluster(t, mode, 1)
  for (const path of ['/v1/stats', '/v1/connections']) {
    const user = await request(`${gateway.url}${path}`, { token: userToken('u1') })
    t.equal(user.status, 403, `${path} with a user token`)
    t.match(user.json, { statusCode: 403, error: 'Forbidden', message: String })
    t.equal((await request(`${gateway.url}${path}`, { token: publisherToken() })).status, 403, `${path} with a publisher token`)
    const none = await request(`${gateway.url}${path}`)
    t.equal(none.status, 401, `${path} without a token`)
    t.match(none.json, { statusCode: 401, error: 'Unauthorized', message: String })
    t.equal((await request(`${gateway.url}${path}`, { token: admin })).status, 200, `${path} with an admin token`)
  }
})

forEachMode(t, 'GET /v1/stats: exactly the contract fields, counted from the open streams', async (t, mode) => {
  const [gateway] = await startCluster(t, mode, 1)
  const { url } = gateway
  assertStats(t, await stats(url), { connections: 0, users: 0, averageConnectionsPerUser: 0, topics: {}, instances: 1 }, 'empty')

  await openConnected(streamUrl(url, 'u1', 'news'), { t })
  await openConnected(streamUrl(url, 'u1', 'news,sports'), { t })
  await openConnected(streamUrl(url, 'u2', 'news'), { t })
  await openConnected(streamUrl(url, 'u3'), { t })
  assertStats(t, await stats(url), {
    connections: 4,
    users: 3,
    averageConnectionsPerUser: 4 / 3,
    topics: { news: 3, sports: 1 },
    instances: 1
  }, 'four streams of three users')
})

forEachMode(t, 'GET /v1/stats follows closes and subscriptions', async (t, mode) => {
  const [gateway] = await startCluster(t, mode, 1)
  const { url } = gateway
  const { stream: a } = await openConnected(streamUrl(url, 'u1', 'news'), { t })
  const { connected: b } = await openConnected(streamUrl(url, 'u2', 'news'), { t })
  t.match(await stats(url), { connections: 2, users: 2, averageConnectionsPerUser: 1, topics: { news: 2 } })

  const subscribed = await request(`${url}/v1/subscriptions`, { method: 'POST', token: userToken('u2'), body: { topics: ['sports'], connectionId: b.connectionId } })
  t.equal(subscribed.status, 200)
  await eventually(async () => (await stats(url)).topics.sports === 1, 'stats to count the new subscription')

  a.close()
  await eventually(async () => (await stats(url)).connections === 1, 'stats to drop the closed stream')
  assertStats(t, await stats(url), { connections: 1, users: 1, averageConnectionsPerUser: 1, topics: { news: 1, sports: 1 }, instances: 1 }, 'after a close')
})

forEachMode(t, 'GET /v1/connections lists every stream: connectionId, userId, topics, openedAt (ISO 8601), instance', async (t, mode) => {
  const [gateway] = await startCluster(t, mode, 1)
  const { url, app } = gateway
  t.same(await connections(url), [], 'empty')
  const before = Date.now()
  const { connected: a } = await openConnected(streamUrl(url, 'u1', 'news,sports'), { t })
  const { stream: second, connected: b } = await openConnected(streamUrl(url, 'u2'), { t })
  const after = Date.now()

  const list = await connections(url)
  t.equal(list.length, 2)
  const byId = new Map(list.map((entry) => [entry.connectionId, entry]))
  const first = byId.get(a.connectionId)
  t.ok(first, 'the first stream is listed by its connectionId')
  t.same(Object.keys(first ?? {}).sort(), ['connectionId', 'instance', 'openedAt', 'topics', 'userId'], 'exactly the contract fields')
  t.equal(first?.userId, 'u1')
  t.same([...(first?.topics ?? [])].sort(), ['news', 'sports'])
  t.match(first?.openedAt, ISO_8601, 'openedAt is ISO 8601')
  const openedAt = Date.parse(first?.openedAt ?? '')
  t.ok(openedAt >= before - 1000 && openedAt <= after + 1000, 'openedAt is when it opened')
  t.equal(first?.instance, app.registry.instanceId, 'instance names this gateway')
  t.type(first?.instance, 'string')
  t.same(byId.get(b.connectionId)?.topics, [], 'a stream without topics lists []')

  second.close()
  await eventually(async () => (await connections(url)).length === 1, 'the closed stream to leave the list')
  t.equal((await connections(url))[0].connectionId, a.connectionId)
})

async function nextMillisecond (): Promise<void> {
  const now = Date.now()
  while (Date.now() === now) await new Promise((resolve) => setImmediate(resolve))
}

forEachMode(t, 'GET /v1/connections narrows to a user, a topic or a search, and the newest N, with the match count in X-Total-Count', async (t, mode) => {
  const [gateway] = await startCluster(t, mode, 1)
  const { url } = gateway
  const opened: string[] = []
  for (const [user, topics] of [['u.1', 'news'], ['u.2', 'news,Sports'], ['u.1', undefined], ['u.3', 'weather']] as const) {
    await nextMillisecond()
    opened.push((await openConnected(streamUrl(url, user, topics), { t })).connected.connectionId)
  }
  async function list (query: string): Promise<{ ids: string[], total: string | null }> {
    const response = await request<{ connections: ConnectionEntry[] }>(`${url}/v1/connections?${query}`, { token: admin })
    t.equal(response.status, 200, `${query} answered ${response.status}: ${response.text}`)
    t.same(Object.keys(response.json), ['connections'], `${query}: the body keeps the contract's shape`)
    return { ids: response.json.connections.map((entry) => entry.connectionId), total: response.headers.get('x-total-count') }
  }
  const sorted = (ids: string[]): string[] => [...ids].sort()

  const all = await list('')
  t.same(sorted(all.ids), sorted(opened), 'no query: every stream')
  t.equal(all.total, '4')
  const u1 = await list('userId=u.1')
  t.same(sorted(u1.ids), sorted([opened[0], opened[2]]), 'userId: that user\'s streams only')
  t.equal(u1.total, '2')
  t.same(sorted((await list('topic=news')).ids), sorted([opened[0], opened[1]]), 'topic: the streams holding it')
  t.same((await list('topic=sports')).ids, [], 'topic is exact')
  t.same((await list('q=SPORT')).ids, [opened[1]], 'q: a case-insensitive part of a topic')
  t.same(sorted((await list('q=U.1')).ids), sorted([opened[0], opened[2]]), 'q: a case-insensitive part of a user id (one no stream id can hold: ids have no dot)')
  t.same((await list(`q=${opened[3].slice(2, 10)}`)).ids, [opened[3]], 'q: a part of a connection id')
  t.same((await list('userId=u.1&topic=news')).ids, [opened[0]], 'filters combine')
  const newest = await list('limit=2')
  t.same(newest.ids, [opened[3], opened[2]], 'limit: the newest first')
  t.equal(newest.total, '4', 'X-Total-Count counts every match, not only those listed')
  t.same(await list('limit=1&topic=news'), { ids: [opened[1]], total: '2' }, 'limit applies after the filters')
  t.same((await list('cachebust=1')).ids.length, 4, 'an unknown parameter is ignored')

  for (const query of ['limit=0', 'limit=-1', 'limit=abc', 'limit=1000000', 'topic=a%20b', 'q=', `q=${'x'.repeat(257)}`, 'userId=']) {
    const response = await request(`${url}/v1/connections?${query}`, { token: admin })
    t.equal(response.status, 400, `${query}: 400`)
    t.match(response.json, { statusCode: 400, error: 'Bad Request', message: String }, `${query}: the error shape`)
  }
})

forEachMode(t, 'two instances: stats and connections are cluster-wide, on either instance', async (t) => {
  const [a, b] = await startCluster(t, 'redis', 2)
  const { connected: onA1 } = await openConnected(streamUrl(a.url, 'u1', 'news'), { t })
  const { connected: onA2 } = await openConnected(streamUrl(a.url, 'u2', 'news,sports'), { t })
  const { stream: onBStream, connected: onB } = await openConnected(streamUrl(b.url, 'u1', 'sports'), { t })

  const expected: Stats = { connections: 3, users: 2, averageConnectionsPerUser: 1.5, topics: { news: 2, sports: 2 }, instances: 2 }
  assertStats(t, await stats(a.url), expected, 'stats on A')
  assertStats(t, await stats(b.url), expected, 'stats on B')

  for (const gateway of [a, b]) {
    const list = await connections(gateway.url)
    const instances = Object.fromEntries(list.map((entry) => [entry.connectionId, entry.instance]))
    t.same(instances, {
      [onA1.connectionId]: a.app.registry.instanceId,
      [onA2.connectionId]: a.app.registry.instanceId,
      [onB.connectionId]: b.app.registry.instanceId
    }, `every stream of the cluster, with its instance (asked at ${gateway.app.registry.instanceId})`)
    t.ok(list.every((entry) => ISO_8601.test(entry.openedAt)), 'openedAt ISO 8601')
  }
  t.not(a.app.registry.instanceId, b.app.registry.instanceId, 'instances are told apart')

  onBStream.close()
  await eventually(async () => (await stats(a.url)).connections === 2, 'A to see the stream on B close')
  assertStats(t, await stats(a.url), { connections: 2, users: 2, averageConnectionsPerUser: 1, topics: { news: 2, sports: 1 }, instances: 2 }, 'after a close on B')
}, ['redis'])

forEachMode(t, 'job streams are streams: they count in stats and are listed', async (t, mode) => {
  const [gateway] = await startCluster(t, mode, 1)
  const { url } = gateway
  const put = await request(`${url}/v1/jobs/job-1`, { method: 'PUT', token: publisherToken(), body: { userId: 'u1', status: 'active' } })
  t.equal(put.status, 200)
  const { connected: jobStream } = await openConnected(`${url}/v1/jobs/job-1/stream?token=${userToken('u1')}`, { t })
  const { connected: jobsStream } = await openConnected(`${url}/v1/jobs/stream?token=${userToken('u2')}`, { t })
  assertStats(t, await stats(url), { connections: 2, users: 2, averageConnectionsPerUser: 1, topics: {}, instances: 1 }, 'a job stream and a jobs stream')
  const ids = (await connections(url)).map((entry) => entry.connectionId).sort()
  t.same(ids, [jobStream.connectionId, jobsStream.connectionId].sort())
})

forEachMode(t, 'an unreadable stream record in Redis (written by something else) leaves GET /v1/connections and /v1/stats answering, without it', async (t) => {
  const [gateway] = await startCluster(t, 'redis', 1)
  const { connected } = await openConnected(`${gateway.url}/v1/stream?token=${userToken('alice')}`, { t })
  const records = `${gateway.app.config.redisPrefix}i:${gateway.app.registry.instanceId}:conns`
  const redis = redisClient(t)
  await redis.hset(records, 'c_garbage', '{not json', 'c_partial', JSON.stringify({ userId: 'mallory' }))
  const listing = await request<{ connections: ConnectionEntry[] }>(`${gateway.url}/v1/connections`, { token: admin })
  t.equal(listing.status, 200, `listing answered ${listing.status}`)
  t.same(listing.json.connections.map((entry) => entry.connectionId), [connected.connectionId], 'only the readable record')
  const stats = await request<Stats>(`${gateway.url}/v1/stats`, { token: admin })
  t.equal(stats.status, 200, `stats answered ${stats.status}`)
  t.match(stats.json, { connections: 1, users: 1 })
}, ['redis'])

forEachMode(t, 'an instance with more streams than Redis hands over in one read: stats and the listing count and list every one', async (t) => {
  const [gateway, other] = await startCluster(t, 'redis', 2)
  // Read a thousand records at a time; 2100 on one instance take several reads.
  const opened = new Set<string>()
  for (let next = 0; next < 2100;) {
    const batch = Array.from({ length: Math.min(50, 2100 - next) }, (_, i) => `many-${next + i}`)
    next += batch.length
    await Promise.all(batch.map(async (user) => {
      const { connected } = await openConnected(streamUrl(gateway.url, user, 'crowd'), { t })
      opened.add(connected.connectionId)
    }))
  }
  const { connected: elsewhere } = await openConnected(streamUrl(other.url, 'many-0'), { t })
  opened.add(elsewhere.connectionId)

  assertStats(t, await stats(other.url), { connections: 2101, users: 2100, averageConnectionsPerUser: 2101 / 2100, topics: { crowd: 2100 }, instances: 2 }, 'stats')
  const listed = (await connections(other.url)).map((entry) => entry.connectionId)
  t.equal(listed.length, 2101, 'listed once each')
  t.same(new Set(listed), opened, 'every stream of both instances')
}, ['redis'])

forEachMode(t, 'a live instance whose list of streams is a key of another type (written by something else) is skipped: stats and the listing answer with the others', async (t) => {
  const [gateway] = await startCluster(t, 'redis', 1)
  const { connected } = await openConnected(streamUrl(gateway.url, 'alice'), { t })
  const prefix = gateway.app.config.redisPrefix
  const redis = redisClient(t)
  const [seconds] = await redis.time()
  await redis.zadd(`${prefix}instances`, Number(seconds) * 1000 + 60_000, 'ghost')
  await redis.set(`${prefix}i:ghost:conns`, 'not a hash')
  t.teardown(async () => { await redis.multi().del(`${prefix}i:ghost:conns`).zrem(`${prefix}instances`, 'ghost').exec() })
  const listing = await request<{ connections: ConnectionEntry[] }>(`${gateway.url}/v1/connections`, { token: admin })
  t.equal(listing.status, 200, `listing answered ${listing.status}`)
  t.same(listing.json.connections.map((entry) => entry.connectionId), [connected.connectionId], 'the readable instance\'s streams')
  const answer = await request<Stats>(`${gateway.url}/v1/stats`, { token: admin })
  t.equal(answer.status, 200, `stats answered ${answer.status}`)
  t.match(answer.json, { connections: 1, users: 1 })
}, ['redis'])
