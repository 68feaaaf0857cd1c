/**
 * Redis out of every instance's reach for longer than INSTANCE_TTL_MS: every
 * instance's beats stop alike. The first instance back must not take the
 * others for dead (and announce their users offline, then online again)
 * before they have had the time to come back themselves.
 */
import { setTimeout as delay } from 'node:timers/promises'
import t from 'tap'
import { eventually, request, startGateway } from './helpers'
import { connect, dataOf, namesOf, settle, setMembers } from './helpers/channels'
import { FaultyProxy } from './helpers/proxy'
import { needRedis, startOwnRedis, uniquePrefix } from './helpers/redis'

// B's way back (1 s, ioredis's backoff up to 2 s, then up to a third of this until its next beat) stays well inside it.
const INSTANCE_TTL_MS = 8000

t.test('after an outage of every instance longer than INSTANCE_TTL_MS, the one back first does not reap the other, back a second later: no user:offline, no second user:online', async (t) => {
  if (!(await needRedis(t))) return
  const redis = await startOwnRedis(t)
  const port = Number(new URL(redis.url).port)
  const [proxyA, proxyB] = [await FaultyProxy.start(t, port), await FaultyProxy.start(t, port)]
  const env = { REDIS_PREFIX: uniquePrefix('outage'), INSTANCE_TTL_MS: String(INSTANCE_TTL_MS), PRESENCE_GRACE_MS: '0' }
  const a = await startGateway(t, { ...env, REDIS_URL: proxyA.url })
  const b = await startGateway(t, { ...env, REDIS_URL: proxyB.url })
  await setMembers(a, 'c1', ['u1', 'u2'])
  const u1 = await connect(t, a, 'u1')
  const u2 = await connect(t, b, 'u2')
  t.same(dataOf(await u1.stream.nextEvent('user:online')), { userId: 'u2' })

  const ready = async (url: string): Promise<number> => (await request(`${url}/ready`)).status
  proxyA.cutOff()
  proxyB.cutOff()
  await eventually(async () => await ready(a.url) === 503 && await ready(b.url) === 503, 'both instances see Redis gone', 10_000, 50)
  // Longer than INSTANCE_TTL_MS: every instance's last beat is older than that once Redis is back.
  await delay(INSTANCE_TTL_MS + 500)
  proxyA.restore()
  await eventually(async () => await ready(a.url) === 200, 'A back', 10_000, 50)
  // B comes back a second after A: A, which has the lease to itself, must not take B for dead meanwhile.
  await delay(1000)
  proxyB.restore()
  await eventually(async () => await ready(b.url) === 200, 'B back', 10_000, 50)
  // Past the time A waits before it judges silence, with B beating again.
  await delay(INSTANCE_TTL_MS + 1000)

  t.same(namesOf(await settle(a, u1.stream, u1.connectionId)), [], 'u1 heard neither user:offline nor user:online for u2')
  t.same(namesOf(await settle(b, u2.stream, u2.connectionId)), [], 'nor did u2 for u1')
})
