/**
 * Redis mode under network faults between a gateway and Redis, made with a
 * proxy the test controls (test/helpers/proxy.ts): replies held back, then
 * every connection cut.
 */
import t from 'tap'
import { eventually, openConnected, publish, publishOk, publisherToken, request, startGateway, userToken } from './helpers'
import { FaultyProxy } from './helpers/proxy'
import { needRedis, REDIS_URL, uniquePrefix } from './helpers/redis'

const publisher = publisherToken()
const redisPort = Number(new URL(REDIS_URL).port || 6379)

t.test('a publish whose reply is lost when the connection drops is not run again: the event goes out once, and the publisher hears it may not have', async (t) => {
  if (!(await needRedis(t))) return
  const prefix = uniquePrefix('resend')
  const proxy = await FaultyProxy.start(t, redisPort)
  const viaProxy = await startGateway(t, { REDIS_URL: proxy.url, REDIS_PREFIX: prefix })
  const direct = await startGateway(t, { REDIS_URL, REDIS_PREFIX: prefix })
  const { stream } = await openConnected(`${direct.url}/v1/stream?token=${userToken('u1')}`, { t })

  proxy.holdReplies()
  const answer = publish(viaProxy.url, publisher, { to: { user: 'u1' }, event: 'once', data: 1 }).catch((error: Error) => error)
  await stream.nextEvent('once')
  t.pass('Redis ran the publish; its reply is held back')
  proxy.cut()
  const answered = await answer
  if (answered instanceof Error) throw answered
  t.equal(answered.status, 503, 'the publisher is told the store failed (it cannot know the event went out)')

  await eventually(async () => (await request(`${viaProxy.url}/ready`)).status === 200, 'the gateway back on Redis', 10_000, 50)
  // Sent on the same connection as any re-sent command, so it arrives after it.
  await publishOk(viaProxy.url, publisher, { to: { user: 'u1' }, event: 'marker', data: 2 })
  await stream.nextEvent('marker')
  t.equal(stream.events.filter((event) => event.event === 'once').length, 1, 'the event went out once')
})
