import { once } from 'node:events'
import { randomBytes } from 'node:crypto'
import t, { type Test } from 'tap'
import Redis, { type RedisOptions } from 'ioredis'
import { Registry } from '../src/core/registry'
import { redisOptions, ScriptedRedis } from '../src/core/redis/client'
import { IngressLeader, MAX_QUEUED_INGRESS } from '../src/core/redis/engine'
import { RedisState } from '../src/core/redis/redis-state'
import { eventually, openConnected, spawnServer, startGateway, TEST_SECRET, userToken, type Gateway, type SseClient } from './helpers'
import { needRedis, redisClient, REDIS_URL, startOwnRedis, subscriberCount, uniquePrefix } from './helpers/redis'
import { Waiters, within } from './helpers/wait'
import { FaultyProxy } from './helpers/proxy'

const WAIT_MS = 5000



interface Rig {
  leader: IngressLeader
  state: RedisState
  subscriber: Redis
  prefix: string
  warnings: string[]
  received: Array<{ source: string, payload: string }>
  /** Resolves once `done()` holds, checked as each ingress message reaches the handler. */
  receivedUntil: (done: () => boolean, what: string) => Promise<void>
}

/**
 * An IngressLeader on real Redis connections the test controls. Its lease is
 * long, so its own timer ticks only every 10 s: the test drives each tick.
 */
async function rig (t: Test, subscriberOptions: RedisOptions = {}, shared: { prefix?: string, leaseMs?: number, presenceGraceMs?: number, probeEveryMs?: number, redisUrl?: string, subscriberUrl?: string } = {}): Promise<Rig> {
  const prefix = shared.prefix ?? uniquePrefix('lease')
  const commands = new ScriptedRedis(shared.redisUrl ?? REDIS_URL)
  // Gateway options, but a longer pause before each reconnect: room to tick while the subscriber is down.
  const subscriber = new Redis(shared.subscriberUrl ?? shared.redisUrl ?? REDIS_URL, { ...redisOptions(), connectionName: 'ingress-lease-test', retryStrategy: () => 300, ...subscriberOptions })
  for (const client of [commands.redis, subscriber]) client.on('error', () => {})
  const warnings: string[] = []
  const log = {
    info: () => {},
    warn: (obj: object, msg: string) => { warnings.push(`${msg} ${JSON.stringify(obj)}`) },
    error: (obj: object, msg: string) => { warnings.push(`${msg} ${JSON.stringify(obj)}`) }
  }
  const state = new RedisState(commands, subscriber, new Registry(`lease-${randomBytes(4).toString('hex')}`), {
    prefix, historySize: 100, historyTtlS: 60, presenceGraceMs: shared.presenceGraceMs ?? 100, instanceTtlMs: 60_000
  }, log)
  // No probes either, unless asked: a takeover happens only when the test ticks.
  const leader = new IngressLeader(commands, subscriber, state, prefix, shared.leaseMs ?? 30_000, log, shared.probeEveryMs ?? null)
  t.teardown(async () => {
    await leader.stop()
    await state.close()
    commands.redis.disconnect()
    subscriber.disconnect()
  })
  await Promise.all([commands.redis.connect(), subscriber.connect()])
  const received: Rig['received'] = []
  const waiters = new Waiters()
  leader.onMessage(async (source, payload) => {
    received.push({ source: source.kind === 'stream' ? `stream:${source.connectionId}` : 'publish', payload: payload ?? '(not UTF-8)' })
    waiters.wake()
    return { published: Promise.resolve() }
  })
  const receivedUntil = async (done: () => boolean, what: string): Promise<void> => {
    await waiters.until(done, { timeoutMs: WAIT_MS, what, describe: () => `${received.length} received` })
  }
  return { leader, state, subscriber, prefix, warnings, received, receivedUntil }
}

/** Kills the subscriber's connection from the server side and waits for ioredis to see it. */
async function killSubscriber (t: Test, redis: Redis, subscriber: Redis, until: 'reconnecting' | 'ready'): Promise<void> {
  const seen = once(subscriber, until)
  t.equal(await redis.client('KILL', 'ADDR', `127.0.0.1:${subscriber.stream.localPort ?? 0}`), 1, 'the subscriber connection is killed')
  await within(seen, WAIT_MS, `the subscriber to be ${until}`)
}

/**
 * Another instance holding the lease, alive: listening on its `alive:` channel
 * as a gateway's subscriber does, so no instance takes the lease from it.
 */
async function otherHolder (t: Test, url: string, prefix: string): Promise<void> {
  const listener = redisClient(t, url)
  await listener.subscribe(`${prefix}alive:another-instance`)
  await redisClient(t, url).set(`${prefix}leader`, 'another-instance', 'PX', 60_000)
}

/**
 * One tick, as the leader's own timer runs it: a rejection is a failure, yet
 * the test goes on to check the state the tick left behind.
 */
async function tick (t: Test, leader: IngressLeader): Promise<void> {
  await leader.tick().catch((error: unknown) => t.fail(`the tick rejected: ${error instanceof Error ? error.message : String(error)}`))
}

/**
 * The ingress channels reach the leader's handler: each message once, and
 * no other instance's (`others`: standbys listen too, but only keep them).
 */
async function ingressFlows (t: Test, redis: Redis, setup: Rig, others: Rig[] = []): Promise<void> {
  const before = setup.received.length
  const othersBefore = others.map((other) => other.received.length)
  t.equal(await subscriberCount(redis, `${setup.prefix}publish`), 1 + others.filter((other) => other.leader.isStandby).length, `PUBSUB NUMSUB ${setup.prefix}publish: the holder and the standbys`)
  t.equal(await redis.publish(`${setup.prefix}publish`, '{"to":{"user":"u1"},"data":1}'), 1 + others.filter((other) => other.leader.isStandby).length, 'a PUBLISH reaches the holder and the standbys')
  const connectionId = `lease-${randomBytes(4).toString('hex')}`
  await redis.publish(`stream:${connectionId}`, '{"event":"x","data":2}')
  // Other tests' gateways and publishers share stream:* on the shared Redis: their messages are not this test's.
  const own = (): Rig['received'] => setup.received.slice(before).filter(({ source }) => source === 'publish' || source === `stream:${connectionId}`)
  await setup.receivedUntil(() => own().length >= 2, 'both ingress messages')
  t.same(own(), [
    { source: 'publish', payload: '{"to":{"user":"u1"},"data":1}' },
    { source: `stream:${connectionId}`, payload: '{"event":"x","data":2}' }
  ], 'both ingress channels are handled')
  t.same(others.map((other) => other.received.length), othersBefore, 'by no other instance')
}

t.test('a lease taken while the subscriber cannot subscribe is not held; the next tick subscribes and ingress flows', async (t) => {
  if (!(await needRedis(t))) return
  const redis = redisClient(t)
  const setup = await rig(t)
  await killSubscriber(t, redis, setup.subscriber, 'reconnecting')
  const ready = once(setup.subscriber, 'ready')
  await tick(t, setup.leader)
  t.not(setup.subscriber.status, 'ready', 'the lease was taken while the subscriber was still reconnecting')
  t.notOk(setup.leader.isLeader, 'not the holder while not subscribed')
  t.ok(setup.warnings.some((line) => line.includes('ingress') && line.includes('enableOfflineQueue')), 'the failed subscribe is logged with its reason')
  await within(ready, WAIT_MS, 'the subscriber to reconnect')
  await tick(t, setup.leader)
  t.ok(setup.leader.isLeader, 'the next tick takes the lease and subscribes')
  await ingressFlows(t, redis, setup)
})

t.test('a holder that stops hands the lease over: another instance takes it without waiting for its own check', async (t) => {
  if (!(await needRedis(t))) return
  const redis = redisClient(t)
  // Their timers check every 200 s: only the stopping holder's notice can
  // make the other take the lease within WAIT_MS.
  const a = await rig(t, {}, { leaseMs: 600_000 })
  const b = await rig(t, {}, { leaseMs: 600_000, prefix: a.prefix })
  await a.leader.start()
  await b.leader.start()
  t.ok(a.leader.isLeader && !b.leader.isLeader, 'A holds the lease, B listens for its release')
  await a.leader.stop()
  t.notOk(a.leader.isLeader, 'A gave the lease up')
  const handledBefore = a.received.length
  await eventually(() => b.leader.isLeader, 'B to take the lease', WAIT_MS)
  await ingressFlows(t, redis, b, [a])
  t.same(a.received.slice(handledBefore), [], 'A handled nothing after it stopped')
})

/**
 * A Redis of the test's own (ACL users are server-wide) with user `gw`,
 * allowed every channel under `prefix` but those starting with i
 * (ingress-mark); `url` logs in as it, `adminUrl` as the default user.
 */
async function redisRefusingIngressMark (t: Test, prefix: string): Promise<{ admin: Redis, adminUrl: string, url: string }> {
  const own = await startOwnRedis(t)
  const admin = redisClient(t, own.url)
  await admin.acl('SETUSER', 'gw', 'on', '>secret', '~*', '+@all', 'resetchannels', `&${prefix}[^i]*`, '&stream:*')
  return { admin, adminUrl: own.url, url: `redis://gw:secret@127.0.0.1:${own.port}` }
}

t.test('the place a taker publishes from: the dead holder\'s record, kept as the taker\'s until it publishes; without one, its own marker; a pass leaves none, and the successor\'s first renewal starts one; an ACL without ingress-mark fails none of it', async (t) => {
  if (!(await needRedis(t))) return
  const prefix = uniquePrefix('lease-place')
  const { admin, adminUrl, url } = await redisRefusingIngressMark(t, prefix)
  const commands = new ScriptedRedis(url)
  commands.redis.on('error', () => {})
  t.teardown(() => commands.redis.disconnect())
  await commands.redis.connect()
  const listener = redisClient(t, adminUrl)
  await listener.subscribe(`${prefix}alive:T`, `${prefix}alive:U`, `${prefix}alive:W`, `${prefix}alive:S`)
  const lease = async (instance: string): Promise<unknown> => await commands.run('LEASE', [prefix, instance, 60_000, 1000])
  const record = async (): Promise<string | null> => await admin.get(`${prefix}ingress-at`)
  const deadHolder = async (name: string): Promise<void> => {
    await admin.set(`${prefix}leader`, name, 'PX', 60_000)
    await admin.set(`${prefix}leader-at`, '0', 'PX', 60_000)
  }

  await deadHolder('H')
  await admin.set(`${prefix}ingress-at`, 'H\n100:5', 'PX', 60_000)
  t.same(await lease('T'), [1, '100:5'], 'T takes the lease from H, with H\'s place')
  t.equal(await record(), 'T\n100:5', 'kept as T\'s until T publishes: should T die first, the next taker starts there too')
  await listener.unsubscribe(`${prefix}alive:T`)
  await admin.set(`${prefix}leader-at`, '0', 'PX', 60_000)
  t.same(await lease('U'), [1, '100:5'], 'U, taking over from T, gets H\'s place')

  await deadHolder('V')
  const taken = await lease('W') as [number, string]
  t.match(taken, [1, /^\d+:0$/], 'no record of V (the record names U): W starts from the marker it takes the lease with')
  t.equal(await record(), `W\n${taken[1]}`)
  t.ok(Number(taken[1].split(':')[0]) > 100, 'a marker above the earlier ones')

  await admin.set(`${prefix}successor`, 'S', 'PX', 60_000)
  t.equal(await commands.run('PASS_LEASE', [prefix, 'W', 'S', 60_000]), 1, 'W passes the lease to S')
  t.equal(await record(), null, 'and its record goes (an older successor would not keep it)')
  t.equal(await lease('S'), 1, 'S renews')
  t.match(await record(), /^S\n\d+:0$/, 'and starts its own from that renewal\'s marker')
  t.equal(await admin.get(`${prefix}leader`), 'S', 'the lease held all along, though Redis refused every marker\'s PUBLISH')
})

t.test('gateway: under a Redis ACL that does not allow ingress-mark, two instances start, one holds the lease, ingress flows once, and each standby warns once', async (t) => {
  if (!(await needRedis(t))) return
  const prefix = uniquePrefix('lease-acl')
  const { admin, url } = await redisRefusingIngressMark(t, prefix)
  const env = { REDIS_URL: url, REDIS_PREFIX: prefix, INSTANCE_TTL_MS: '60000' }
  const a = await startGateway(t, env, { captureLogs: true })
  const b = await startGateway(t, env, { captureLogs: true })
  const holders = [a, b].filter((gateway) => gateway.app.ingress?.isLeader === true)
  t.equal(holders.length, 1, 'one instance holds the lease')
  const { stream, connected } = await openConnected(`${b.url}/v1/stream?token=${userToken('u1')}`, { t })
  await admin.publish(`stream:${connected.connectionId}`, JSON.stringify({ event: 'chunk', data: 'one' }))
  await admin.publish(`${prefix}publish`, JSON.stringify({ to: { user: 'u1' }, event: 'chunk', data: 'two' }))
  await stream.next((event) => event.data === 'two', WAIT_MS, 'both messages')
  t.same(stream.events.filter((event) => event.event === 'chunk').map((event) => event.data), ['one', 'two'], 'each once, in order')
  for (const gateway of [a, b]) {
    t.equal(gateway.logs.filter((line) => line.includes('could not listen to the ingress channels as a standby')).length, 1, 'the standby subscription warned once')
  }
})

t.test('while a stopping holder\'s successor waits, only it may take the lease; a pass goes only to the claimed successor, and only while it is heard', async (t) => {
  if (!(await needRedis(t))) return
  const prefix = uniquePrefix('lease-succession')
  const commands = new ScriptedRedis(REDIS_URL)
  commands.redis.on('error', () => {})
  t.teardown(() => commands.redis.disconnect())
  await commands.redis.connect()
  const redis = redisClient(t)
  // S and C are heard on their alive: channels; H (the holder) and S2 are not: they died.
  const listener = redisClient(t)
  await listener.subscribe(`${prefix}alive:S`, `${prefix}alive:C`)
  // 1 renewed, { 1, place } taken, 0 not held.
  const lease = async (instance: string): Promise<unknown> => {
    const answer = await commands.run('LEASE', [prefix, instance, 60_000, 1000])
    return Array.isArray(answer) ? answer[0] : answer
  }
  const pass = async (holder: string, successor: string): Promise<unknown> => await commands.run('PASS_LEASE', [prefix, holder, successor, 60_000])

  // H died after S claimed the succession, its last renewal long ago.
  await redis.set(`${prefix}leader`, 'H', 'PX', 60_000)
  await redis.set(`${prefix}leader-at`, '0', 'PX', 60_000)
  await redis.set(`${prefix}successor`, 'S', 'PX', 60_000)
  t.equal(await lease('C'), 0, 'C may not take it: S keeps the messages after its marker')
  t.equal(await lease('S'), 1, 'S may')
  t.equal(await redis.get(`${prefix}successor`), null, 'and its claim is spent')

  await redis.set(`${prefix}leader`, 'H', 'PX', 60_000)
  await redis.set(`${prefix}successor`, 'S', 'PX', 60_000)
  t.equal(await pass('H', 'C'), 0, 'not passed to an instance other than the one that claimed it')
  await redis.set(`${prefix}successor`, 'S2', 'PX', 60_000)
  t.equal(await pass('H', 'S2'), 0, 'nor to a successor no longer heard')
  t.equal(await redis.get(`${prefix}successor`), null, 'whose claim goes, so that any other may take the lease at once')
  t.equal(await redis.get(`${prefix}leader`), 'H', 'H still holds it, to let it go')
  await redis.set(`${prefix}successor`, 'S', 'PX', 60_000)
  t.equal(await pass('H', 'S'), 1, 'passed to the heard successor that claimed it')
  t.same([await redis.get(`${prefix}leader`), await redis.get(`${prefix}successor`)], ['S', null], 'S holds it, the claim spent')
})

t.test('a holder that stops beside an instance that does not take over (an older version) lets the lease go, as before', async (t) => {
  if (!(await needRedis(t))) return
  const redis = redisClient(t)
  const a = await rig(t, {}, { leaseMs: 600_000 })
  await a.leader.start()
  t.ok(a.leader.isLeader, 'A holds the lease')
  // Listens on leader-free as an older instance does, and never answers.
  const older = redisClient(t)
  const notices: string[] = []
  older.on('message', (_channel: string, message: string) => notices.push(message))
  await older.subscribe(`${a.prefix}leader-free`)
  await a.leader.stop()
  t.equal(await redis.get(`${a.prefix}leader`), null, 'then let the lease go')
  await eventually(() => notices.length >= 2, 'both notices', WAIT_MS)
  t.same(notices, [`handing:${a.state.instanceId}`, a.state.instanceId], 'asked for a successor, then said the lease is free')
})

t.test('the hand-over notice still reaches an instance whose subscriber reconnected, and never one that is stopping', async (t) => {
  if (!(await needRedis(t))) return
  const redis = redisClient(t)
  const a = await rig(t, {}, { leaseMs: 600_000 })
  const b = await rig(t, {}, { leaseMs: 600_000, prefix: a.prefix })
  const c = await rig(t, {}, { leaseMs: 600_000, prefix: a.prefix })
  await a.leader.start()
  await b.leader.start()
  await c.leader.start()
  t.ok(a.leader.isLeader, 'A holds the lease')
  await killSubscriber(t, redis, b.subscriber, 'ready')
  await eventually(async () => await subscriberCount(redis, `${a.prefix}leader-free`) === 3, 'B to listen again after its reconnect', WAIT_MS)
  // C is draining: were it to take the lease, it would hand it over again at once.
  c.leader.beginStop()
  await a.leader.stop()
  await eventually(() => b.leader.isLeader, 'B to take the lease', WAIT_MS)
  t.notOk(c.leader.isLeader, 'not the stopping instance')
  await ingressFlows(t, redis, b, [a, c])
  await b.leader.stop()
  await tick(t, c.leader)
  t.notOk(c.leader.isLeader, 'a stopping instance takes no lease, even a free one')
})

t.test('the grace of a stopped instance\'s user ends on time, not at the holder\'s next check', async (t) => {
  if (!(await needRedis(t))) return
  // Lease checks every 200 s by the timer; the test runs the holder's one check.
  const a = await rig(t, {}, { leaseMs: 600_000 })
  const b = await rig(t, {}, { leaseMs: 600_000, prefix: a.prefix, presenceGraceMs: 1000 })
  await a.state.start()
  await b.state.start()
  const offline: string[] = []
  a.state.onOffline((userId) => offline.push(userId))
  await a.leader.start()
  t.ok(a.leader.isLeader, 'A holds the lease')

  // B's last stream of the user closes, then B stops: its grace timer is gone.
  const admission = await b.state.admit({ connectionId: 'c_graced', userId: 'graced', topics: [], openedAt: Date.now(), limit: 5, policy: 'reject' })
  t.ok(admission.admitted, 'admitted on B')
  await b.state.release('c_graced', 'graced', 60)
  await b.state.close()
  await tick(t, a.leader)
  t.same(offline, [], 'not offline before the grace ends')
  await eventually(() => offline.includes('graced'), 'A to take the user offline', WAIT_MS)
  t.same(offline, ['graced'], 'announced once')
})

t.test('a holder whose subscriber reconnected without its subscriptions subscribes again', async (t) => {
  if (!(await needRedis(t))) return
  const redis = redisClient(t)
  // ioredis resubscribes on reconnect, but loses it when the connection drops again
  // before Redis answers; turning it off stands for that, deterministically.
  const setup = await rig(t, { autoResubscribe: false })
  await tick(t, setup.leader)
  t.ok(setup.leader.isLeader, 'the first tick takes the lease')
  await killSubscriber(t, redis, setup.subscriber, 'ready')
  t.equal(await subscriberCount(redis, `${setup.prefix}publish`), 0, 'the reconnected subscriber lost its subscriptions')
  await tick(t, setup.leader)
  t.ok(setup.leader.isLeader, 'still the holder')
  await ingressFlows(t, redis, setup)
})

t.test('a lease given up while unsubscribing fails: the subscriptions ioredis restores are dropped on the next tick', async (t) => {
  if (!(await needRedis(t))) return
  const redis = redisClient(t)
  const setup = await rig(t)
  await tick(t, setup.leader)
  t.ok(setup.leader.isLeader, 'the first tick takes the lease')
  await otherHolder(t, REDIS_URL, setup.prefix)
  await killSubscriber(t, redis, setup.subscriber, 'reconnecting')
  const ready = once(setup.subscriber, 'ready')
  await tick(t, setup.leader)
  t.notOk(setup.leader.isLeader, 'the lease moved away')
  await within(ready, WAIT_MS, 'the subscriber to reconnect')
  await tick(t, setup.leader)
  // Replies come in order: once this answers, the resubscription ioredis sent on reconnect is done.
  await setup.subscriber.ping()
  t.equal(await subscriberCount(redis, `${setup.prefix}publish`), 0, 'no subscription left on an instance that does not hold the lease')
  t.equal(await redis.publish(`${setup.prefix}publish`, '{"to":{"user":"u1"},"data":1}'), 0, 'a PUBLISH reaches no one here')
})

t.test('a holder not heard on its alive: channel loses the lease to an instance that is heard there, and only to such an instance', async (t) => {
  if (!(await needRedis(t))) return
  const a = await rig(t)
  const b = await rig(t, {}, { prefix: a.prefix })
  // Neither has started: neither listens on its alive: channel, as after a failed subscribe.
  await tick(t, a.leader)
  t.ok(a.leader.isLeader, 'A takes the free lease')
  await tick(t, b.leader)
  t.notOk(b.leader.isLeader, 'B, not heard either, leaves it to A (or the two would take it from each other at every probe)')
  await b.leader.start()
  // A, ticked by the test alone, has stopped renewing: once that is stale, B takes it.
  await eventually(async () => { await tick(t, b.leader); return b.leader.isLeader }, 'B, heard once it listens, to take it from A', WAIT_MS)
  await tick(t, a.leader)
  t.notOk(a.leader.isLeader, 'A sees it lost the lease')
  await tick(t, a.leader)
  t.notOk(a.leader.isLeader, 'and cannot take it back while B is heard')
})

t.test('an alive: subscribe Redis refused is tried again at the next checks, not only at a reconnect, and warned once', async (t) => {
  if (!(await needRedis(t))) return
  const own = await startOwnRedis(t)
  const admin = redisClient(t, own.url)
  const prefix = uniquePrefix('lease')
  // The subscriber's user may use every channel the gateway needs but its alive: one.
  await admin.acl('SETUSER', 'gateway', 'on', '>secret', '~*', '+@all', 'resetchannels', `&${prefix}leader-free`, `&${prefix}publish`, `&${prefix}ingress-mark`, '&stream:*')
  const setup = await rig(t, {}, { prefix, redisUrl: own.url, subscriberUrl: `redis://gateway:secret@127.0.0.1:${own.port}` })
  await setup.leader.start()
  const alive = `${prefix}alive:${setup.state.instanceId}`
  for (let n = 0; n < 3; n++) await tick(t, setup.leader)
  t.equal(await subscriberCount(admin, alive), 0, 'not heard while refused')
  t.equal(setup.warnings.filter((line) => line.startsWith('could not subscribe to lease hand-overs')).length, 1, 'one warning for the refusals')
  t.equal(setup.subscriber.status, 'ready', 'the subscriber stayed connected')

  await admin.acl('SETUSER', 'gateway', `&${prefix}alive:*`)
  await eventually(async () => {
    await tick(t, setup.leader)
    return await subscriberCount(admin, alive) === 1
  }, 'the instance to be heard once Redis allows it', WAIT_MS)
  t.pass('heard, without a reconnect')
})

t.test('a holder whose subscriber reconnects keeps the lease while it renews (the messages it took in wait to be published under it), and ingress reaches it again, whatever lease length the other runs with', async (t) => {
  if (!(await needRedis(t))) return
  const redis = redisClient(t)
  // Both probe every 50 ms: B asks 6 times while A's subscriber is away (it reconnects after 300 ms).
  // B's lease is 20 times A's (another INSTANCE_TTL_MS): A's renewals still count as recent to it.
  const a = await rig(t, {}, { probeEveryMs: 50 })
  const b = await rig(t, {}, { prefix: a.prefix, probeEveryMs: 50, leaseMs: 600_000 })
  await a.leader.start()
  await b.leader.start()
  t.ok(a.leader.isLeader && !b.leader.isLeader, 'A holds the lease')
  const back = once(a.subscriber, 'ready')
  await killSubscriber(t, redis, a.subscriber, 'reconnecting')
  await within(back, WAIT_MS, 'A\'s subscriber to reconnect')
  await a.subscriber.ping()
  t.equal(await redis.get(`${a.prefix}leader`), a.state.instanceId, 'A still holds the lease')
  t.notOk(b.leader.isLeader, 'B did not take it')
  await eventually(() => a.leader.isLeader, 'A to count itself the holder again', WAIT_MS)
  await ingressFlows(t, redis, a, [b])
})

t.test('a holder giving the lease up while its subscriber reconnects to a Redis that does not answer ends its check, and its stop, without waiting on it', async (t) => {
  if (!(await needRedis(t))) return
  const proxy = await FaultyProxy.start(t, Number(new URL(REDIS_URL).port || 6379))
  // The subscriber goes through the proxy; the commands connection straight to Redis.
  const a = await rig(t, {}, { subscriberUrl: proxy.url })
  await a.leader.start()
  t.ok(a.leader.isLeader, 'A holds the lease')
  // Its connection cut, and the next ones hear nothing back: connected, never ready.
  proxy.cutOff()
  await eventually(() => a.subscriber.status === 'connect', 'the subscriber to reconnect into silence', WAIT_MS)
  await otherHolder(t, REDIS_URL, a.prefix)
  await within(a.leader.tick(), WAIT_MS, 'the check that gives the lease up to end')
  t.notOk(a.leader.isLeader, 'A gave the lease up')
  await within(a.leader.stop(), WAIT_MS, 'the stop to end')
})

t.test('gateway: the pubsub connection killed as the lease is taken; once it is back, an ingress message reaches a stream', async (t) => {
  if (!(await needRedis(t))) return
  // A Redis of the test's own: killing every pubsub client there touches no other test.
  const own = await startOwnRedis(t)
  const redis = redisClient(t, own.url)
  const prefix = uniquePrefix('lease-gw')
  // The lease lasts 30 s and its timer ticks every 10 s: the test drives each tick.
  const gateway = await startGateway(t, { REDIS_URL: own.url, REDIS_PREFIX: prefix, INSTANCE_TTL_MS: '60000' })
  const ingress = gateway.app.ingress
  if (ingress === null) throw new Error('no ingress leader in Redis mode')
  t.ok(ingress.isLeader, 'the only instance takes the lease at start')
  const { stream } = await openConnected(`${gateway.url}/v1/stream?token=${userToken('u1')}`, { t })

  // The lease moves away, then comes back free just as the pubsub connection drops.
  await otherHolder(t, own.url, prefix)
  await tick(t, ingress)
  t.notOk(ingress.isLeader, 'the lease moved away')
  await redis.del(`${prefix}leader`)
  t.equal(await redis.client('KILL', 'TYPE', 'pubsub'), 2, 'the gateway pubsub connection is killed (and the other holder\'s)')
  await eventually(() => !gateway.app.bus.isReady(), 'the gateway to see its pubsub connection drop')
  await tick(t, ingress)
  t.notOk(ingress.isLeader, 'not the holder while not subscribed')

  await eventually(() => gateway.app.bus.isReady(), 'the pubsub connection to be back')
  await tick(t, ingress)
  t.ok(ingress.isLeader, 'the next tick takes the lease')
  t.equal(await subscriberCount(redis, `${prefix}publish`), 1, `PUBSUB NUMSUB ${prefix}publish is 1`)
  t.equal(await redis.publish(`${prefix}publish`, JSON.stringify({ to: { user: 'u1' }, event: 'after-outage', data: { n: 1 } })), 1, 'one instance listens')
  const event = await stream.nextEvent('after-outage', WAIT_MS)
  t.same(JSON.parse(event.data), { n: 1 })
  t.ok(event.id !== undefined, 'it got an id')
})

t.test('gateway: a lease holder killed with SIGKILL loses the lease as its connection closes, not when the lease expires; a PUBLISH stream:<id> then reaches a stream on the other instance', async (t) => {
  if (!(await needRedis(t))) return
  const prefix = uniquePrefix('lease-kill')
  // A Redis of its own: stream:* is not under the prefix, and another test's
  // gateways on a shared Redis would hear (and count in PUBLISH's answer) it too.
  const own = await startOwnRedis(t)
  // A lease of five minutes: within the wait below, only the closed connection can hand it over.
  const env = { REDIS_URL: own.url, REDIS_PREFIX: prefix, INSTANCE_TTL_MS: '600000' }
  const doomed = await spawnServer(t, { ...env, JWT_SECRET: TEST_SECRET, LOG_LEVEL: 'warn', HOST: '127.0.0.1' })
  const redis = redisClient(t, own.url)
  const survivor = await startGateway(t, env)
  const ingress = survivor.app.ingress
  if (ingress === null) throw new Error('no ingress leader in Redis mode')
  t.notOk(ingress.isLeader, 'the first instance holds the lease')
  const { stream, connected } = await openConnected(`${survivor.url}/v1/stream?token=${userToken('u1')}`, { t })
  await redis.publish(`stream:${connected.connectionId}`, JSON.stringify({ event: 'chunk', data: 'before' }))
  t.equal((await stream.nextEvent('chunk', WAIT_MS)).data, 'before', 'the holder handles stream:<id>')
  t.notOk(ingress.isLeader, 'a holder that listens keeps its lease')

  doomed.child.kill('SIGKILL')
  await doomed.waitExit(WAIT_MS)
  await eventually(() => ingress.isLeader, 'the other instance to take the lease', WAIT_MS)
  t.equal(await redis.publish(`stream:${connected.connectionId}`, JSON.stringify({ event: 'chunk', data: 'after' })), 1, 'one instance listens')
  t.equal((await stream.nextEvent('chunk', WAIT_MS)).data, 'after', 'and handles it')
})

/**
 * A holder (a child process) SIGKILLed before or during a flow of plain
 * PUBLISHes to a stream on the other instance, alternately on stream:<id>
 * and <prefix>publish, paced so that the takeover (a second or so after the
 * kill) falls inside the flow: each arrives once, in order.
 */
async function killHolderMidFlow (t: Test, options: { instanceTtlMs: number, killAt: number }): Promise<void> {
  // A Redis of its own: other tests' stream:* messages would take places among the counted ones.
  const own = await startOwnRedis(t)
  const prefix = uniquePrefix('lease-kill')
  const env = { REDIS_URL: own.url, REDIS_PREFIX: prefix, INSTANCE_TTL_MS: String(options.instanceTtlMs) }
  const doomed = await spawnServer(t, { ...env, JWT_SECRET: TEST_SECRET, LOG_LEVEL: 'warn', HOST: '127.0.0.1' })
  const survivor = await startGateway(t, env)
  const ingress = survivor.app.ingress
  if (ingress === null) throw new Error('no ingress leader in Redis mode')
  t.ok(!ingress.isLeader && ingress.isStandby, 'the first instance holds the lease, the other stands by')
  const { stream, connected } = await openConnected(`${survivor.url}/v1/stream?token=${userToken('u1')}`, { t })
  const redis = redisClient(t, own.url)
  if (options.killAt < 0) {
    doomed.child.kill('SIGKILL')
    await doomed.waitExit(WAIT_MS)
  }
  const total = 2000
  for (let n = 0; n < total; n++) {
    if (n % 2 === 0) await redis.publish(`stream:${connected.connectionId}`, JSON.stringify({ event: 'seq', data: String(n) }))
    else await redis.publish(`${prefix}publish`, JSON.stringify({ to: { user: 'u1' }, event: 'seq', data: String(n) }))
    if (n === options.killAt) doomed.child.kill('SIGKILL')
    await new Promise<void>((resolve) => setTimeout(resolve, 1))
  }
  t.ok(ingress.isLeader, 'the survivor holds the lease')
  await stream.next((event) => event.event === 'seq' && event.data === String(total - 1), 20_000, 'the last message')
  const seen = stream.events.filter((event) => event.event === 'seq').map((event) => Number(event.data))
  const missing = Array.from({ length: total }, (_, n) => n).filter((n) => !seen.includes(n))
  t.same(missing, [], 'none lost')
  t.same(seen, Array.from({ length: total }, (_, n) => n), 'each once, in order')
  const ids = stream.events.filter((event) => event.event === 'seq').map((event) => BigInt(event.id ?? '0'))
  t.ok(ids.every((id, index) => index === 0 || id > ids[index - 1]), 'ids increasing')
}

t.test('gateway: a holder killed with SIGKILL mid-flow: the standby that takes over publishes what the holder had not, so no plain PUBLISH is lost or handled twice, and their order holds', async (t) => {
  if (!(await needRedis(t))) return
  await killHolderMidFlow(t, { instanceTtlMs: 60_000, killAt: 300 })
})

t.test('gateway: a holder killed before it published anything: what came before the takeover is published all the same', async (t) => {
  if (!(await needRedis(t))) return
  await killHolderMidFlow(t, { instanceTtlMs: 60_000, killAt: -1 })
})

t.test('gateway: with the shortest leases (INSTANCE_TTL_MS=2000, a lease of one second) a dead holder is still taken over from before its lease expires, so nothing is lost', async (t) => {
  if (!(await needRedis(t))) return
  await killHolderMidFlow(t, { instanceTtlMs: 2000, killAt: 300 })
})

t.test('gateway: a holder that stops passes the lease on: no plain PUBLISH sent meanwhile is lost or handled twice, and their order holds', async (t) => {
  if (!(await needRedis(t))) return
  // A Redis of its own: other tests' stream:* messages would take places in the queues.
  const own = await startOwnRedis(t)
  const env = { REDIS_URL: own.url, REDIS_PREFIX: uniquePrefix('lease-pass'), INSTANCE_TTL_MS: '60000' }
  const a = await startGateway(t, env)
  const b = await startGateway(t, env)
  t.ok(a.app.ingress?.isLeader === true && b.app.ingress?.isLeader === false, 'A holds the lease')
  const { stream, connected } = await openConnected(`${b.url}/v1/stream?token=${userToken('u1')}`, { t })
  const redis = redisClient(t, own.url)
  // One after another, as fast as Redis answers: a gap of a round trip at the hand-over holds several.
  const total = 3000
  let stopping: Promise<void> | null = null
  for (let n = 0; n < total; n++) {
    await redis.publish(`stream:${connected.connectionId}`, JSON.stringify({ event: 'seq', data: String(n) }))
    if (n === 500) stopping = a.app.close()
  }
  await stopping
  t.ok(b.app.ingress?.isLeader, 'B holds the lease')
  await stream.next((event) => event.event === 'seq' && event.data === String(total - 1), 20_000, 'the last message')
  const seen = stream.events.filter((event) => event.event === 'seq').map((event) => Number(event.data))
  const missing = Array.from({ length: total }, (_, n) => n).filter((n) => !seen.includes(n))
  t.same(missing, [], 'none lost')
  t.same(seen, Array.from({ length: total }, (_, n) => n), 'each once, in order')
})

/**
 * Gateways A (the lease holder) and B on `url`, and a stream of u1 on B. Their
 * timers check the lease only every 10 s: the test drives the checks.
 */
async function twoHolders (t: Test, url: string, prefix: string): Promise<{ a: Gateway, leaseA: IngressLeader, leaseB: IngressLeader, stream: SseClient }> {
  const env = { REDIS_URL: url, REDIS_PREFIX: prefix, INSTANCE_TTL_MS: '60000' }
  const a = await startGateway(t, env)
  const b = await startGateway(t, env)
  const [leaseA, leaseB] = [a.app.ingress, b.app.ingress]
  if (leaseA === null || leaseB === null) throw new Error('no ingress leader in Redis mode')
  t.ok(leaseA.isLeader && !leaseB.isLeader, 'A holds the lease')
  const { stream } = await openConnected(`${b.url}/v1/stream?token=${userToken('u1')}`, { t })
  return { a, leaseA, leaseB, stream }
}

t.test('gateway: a holder that loses Redis stops counting itself the holder until a check renews the lease; after an empty restart each message is handled once', async (t) => {
  if (!(await needRedis(t))) return
  const own = await startOwnRedis(t)
  const prefix = uniquePrefix('lease-restart')
  // Reconnects start a check at once.
  const { a, leaseA, leaseB, stream } = await twoHolders(t, own.url, prefix)

  // An empty Redis after a restart has no lease key: another instance may
  // take it, so A's lease from before is worth nothing.
  await own.stop()
  await eventually(() => !a.app.bus.isReady(), 'A to see Redis gone')
  t.notOk(leaseA.isLeader, 'A does not count itself the holder while Redis is gone')
  await own.start()
  await eventually(() => leaseA.isLeader !== leaseB.isLeader, 'one holder again', 10_000, 50)
  t.pass(`${leaseA.isLeader ? 'A' : 'B'} holds the lease after the restart`)

  const redis = redisClient(t, own.url)
  await redis.publish(`${prefix}publish`, JSON.stringify({ to: { user: 'u1' }, event: 'once', data: 1 }))
  await redis.publish(`${prefix}publish`, JSON.stringify({ to: { user: 'u1' }, event: 'marker', data: 2 }))
  await stream.nextEvent('marker', WAIT_MS)
  t.equal(stream.events.filter((event) => event.event === 'once').length, 1, 'the message was handled once')
})

t.test('gateway: a lease key gone while its holder still acts on it (an emptied store) is taken back by the holder, or left to the instance that took it; each message is published once', async (t) => {
  if (!(await needRedis(t))) return
  const prefix = uniquePrefix('lease-gone')
  // A Redis of its own: another test's stream:* message reaching A would
  // show it the lease is gone before the check this test is about.
  const own = await startOwnRedis(t)
  const { leaseA, leaseB, stream } = await twoHolders(t, own.url, prefix)
  const redis = redisClient(t, own.url)
  const sendAndCount = async (event: string): Promise<number> => {
    await redis.publish(`${prefix}publish`, JSON.stringify({ to: { user: 'u1' }, event, data: 1 }))
    await redis.publish(`${prefix}publish`, JSON.stringify({ to: { user: 'u1' }, event: `${event}-marker`, data: 2 }))
    await stream.nextEvent(`${event}-marker`, WAIT_MS)
    return stream.events.filter((received) => received.event === event).length
  }

  // The key goes (FLUSHALL, an eviction) and B's check takes it before A's
  // next one. A's own check (every third of the lease) may come between the
  // two and take the key back first: then it goes again.
  for (let attempt = 0; attempt < 5 && !leaseB.isLeader; attempt++) {
    await redis.del(`${prefix}leader`)
    await leaseB.tick()
  }
  t.ok(leaseB.isLeader && leaseA.isLeader, 'B took the lease; A has not checked since')
  t.equal(await sendAndCount('taken'), 1, 'a message both receive is published once (by B)')
  await eventually(() => !leaseA.isLeader, 'A to stop counting itself the holder')
  // The check that started then, over before the key goes again.
  await leaseA.tick()
  t.notOk(leaseA.isLeader, 'A\'s check leaves the lease to B')

  // The key goes again, and the holder's next message comes before any check.
  await redis.del(`${prefix}leader`)
  t.equal(await sendAndCount('retaken'), 1, 'the holder publishes it once')
  await leaseA.tick()
  t.ok(leaseB.isLeader && !leaseA.isLeader, 'the holder took the key back with that message: A\'s check does not take it')
  t.equal(await sendAndCount('after'), 1, 'later messages are published once')
})

/**
 * A leader holding the lease, whose handler the test sets, counting the
 * `publish` messages it drops past the bound. Other test files' `stream:*`
 * messages reach it too (that channel has no prefix) and take places in its
 * queue, so the tests count their own messages and allow for a few others.
 */
async function boundedRig (t: Test): Promise<{ setup: Rig, dropped: () => number }> {
  const setup = await rig(t)
  await tick(t, setup.leader)
  t.ok(setup.leader.isLeader)
  let dropped = 0
  setup.leader.onOverflow((source) => { if (source === 'publish') dropped++ })
  return { setup, dropped: () => dropped }
}

/**
 * Publishes the bound's worth of ingress messages and `extra` more, numbered
 * from 0, and returns once the leader has read them all: a PING on its
 * subscriber connection is answered after the messages sent before it.
 */
async function floodIngress (redis: Redis, setup: Rig, extra: number): Promise<number> {
  const pipeline = redis.pipeline()
  for (let n = 0; n < MAX_QUEUED_INGRESS + extra; n++) pipeline.publish(`${setup.prefix}publish`, String(n))
  await pipeline.exec()
  await setup.subscriber.ping()
  return MAX_QUEUED_INGRESS + extra
}

/** Whether `handled` is "0", "1", "2"… */
const firstInOrder = (handled: string[]): boolean => handled.every((payload, index) => payload === String(index))

t.test('ingress messages waiting to be handed to Redis are bounded: past the bound they are dropped and counted, the rest handled in order', async (t) => {
  if (!(await needRedis(t))) return
  const redis = redisClient(t)
  const { setup, dropped } = await boundedRig(t)
  // The first hand-over stalls (Redis slow to answer), so the rest queue behind it.
  let release = (): void => {}
  const stalled = new Promise<void>((resolve) => { release = resolve })
  let first = true
  const handled: string[] = []
  setup.leader.onMessage(async (source, payload) => {
    if (first) {
      first = false
      await stalled
    }
    if (source.kind === 'publish') handled.push(payload ?? '(not UTF-8)')
    return { published: Promise.resolve() }
  })
  const extra = 25
  const sent = await floodIngress(redis, setup, extra)
  t.ok(dropped() >= extra && dropped() < extra + 100, `those past the bound dropped (${dropped()})`)
  t.ok(setup.warnings.filter((line) => line.includes('ingress messages dropped')).length === 1, 'one warning for the episode')
  release()
  await eventually(() => handled.length + dropped() === sent, 'every message handled or dropped', WAIT_MS, 20)
  t.ok(firstInOrder(handled), `the first ${handled.length} handled, in the order they came`)
  // Drained: the next message is handled again.
  await redis.publish(`${setup.prefix}publish`, 'after')
  await eventually(() => handled.at(-1) === 'after', 'a message after the drain', WAIT_MS, 20)
  t.equal(handled.length - 1 + dropped(), sent, 'nothing more dropped')
})

t.test('the ingress bound also counts messages handed over whose publish has not settled (Redis slow to answer)', async (t) => {
  if (!(await needRedis(t))) return
  const redis = redisClient(t)
  const { setup, dropped } = await boundedRig(t)
  let release = (): void => {}
  const slowRedis = new Promise<void>((resolve) => { release = resolve })
  const handed: string[] = []
  setup.leader.onMessage(async (source, payload) => {
    if (source.kind === 'publish') handed.push(payload ?? '(not UTF-8)')
    return { published: slowRedis }
  })
  const extra = 10
  const sent = await floodIngress(redis, setup, extra)
  await eventually(() => handed.length + dropped() === sent, 'every message handed over or dropped', WAIT_MS, 20)
  t.ok(dropped() >= extra && dropped() < extra + 100, `those past the bound dropped (${dropped()})`)
  t.ok(firstInOrder(handed), 'the first ones handed over, in order')
  release()
  // Settled: room again.
  await redis.publish(`${setup.prefix}publish`, 'after')
  await eventually(() => handed.at(-1) === 'after', 'a message after the publishes settled', WAIT_MS, 20)
  t.equal(handed.length - 1 + dropped(), sent, 'nothing more dropped')
})
