/**
 * The durable ingress's reader on real Redis, with a lease the test flips:
 * entries left pending when the lease is lost mid-claim go out before newer
 * ones once it is back, however soon that is.
 */
import t from 'tap'
import Redis from 'ioredis'
import { DurableIngress } from '../src/core/redis/engine'
import { redisOptions } from '../src/core/redis/client'
import { needRedis, redisClient, REDIS_URL, uniquePrefix } from './helpers/redis'
import { Waiters } from './helpers/wait'

t.test('a take-over claim cut short by the lease\'s loss, the lease back at once: the rest of the last holder\'s entries come before newer ones', async (t) => {
  if (!(await needRedis(t))) return
  const redis = redisClient(t)
  const key = `${uniquePrefix('durflap')}ingress`
  await redis.xgroup('CREATE', key, 'gateway', '0', 'MKSTREAM')
  for (const n of [1, 2, 3]) await redis.xadd(key, '*', 'payload', String(n))
  // A holder that is gone read them: they are pending to it.
  await redis.xreadgroup('GROUP', 'gateway', 'gone-holder', 'COUNT', 10, 'STREAMS', key, '>')

  const lease = { isLeader: true }
  const reader = new Redis(REDIS_URL, { ...redisOptions(), connectionName: 'durable-ingress-test' })
  reader.on('error', () => {})
  await reader.connect()
  const ingress = new DurableIngress(reader, key, 'new-holder', lease, { info: () => {}, warn: () => {} })
  t.teardown(async () => await ingress.stop())
  const handled: string[] = []
  const waiters = new Waiters()
  ingress.onMessage(async (payload) => {
    handled.push(payload ?? '')
    waiters.wake()
    if (payload === '1') {
      // The lease lapses while entry 1 is handled, and is back 200 ms later,
      // within the next blocking read; two new entries arrive then.
      lease.isLeader = false
      setTimeout(() => {
        lease.isLeader = true
        redis.multi().xadd(key, '*', 'payload', '4').xadd(key, '*', 'payload', '5').exec().catch(() => {})
      }, 200)
    }
  })
  await waiters.until(() => handled.length >= 5, { timeoutMs: 10_000, what: 'five entries handled', describe: () => handled.join(',') })
  t.same(handled, ['1', '2', '3', '4', '5'], 'in the order they were added')
})
