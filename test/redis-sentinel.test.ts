/**
 * Redis mode behind Sentinel: REDIS_SENTINELS names the sentinels and
 * REDIS_URL's host the master group. The gateway finds the master through
 * them, and after a failover it publishes to, and delivers from, the new one.
 * Real processes: a master, its replica and a Sentinel, all the test's own.
 */
import t from 'tap'
import { eventually, freePort, loggedAs, openConnected, publish, publisherToken, request, startGateway, userToken } from './helpers'
import { needRedis, redisClient, startOwnRedis, startSentinelGroup, subscriberCount, uniquePrefix } from './helpers/redis'

const publisher = publisherToken()

/** Names of the gateway's connections on the Redis at `url` (CLIENT LIST). */
async function gatewayConnections (t: Parameters<typeof redisClient>[0], url: string): Promise<string[]> {
  const list = await redisClient(t, url).client('LIST') as string
  return [...list.matchAll(/ name=(sse-gateway\S*)/g)].map((match) => match[1]).sort()
}

t.test('through Sentinel: the master is found, and after a failover events are published to the new one and still arrive, in order', async (t) => {
  // The group is the test's own redis-servers; needRedis stands for "redis-server is installed and runs here".
  if (!(await needRedis(t))) return
  const group = await startSentinelGroup(t)
  const gateway = await startGateway(t, {
    REDIS_URL: `redis://${group.masterName}`,
    REDIS_SENTINELS: `127.0.0.1:${group.sentinel.port}`,
    REDIS_PREFIX: uniquePrefix('sentinel')
  })
  t.same(await gatewayConnections(t, group.master.url), ['sse-gateway', 'sse-gateway-ingress', 'sse-gateway-sub'], 'every connection is on the master')
  const { stream } = await openConnected(`${gateway.url}/v1/stream?token=${userToken('u1')}`, { t })
  const before = await publish(gateway.url, publisher, { to: { user: 'u1' }, event: 'note', data: 1 })
  t.equal(before.status, 202)
  await stream.nextEvent('note')

  t.equal(await redisClient(t, group.sentinel.url).call('SENTINEL', 'FAILOVER', group.masterName), 'OK', 'failover asked for')
  const replica = redisClient(t, group.replica.url)
  await eventually(async () => (await replica.call('ROLE') as [string])[0] === 'master', 'the replica promoted', 20_000, 100)
  // Until the gateway has moved, a publish may be refused (503): the publisher sends it again.
  let after = await publish(gateway.url, publisher, { to: { user: 'u1' }, event: 'note', data: 2 })
  await eventually(async () => {
    if (after.status === 202) return true
    t.equal(after.status, 503, 'refused, not failed, while the master changes')
    after = await publish(gateway.url, publisher, { to: { user: 'u1' }, event: 'note', data: 2 })
    return after.status === 202
  }, 'a publish accepted after the failover', 20_000, 100)
  // Sentinel turns the old master into a replica, closing its clients, some
  // 8 s after the switch. The gateway moves on hearing the switch announced,
  // so the old master is seen without its connections while still a master
  // (read in that order: a demoted master does not turn master again).
  const oldMaster = redisClient(t, group.master.url)
  let leftWhileMaster = false
  await eventually(async () => {
    const list = await oldMaster.client('LIST') as string
    if (/ name=sse-gateway(?:-sub|-ingress)? /.test(list)) return false
    leftWhileMaster = (await oldMaster.call('ROLE') as [string])[0] === 'master'
    return true
  }, 'the gateway\'s connections to leave the old master', 45_000, 50)
  t.ok(leftWhileMaster, 'they left it before Sentinel demoted it')
  await eventually(async () => (await gatewayConnections(t, group.replica.url)).length === 3, 'the gateway\'s three connections on the new master', 45_000, 100)

  const note = await stream.nextEvent('note', 20_000)
  t.same([note.id, note.data], [after.json.id, '2'], 'the event published to the new master arrives on the stream opened before the failover')
  t.same(stream.events.filter((event) => event.event === 'note').map((event) => event.data), ['1', '2'], 'each once, in order')
  t.equal((await request(`${gateway.url}/ready`)).status, 200, 'ready')

  // The durable ingress reads the new master too: its consumer group came over with the data.
  await redisClient(t, group.replica.url).xadd(`${gateway.app.config.redisPrefix}ingress`, '*', 'payload', JSON.stringify({ to: { user: 'u1' }, event: 'note', data: 3 }))
  t.equal((await stream.nextEvent('note', 20_000)).data, '3', 'an XADD to the new master\'s ingress arrives')
})

t.test('through Sentinel with passwords: the sentinels\' own (REDIS_SENTINEL_PASSWORD) and the master\'s (in REDIS_URL)', async (t) => {
  if (!(await needRedis(t))) return
  const group = await startSentinelGroup(t, { masterPassword: 'master-secret', sentinelPassword: 'sentinel-secret' })
  const gateway = await startGateway(t, {
    REDIS_URL: `redis://:master-secret@${group.masterName}`,
    REDIS_SENTINELS: `127.0.0.1:${group.sentinel.port}`,
    REDIS_SENTINEL_PASSWORD: 'sentinel-secret',
    REDIS_PREFIX: uniquePrefix('sentinel-auth')
  })
  t.same(await gatewayConnections(t, group.master.url), ['sse-gateway', 'sse-gateway-ingress', 'sse-gateway-sub'], 'every connection is on the master')
  const { stream } = await openConnected(`${gateway.url}/v1/stream?token=${userToken('u1')}`, { t })
  t.equal((await publish(gateway.url, publisher, { to: { user: 'u1' }, event: 'note', data: 1 })).status, 202)
  t.equal((await stream.nextEvent('note')).data, '1', 'delivered')
  await eventually(async () => / name=sse-gateway-sentinel .*\bsub=1\b/.test(await redisClient(t, group.sentinel.url).client('LIST') as string),
    'the gateway to listen to the sentinel for failovers, with its password')
})

t.test('a switch announced for another master group the sentinels watch moves nothing; one of this group moves every connection, which asks the sentinels for the master again, and again while they name another, a few times', async (t) => {
  if (!(await needRedis(t))) return
  const group = await startSentinelGroup(t)
  // A plain redis-server listed as a second sentinel: nothing asks it for the
  // master while the first answers, and the test announces switches on it.
  const announcer = await startOwnRedis(t)
  // And a third that never answers: its failure is said once.
  const silent = await freePort()
  const gateway = await startGateway(t, {
    REDIS_URL: `redis://${group.masterName}`,
    REDIS_SENTINELS: `127.0.0.1:${group.sentinel.port},127.0.0.1:${announcer.port},127.0.0.1:${silent}`,
    REDIS_PREFIX: uniquePrefix('sentinel-switch')
  }, { captureLogs: true })
  const master = redisClient(t, group.master.url)
  const announce = redisClient(t, announcer.url)
  const connectionIds = async (): Promise<string[]> =>
    [...(await master.client('LIST') as string).matchAll(/^id=(\d+) .* name=sse-gateway(?:-sub|-ingress)? /gm)].map((match) => match[1]).sort()
  await eventually(async () => await subscriberCount(announce, '+switch-master') === 1, 'the gateway to listen to every sentinel')
  const before = await connectionIds()
  t.equal(before.length, 3)

  t.equal(await announce.publish('+switch-master', `another-group 127.0.0.1 ${group.master.port} 127.0.0.1 ${group.replica.port}`), 1)
  t.equal(await announce.publish('+switch-master', `${group.masterName} 127.0.0.1 ${group.replica.port} 127.0.0.1 ${group.master.port}`), 1)
  t.equal(await announce.publish('+switch-master', `${group.masterName} 127.0.0.1 ${group.replica.port} localhost ${group.master.port}`), 1, 'a host name for it too')
  // Announced after those, so heard after them: the gateway has acted on them once it logs this one's move.
  // Twice, as every sentinel announces it: the connections move once.
  const toReplica = `${group.masterName} 127.0.0.1 ${group.master.port} 127.0.0.1 ${group.replica.port}`
  await Promise.all([announce.publish('+switch-master', toReplica), announce.publish('+switch-master', toReplica)])
  await eventually(() => gateway.logText().includes('a sentinel announced a new master: moving to it'), 'the move to be logged')
  const moves = loggedAs<{ master: string, connections: number }>(gateway.logText(), 'a sentinel announced a new master: moving to it')
  t.same(moves.map((move) => [move.master, move.connections]), [[`127.0.0.1:${group.replica.port}`, 3]],
    'another group\'s switch, and one to where the connections are, moved nothing; the same switch heard twice moved them once')
  // The real sentinel still names the first master: every connection comes
  // back to it, is taken for one that asked a sentinel not yet told of the
  // switch and moved again, 5 moves in all, and then stays.
  const movedAgain = (): number => gateway.logText().split('\n').filter((line) => line.includes('came back to another master than the one announced')).length
  await eventually(() => movedAgain() >= 12, 'each connection to be moved again 4 times', 20_000)
  await eventually(async () => {
    const after = await connectionIds()
    return after.length === 3 && after.every((id) => !before.includes(id))
  }, 'the three connections to stay on the master the sentinels name')
  t.equal(movedAgain(), 12, 'and no more')
  await eventually(async () => (await request(`${gateway.url}/ready`)).status === 200, 'ready again')
  const unheard = loggedAs<{ sentinel: string, reason: string }>(gateway.logText(), 'not listening to a sentinel for failovers')
  t.same(unheard.map((line) => line.sentinel), [`127.0.0.1:${silent}`], 'the sentinel that never answered is named, once, though tried again and again')
  t.match(unheard[0]?.reason, /ECONNREFUSED/)
})
