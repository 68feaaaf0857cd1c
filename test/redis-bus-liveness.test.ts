/**
 * The bus PINGs its subscriber to notice a connection that died silently.
 * Under load, Redis answers the PING only after the messages queued before
 * it, which a busy instance can take longer to read than the PING's timeout:
 * messages still arriving prove the connection alive.
 */
import t, { type Test } from 'tap'
import { RedisBus } from '../src/core/redis/redis-bus'
import { redisOptions, ScriptedRedis } from '../src/core/redis/client'
import Redis from 'ioredis'
import { eventually } from './helpers'
import { needRedis, redisClient, REDIS_URL, uniquePrefix } from './helpers/redis'

/** A RedisBus on connections of its own, listening to `b`; what it warns and how many losses it signals. */
async function busUnderTest (t: Test, name: string): Promise<{ prefix: string, bus: RedisBus, subscriber: Redis, warnings: string[], losses: () => number }> {
  const prefix = uniquePrefix(name)
  const commands = new ScriptedRedis(REDIS_URL)
  const subscriber = new Redis(REDIS_URL, { ...redisOptions(), connectionName: 'liveness-sub' })
  await Promise.all([commands.redis.connect(), subscriber.connect()])
  const warnings: string[] = []
  // A window of 4 s: PINGs every second, three unanswered and the connection is dropped.
  const bus = new RedisBus(commands, subscriber, { prefix, historySize: 100, historyTtlS: 4 }, { warn: (_obj, msg) => warnings.push(msg) })
  t.teardown(async () => {
    await bus.close()
    subscriber.disconnect()
    commands.redis.disconnect()
  })
  let losses = 0
  bus.onSubscription({ lost: () => { losses++ }, restored: () => {} })
  await bus.start()
  await bus.listen('b')
  return { prefix, bus, subscriber, warnings, losses: () => losses }
}

/** Holds the event loop 5 ms, as a fan-out to thousands of streams does. */
function busyFor5ms (): void {
  const end = performance.now() + 5
  while (performance.now() < end) { /* busy */ }
}

/** 1200 messages of 4 KB queued at once: 6 s of work at 5 ms each, twice the PING timeout, and more than one turn's socket reads. */
const COUNT = 1200

t.test('a subscriber slow to read a long queue of messages is not taken for dead', async (t) => {
  if (!(await needRedis(t))) return
  const { prefix, bus, warnings, losses } = await busUnderTest(t, 'liveness')
  let delivered = 0
  bus.onDelivery(() => {
    delivered++
    busyFor5ms()
  })
  const pipeline = redisClient(t).pipeline()
  const first = bus.deliveredUpTo() + 1
  for (let n = 0; n < COUNT; n++) pipeline.publish(`${prefix}ch:b`, `${first + n}\ndata: ${JSON.stringify({ n, pad: 'x'.repeat(4000) })}\n\n`)
  await pipeline.exec()
  await eventually(() => delivered === COUNT, 'every message delivered', 30_000, 50)
  t.equal(losses(), 0, 'no loss signalled')
  t.same(warnings, [], 'nothing reconnected')
})

t.test('the same with the queue on a pattern subscription of the same connection (ingress\'s stream:*)', async (t) => {
  if (!(await needRedis(t))) return
  const { prefix, subscriber, warnings, losses } = await busUnderTest(t, 'livepattern')
  await subscriber.psubscribe(`${prefix}stream:*`)
  let handled = 0
  subscriber.on('pmessageBuffer', () => {
    handled++
    busyFor5ms()
  })
  const pipeline = redisClient(t).pipeline()
  for (let n = 0; n < COUNT; n++) pipeline.publish(`${prefix}stream:c${n}`, JSON.stringify({ n, pad: 'x'.repeat(4000) }))
  await pipeline.exec()
  await eventually(() => handled === COUNT, 'every message handled', 30_000, 50)
  t.equal(losses(), 0, 'no loss signalled')
  t.same(warnings, [], 'nothing reconnected')
})

t.test('an event on several channels is framed once: every channel\'s delivery shares one chunk', async (t) => {
  if (!(await needRedis(t))) return
  const { bus } = await busUnderTest(t, 'onechunk')
  await bus.listen('c')
  await bus.listen('d')
  const deliveries: Array<{ name: string, id: number, chunk: Buffer }> = []
  bus.onDelivery((name, id, chunk) => { deliveries.push({ name, id, chunk }) })
  const [first, second] = await bus.publish([{ channels: ['b', 'c', 'd'], body: 'data: one\n\n' }, { channels: ['b', 'c'], body: 'data: two\n\n' }])
  await eventually(() => deliveries.length === 5, 'five deliveries', 10_000)
  t.same(deliveries.map(({ name, id }) => [name, id]), [['b', first], ['c', first], ['d', first], ['b', second], ['c', second]])
  t.ok(deliveries[1].chunk === deliveries[0].chunk && deliveries[2].chunk === deliveries[0].chunk, 'the first event\'s three deliveries share one Buffer')
  t.ok(deliveries[4].chunk === deliveries[3].chunk && deliveries[3].chunk !== deliveries[0].chunk, 'the second its own')
  t.match(deliveries[3].chunk.toString(), /id: \d+\ndata: two\n\n/)
})
