/**
 * After its pubsub connection comes back, an instance subscribes again to the
 * bus channels its streams listen to and to its control channels. ioredis
 * resubscribes by itself, but loses that when the connection drops again
 * before Redis answers; a subscriber with `autoResubscribe: false` stands for
 * that, deterministically.
 */
import { once } from 'node:events'
import { randomBytes } from 'node:crypto'
import t, { type Test } from 'tap'
import Redis from 'ioredis'
import { Registry } from '../src/core/registry'
import { redisOptions, ScriptedRedis } from '../src/core/redis/client'
import { RedisBus } from '../src/core/redis/redis-bus'
import { RedisState } from '../src/core/redis/redis-state'
import { eventually } from './helpers'
import { FaultyProxy } from './helpers/proxy'
import { needRedis, redisClient, REDIS_URL, startOwnRedis, subscriberCount, uniquePrefix } from './helpers/redis'
import { Waiters, within } from './helpers/wait'

const WAIT_MS = 5000

/*
 * Node turns an unhandled rejection into an uncaught exception; the monitor
 * records it (without stopping the crash) so the failing test names it.
 */
const crashes: string[] = []
process.on('uncaughtExceptionMonitor', (error, origin) => {
  crashes.push(`${origin}: ${error instanceof Error ? error.stack ?? error.message : String(error)}`)
})



interface Rig {
  bus: RedisBus
  state: RedisState
  commands: ScriptedRedis
  subscriber: Redis
  prefix: string
  warnings: string[]
  /** Resolves with the frame of the next delivery on `channel`. */
  delivered: (channel: string) => Promise<string>
}

/** A RedisBus and a RedisState sharing one subscriber, as in the gateway, on connections the test controls. */
async function rig (t: Test, urls: { commands: string, subscriber: string } = { commands: REDIS_URL, subscriber: REDIS_URL }): Promise<Rig> {
  const prefix = uniquePrefix('resub')
  const commands = new ScriptedRedis(urls.commands)
  // A pause before each reconnect leaves room to act while the subscriber is down.
  const subscriber = new Redis(urls.subscriber, { ...redisOptions(), connectionName: 'redis-resubscribe-test', retryStrategy: () => 300, autoResubscribe: false })
  for (const client of [commands.redis, subscriber]) client.on('error', () => {})
  const warnings: string[] = []
  const log = { warn: (obj: object, msg: string) => { warnings.push(`${msg} ${JSON.stringify(obj)}`) }, info: () => {} }
  const options = { prefix, historySize: 100, historyTtlS: 60, presenceGraceMs: 100, instanceTtlMs: 60_000 }
  const bus = new RedisBus(commands, subscriber, options, log)
  const state = new RedisState(commands, subscriber, new Registry(`resub-${randomBytes(4).toString('hex')}`), options, log)
  t.teardown(async () => {
    await state.close()
    await bus.close()
    commands.redis.disconnect()
    subscriber.disconnect()
  })
  await Promise.all([commands.redis.connect(), subscriber.connect()])
  await bus.lastId()
  await state.start()

  const deliveries: Array<{ channel: string, frame: string }> = []
  const waiters = new Waiters()
  bus.onDelivery((channel, _id, frame) => {
    deliveries.push({ channel, frame: frame.toString() })
    waiters.wake()
  })
  const delivered = async (channel: string): Promise<string> => {
    const from = deliveries.length
    const found = (): { channel: string, frame: string } | undefined => deliveries.slice(from).find((delivery) => delivery.channel === channel)
    await waiters.until(() => found() !== undefined, { timeoutMs: WAIT_MS, what: `a delivery on ${channel}`, describe: () => `${deliveries.length - from} other deliveries` })
    return found()?.frame ?? ''
  }
  return { bus, state, commands, subscriber, prefix, warnings, delivered }
}

async function kill (t: Test, redis: Redis, subscriber: Redis): Promise<void> {
  t.equal(await redis.client('KILL', 'ADDR', `127.0.0.1:${subscriber.stream.localPort ?? 0}`), 1, 'the subscriber connection is killed')
}

/**
 * Waits, bounded, for `expected` to have the subscriber. A timeout is left to
 * the assertions that follow, which name each missing channel. The PING
 * flushes anything else the subscriber sent before: its replies come in order.
 */
async function settled (setup: Rig, redis: Redis, expected: string[]): Promise<void> {
  await eventually(async () => {
    const counts = await Promise.all(expected.map(async (name) => await subscriberCount(redis, name)))
    return counts.every((count) => count === 1)
  }, 'the subscriptions to be back').catch(() => {})
  await setup.subscriber.ping()
}

/** Every channel in `listened` and the control channels have the subscriber; those in `not` have none. */
async function subscribedExactly (t: Test, redis: Redis, setup: Rig, listened: string[], not: string[]): Promise<void> {
  const control = [`${setup.prefix}ctl`, `${setup.prefix}reply:${setup.state.instanceId}`]
  const bus = (name: string): string => `${setup.prefix}ch:${name}`
  await settled(setup, redis, [...listened.map(bus), ...control])
  for (const name of [...listened.map(bus), ...control]) t.equal(await subscriberCount(redis, name), 1, `PUBSUB NUMSUB ${name} is 1`)
  for (const name of not.map(bus)) t.equal(await subscriberCount(redis, name), 0, `PUBSUB NUMSUB ${name} is 0`)
}

/** A publish through the bus reaches its delivery listener. */
async function flows (t: Test, setup: Rig, channel: string): Promise<void> {
  const delivery = setup.delivered(channel)
  const [id] = await setup.bus.publish([{ channels: [channel], body: `event: x\ndata: ${channel}\n\n` }])
  const frame = await delivery
  t.match(frame, `id: ${id}\nevent: x\ndata: ${channel}\n`, `an event published to ${channel} is delivered`)
}

t.test('after a reconnect that lost them, the bus channels and the control channels are subscribed again', async (t) => {
  if (!(await needRedis(t))) return
  const redis = redisClient(t)
  const setup = await rig(t)
  for (const name of ['a', 'b', 'c', 'left']) await setup.bus.listen(name)
  setup.bus.unlisten('left')
  await subscribedExactly(t, redis, setup, ['a', 'b', 'c'], ['left'])

  const ready = once(setup.subscriber, 'ready')
  await kill(t, redis, setup.subscriber)
  await within(ready, WAIT_MS, 'the subscriber to be ready again')
  await subscribedExactly(t, redis, setup, ['a', 'b', 'c'], ['left'])
  await flows(t, setup, 'b')
  // The lost subscription itself is worth a warning; nothing else is.
  t.same(setup.warnings.filter((warning) => !warning.startsWith('bus subscription lost')), [], 'nothing failed')
})

t.test('a listen that failed and an unlisten made while the subscriber was down are settled by the next reconnect', async (t) => {
  if (!(await needRedis(t))) return
  const redis = redisClient(t)
  const setup = await rig(t)
  for (const name of ['a', 'gone']) await setup.bus.listen(name)

  const down = once(setup.subscriber, 'reconnecting')
  const ready = once(setup.subscriber, 'ready')
  await kill(t, redis, setup.subscriber)
  await within(down, WAIT_MS, 'the subscriber to be reconnecting')
  // The hub keeps a channel whose listen failed as listened, and will not ask again.
  await t.rejects(setup.bus.listen('late'), 'a listen fails while the subscriber is down')
  setup.bus.unlisten('gone')
  await within(ready, WAIT_MS, 'the subscriber to be ready again')

  await subscribedExactly(t, redis, setup, ['a', 'late'], ['gone'])
  await flows(t, setup, 'late')
})

t.test('a resubscription that fails is logged, without secrets, and retried on the next reconnect', async (t) => {
  if (!(await needRedis(t))) return
  // ACL users are server-wide: a Redis of the test's own keeps this one from other tests.
  const own = await startOwnRedis(t)
  const redis = redisClient(t, own.url)
  const password = `SECRET-${randomBytes(6).toString('hex')}`
  await redis.acl('SETUSER', 'resub', 'on', `>${password}`, '~*', '&*', '+@all')
  const setup = await rig(t, { commands: own.url, subscriber: `redis://resub:${password}@127.0.0.1:${own.port}` })
  for (const name of ['a', 'b']) await setup.bus.listen(name)

  // Taking the channel permissions away disconnects the subscriber; it comes back unable to subscribe.
  const refused = once(setup.subscriber, 'ready')
  await redis.acl('SETUSER', 'resub', 'resetchannels')
  await redis.client('KILL', 'USER', 'resub')
  await within(refused, WAIT_MS, 'the subscriber to be ready again')
  await eventually(() => setup.warnings.length >= 2, 'both failed resubscriptions to be logged')
  t.ok(setup.warnings.some((line) => line.includes('bus channels') && line.includes('NOPERM')), 'the failed bus resubscription is logged with its reason')
  t.ok(setup.warnings.some((line) => line.includes('control channels') && line.includes('NOPERM')), 'the failed control resubscription is logged with its reason')
  t.notOk(setup.warnings.some((line) => line.includes(password)), 'no log line holds the password')
  t.equal(await subscriberCount(redis, `${setup.prefix}ch:a`), 0, 'not subscribed meanwhile')

  await redis.acl('SETUSER', 'resub', 'allchannels')
  const ready = once(setup.subscriber, 'ready')
  await kill(t, redis, setup.subscriber)
  await within(ready, WAIT_MS, 'the subscriber to be ready again')
  await subscribedExactly(t, redis, setup, ['a', 'b'], [])
  await flows(t, setup, 'a')
  t.same(crashes, [], 'no unhandled rejection or uncaught exception')
})

t.test('a subscriber dropped again after it subscribed again, while the other connection was down: the bus is not restored until it is subscribed', async (t) => {
  if (!(await needRedis(t))) return
  const redis = redisClient(t)
  const proxy = await FaultyProxy.start(t, Number(new URL(REDIS_URL).port || 6379))
  const setup = await rig(t, { commands: REDIS_URL, subscriber: proxy.url })
  const subscriberName = 'redis-resubscribe-test'
  const calls: string[] = []
  const waiters = new Waiters()
  setup.bus.onSubscription({
    lost: () => { calls.push('lost'); waiters.wake() },
    restored: () => { calls.push(`restored with the subscriber ${setup.subscriber.status}`); waiters.wake() }
  })
  await setup.bus.listen('a')
  // A delivery first: a subscriber that never delivered has lost nothing.
  await flows(t, setup, 'a')

  // The commands connection goes down, and stays down until the test connects it.
  setup.commands.redis.disconnect()
  // The subscriber drops, comes back and subscribes again; the bus cannot be restored without the other connection.
  const ready = once(setup.subscriber, 'ready')
  proxy.cut(subscriberName)
  await waiters.until(() => calls.includes('lost'), { timeoutMs: WAIT_MS, what: 'the loss', describe: () => calls.join(', ') })
  await within(ready, WAIT_MS, 'the subscriber to be ready again')
  await settled(setup, redis, [`${setup.prefix}ch:a`])
  // Dropped again, and kept from Redis: its reconnects hear nothing back.
  const closed = once(setup.subscriber, 'close')
  proxy.cutOff(subscriberName)
  await within(closed, WAIT_MS, 'the subscriber to drop again')
  // The other connection comes back first.
  await setup.commands.redis.connect()
  await setup.commands.redis.ping()
  t.same(calls, ['lost'], 'not restored while the subscriber is down')

  proxy.restore(subscriberName)
  await waiters.until(() => calls.length > 1, { timeoutMs: WAIT_MS, what: 'the restore', describe: () => calls.join(', ') })
  t.same(calls, ['lost', 'restored with the subscriber ready'], 'restored once it is subscribed again')
  await flows(t, setup, 'a')
})
