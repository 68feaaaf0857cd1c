/**
 * The durable ingress's reader on real Redis, with a lease the test flips:
 * entries left pending when the lease is lost mid-claim go out before newer
 * ones once it is back, however soon that is.
 */
import t, { type Test } from 'tap'
import Redis, { ReplyError } from 'ioredis'
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
  const ingress = new DurableIngress(reader, key, 'new-holder', lease, { info: () => {}, warn: () => {}, error: () => {} })
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
      const back = setTimeout(() => {
        lease.isLeader = true
        redis.multi().xadd(key, '*', 'payload', '4').xadd(key, '*', 'payload', '5').exec().catch(() => {})
      }, 200)
      t.teardown(() => clearTimeout(back))
    }
  })
  await waiters.until(() => handled.length >= 5, { timeoutMs: 10_000, what: 'five entries handled', describe: () => handled.join(',') })
  t.same(handled, ['1', '2', '3', '4', '5'], 'in the order they were added')
})

/**
 * A durable ingress that holds the lease on `key`, handling each entry with
 * `handle(payload, tries so far)`: an entry is handled once `handle` returns,
 * and fails that try when it throws. What it handled, tried, set aside and
 * logged as errors is recorded.
 */
async function holdIngress (t: Test, key: string, handle: (name: string, tried: number) => Promise<void>): Promise<{
  errors: string[], tries: Map<string, number>, handled: string[], dropped: string[], waiters: Waiters
}> {
  const reader = new Redis(REDIS_URL, { ...redisOptions(), connectionName: 'durable-ingress-test' })
  reader.on('error', () => {})
  await reader.connect()
  const errors: string[] = []
  const ingress = new DurableIngress(reader, key, 'holder', { isLeader: true }, { info: () => {}, warn: () => {}, error: (_obj, msg) => errors.push(msg) })
  t.teardown(async () => await ingress.stop())
  const tries = new Map<string, number>()
  const handled: string[] = []
  const dropped: string[] = []
  const waiters = new Waiters()
  ingress.onDropped((entryId) => dropped.push(entryId))
  ingress.onMessage(async (payload) => {
    const name = payload ?? ''
    const tried = (tries.get(name) ?? 0) + 1
    tries.set(name, tried)
    await handle(name, tried)
    handled.push(name)
    waiters.wake()
  })
  return { errors, tries, handled, dropped, waiters }
}

t.test('an entry whose handling keeps failing for a reason of its own is set aside after 5 tries (to <key>:dead) and the ones behind it flow; one Redis refuses (OOM) is retried until it goes', async (t) => {
  if (!(await needRedis(t))) return
  const redis = redisClient(t)
  const key = `${uniquePrefix('durpoison')}ingress`
  const { errors, tries, handled, dropped, waiters } = await holdIngress(t, key, async (name, tried) => {
    if (name === 'poison') throw new RangeError('Maximum call stack size exceeded')
    if (name === 'oom' && tried <= 7) throw new ReplyError('OOM command not allowed when used memory > \'maxmemory\'.')
  })
  const poison = await redis.xadd(key, '*', 'payload', 'poison')
  await redis.xadd(key, '*', 'payload', 'oom')
  await redis.xadd(key, '*', 'payload', 'after')
  await waiters.until(() => handled.includes('after'), { timeoutMs: 20_000, what: 'the entry behind the failing ones', describe: () => JSON.stringify([...tries]) })
  t.same(handled, ['oom', 'after'], 'the others, in order')
  t.equal(tries.get('poison'), 5, 'the failing entry was tried 5 times')
  t.equal(tries.get('oom'), 8, 'the one Redis refused, until it was handled')
  t.same(dropped, [poison], 'only the failing entry was set aside')
  t.same(errors, ['durable ingress entry set aside: its handling kept failing'], 'and logged as an error')
  t.equal(await redis.xlen(key), 0, 'every entry deleted from the ingress')
  const dead = await redis.xrange(`${key}:dead`, '-', '+') as Array<[string, string[]]>
  t.equal(dead.length, 1, 'the failing entry waits in the dead-letter stream')
  t.same(dead[0][1].slice(0, 4), ['payload', 'poison', 'entry', poison], 'with its fields and its id')
  t.match(dead[0][1].slice(4), ['error', /^RangeError: Maximum call stack size exceeded/], 'and the error')
  await redis.del(`${key}:dead`)
})

t.test('an entry whose publish meets a key of the wrong type is set aside after 5 tries and the ones behind it flow; the same error right after one set aside is waited out', async (t) => {
  if (!(await needRedis(t))) return
  const redis = redisClient(t)
  const prefix = uniquePrefix('durwrongtype')
  const key = `${prefix}ingress`
  // What an operator's stray write can leave where the gateway keeps a sorted set.
  const clobbered = `${prefix}h:topic:clobbered`
  await redis.set(clobbered, 'not a sorted set')
  t.teardown(async () => await redis.del(clobbered, `${key}:dead`))
  const { errors, tries, handled, dropped, waiters } = await holdIngress(t, key, async (name, tried) => {
    if (!name.startsWith('wrongtype')) return
    // The operator repairs the key while the third one waits.
    if (name === 'wrongtype-3' && tried === 8) await redis.del(clobbered)
    await redis.zadd(clobbered, 1, name)
  })
  const first = await redis.xadd(key, '*', 'payload', 'wrongtype-1')
  await redis.xadd(key, '*', 'payload', 'after-1')
  const second = await redis.xadd(key, '*', 'payload', 'wrongtype-2')
  await redis.xadd(key, '*', 'payload', 'wrongtype-3')
  await redis.xadd(key, '*', 'payload', 'after-2')
  await waiters.until(() => handled.includes('after-2'), { timeoutMs: 40_000, what: 'the last entry', describe: () => JSON.stringify([...tries]) })
  t.same(handled, ['after-1', 'wrongtype-3', 'after-2'], 'the others, in order')
  t.equal(tries.get('wrongtype-1'), 5, 'the first was tried 5 times')
  t.equal(tries.get('wrongtype-2'), 5, 'so was the second: an entry went through between them')
  t.equal(tries.get('wrongtype-3'), 8, 'the third, right after the second was set aside for the same error, until the key was repaired')
  t.same(dropped, [first, second], 'only the first two were set aside')
  t.same(errors, ['durable ingress entry set aside: its handling kept failing', 'durable ingress entry set aside: its handling kept failing'])
  const dead = await redis.xrange(`${key}:dead`, '-', '+') as Array<[string, string[]]>
  t.same(dead.map(([, fields]) => fields.slice(0, 4)), [['payload', 'wrongtype-1', 'entry', first], ['payload', 'wrongtype-2', 'entry', second]], 'both wait in the dead-letter stream')
  t.match(dead[0][1].slice(4), ['error', /^ReplyError: WRONGTYPE/], 'with Redis\'s error')
  t.equal(await redis.xlen(key), 0, 'every entry deleted from the ingress')
})
