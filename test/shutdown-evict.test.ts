/**
 * An open at the per-user limit with CONNECTION_LIMIT_POLICY=evict-oldest, in
 * Redis mode, whose oldest stream is on another instance: the open asks the
 * other instances to evict it and waits for their answers (up to 3 s). A
 * drain that begins during that wait must still refuse the open (503, its
 * slot given back), or the stream would register after the drain ended every
 * stream: no `shutdown` for it, and the close held until its connections are cut.
 */
import t from 'tap'
import { forEachMode, openConnected, openStream, startCluster, userToken } from './helpers'
import { redisClient } from './helpers/redis'
import { within } from './helpers/wait'
import { beginDrain, gate } from './helpers/drain'

forEachMode(t, 'a stream waiting on the evict-oldest control message when the drain begins is refused with 503, not opened, and holds no slot', async (t) => {
  const [holder, draining] = await startCluster(t, 'redis', 2, { MAX_CONNECTIONS_PER_USER: '1', CONNECTION_LIMIT_POLICY: 'evict-oldest' })
  const { connected: oldest } = await openConnected(`${holder.url}/v1/stream?token=${userToken('late')}`, { t })

  const control = gate(draining.app.state, 'broadcastControl')
  // A reset would reject: kept as a value, so the test fails on it, not the process.
  const opening = openStream(`${draining.url}/v1/stream?token=${userToken('late')}`, { t }).catch((error: Error) => error)
  const [message] = await within(control.entered, 5000, 'the open to ask the other instances to evict the oldest stream')
  t.match(message, { type: 'evict', connectionId: oldest.connectionId }, 'the open waits on the eviction of the user\'s oldest stream, on the other instance')
  const { closed } = await beginDrain(t, draining.app)
  control.open()

  const stream = await opening
  if (stream instanceof Error) throw new Error(`the open was not answered: ${stream.message}`)
  t.equal(stream.status, 503, 'answered 503')
  t.match(stream.headers['retry-after'], /^\d+$/, 'with Retry-After')
  // (A stream that opened instead has an SSE body, not JSON.)
  t.match(stream.status === 503 ? stream.json() : stream.text, { statusCode: 503, error: 'Service Unavailable', message: /shutting down/ })
  t.notMatch(stream.text, /event: (connected|shutdown)/, 'no stream was opened')
  t.equal(stream.headers.connection, 'close', 'the answer ends its connection')
  t.equal(draining.app.registry.size, 0, 'nothing registered on the draining instance')
  await within(closed, 10_000, 'the close to finish')

  // The admission it was granted is given back before the answer: the user
  // holds no stream of the draining instance in the per-user set that limits
  // and presence read.
  const members = await redisClient(t).zrange(`${draining.app.config.redisPrefix}uc:late`, 0, -1)
  t.same(members.filter((member) => member.startsWith(`${draining.app.registry.instanceId}|`)), [], 'the user holds no stream of the draining instance in Redis')
}, ['redis'])
