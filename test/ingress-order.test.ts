/**
 * Redis ingress keeps the order messages were published in: a batch, or a
 * conversation target, needs more round trips before it is published than a
 * single event sent right after it, and must still get the lower ids.
 */
import t from 'tap'
import { eventually, openConnected, publisherToken, request, startGateway, userToken } from './helpers'
import { needRedis, redisClient, REDIS_URL, uniquePrefix } from './helpers/redis'

t.test('messages on <prefix>publish and stream:<id> are delivered in the order they were published', async (t) => {
  if (!(await needRedis(t))) return
  const prefix = uniquePrefix('ingressorder')
  const gateway = await startGateway(t, { REDIS_URL, REDIS_PREFIX: prefix })
  await eventually(async () => gateway.app.ingress?.isLeader === true, 'the ingress lease taken')
  const members = await request(`${gateway.url}/v1/conversations/c1/members`, { method: 'PUT', token: publisherToken(), body: { members: ['u1', 'u2'] } })
  t.equal(members.status, 200, 'conversation c1 holds u1 and u2')
  const { stream, connected } = await openConnected(`${gateway.url}/v1/stream?token=${userToken('u1')}`, { t })
  const connectionId = connected.connectionId

  const redis = redisClient(t)
  const seq = (n: number, to: unknown): string => JSON.stringify({ to, event: 'seq', data: n })
  // One pipeline: Redis hands them to the gateway back to back, in this order.
  await redis.pipeline()
    .publish(`${prefix}publish`, JSON.stringify([1, 2, 3].map((n) => ({ to: { user: 'u1' }, event: 'seq', data: n }))))
    .publish(`${prefix}publish`, seq(4, { user: 'u1' }))
    .publish(`${prefix}publish`, seq(5, { conversation: 'c1' }))
    .publish(`stream:${connectionId}`, JSON.stringify({ event: 'seq', data: 6 }))
    .publish(`${prefix}publish`, seq(7, { users: ['u1', 'u2'] }))
    .publish(`${prefix}publish`, JSON.stringify([8, 9].map((n) => ({ to: { conversation: 'c1' }, event: 'seq', data: n }))))
    .publish(`stream:${connectionId}`, JSON.stringify({ event: 'seq', data: 10 }))
    .exec()

  await stream.next((event) => event.event === 'seq' && stream.events.filter((seen) => seen.event === 'seq').length === 10, 10_000)
  const received = stream.events.filter((event) => event.event === 'seq')
  t.same(received.map((event) => Number(event.data)), [1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 'in the order published')
  const ids = received.map((event) => BigInt(event.id ?? '0'))
  t.ok(ids.every((id, index) => index === 0 || id > ids[index - 1]), 'ids increase in that order')
})
