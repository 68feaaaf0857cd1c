/**
 * While Redis is down, the log says so once per connection and then once a
 * minute, not at every reconnect attempt of every connection (a line or two
 * a second for as long as the outage lasts); its end says how long it lasted
 * and how many attempts were not logged. So with a frozen Redis, whose
 * commands time out instead.
 */
import { createServer, type Socket } from 'node:net'
import t from 'tap'
import { eventually, loggedAs, openConnected, publish, publisherToken, startGateway, userToken } from './helpers'
import { needRedis, startOwnRedis, uniquePrefix } from './helpers/redis'

interface Line { msg: string, connection?: string, heldBack?: number, lastedMs?: number }

t.test('Redis gone: each connection\'s failure is logged once, however many reconnect attempts fail', async (t) => {
  if (!(await needRedis(t))) return
  const redis = await startOwnRedis(t)
  const gateway = await startGateway(t, { REDIS_URL: redis.url, REDIS_PREFIX: uniquePrefix('outagelog'), INSTANCE_TTL_MS: '1500', LOG_LEVEL: 'warn' }, { captureLogs: true })
  await openConnected(`${gateway.url}/v1/stream?token=${userToken('u1')}`, { t })
  await redis.stop()
  // In Redis's place, a listener that resets every connection: each reconnect attempt fails, and is counted.
  let attempts = 0
  const sockets = new Set<Socket>()
  const stand = createServer((socket) => {
    attempts++
    sockets.add(socket)
    socket.on('close', () => sockets.delete(socket))
    socket.resetAndDestroy()
  })
  await new Promise<void>((resolve, reject) => {
    stand.once('error', reject)
    stand.listen(redis.port, '127.0.0.1', resolve)
  })
  const closeStand = async (): Promise<void> => {
    if (!stand.listening) return
    for (const socket of sockets) socket.destroy()
    await new Promise((resolve) => stand.close(resolve))
  }
  t.teardown(closeStand)
  await eventually(() => attempts >= 15, '15 reconnect attempts refused', 20_000, 50)

  const errors = loggedAs<Line>(gateway.logText(), 'redis error')
  t.ok(errors.length >= 1, `the failure is logged (${errors.length} lines)`)
  const byConnection = new Map<string, number>()
  for (const line of errors) byConnection.set(String(line.connection), (byConnection.get(String(line.connection)) ?? 0) + 1)
  for (const [connection, count] of byConnection) t.equal(count, 1, `once for the ${connection} connection, after ${attempts} attempts in all`)
  t.ok(loggedAs<Line>(gateway.logText(), 'heartbeat failed').length <= 1, 'a failed beat once at most')

  // Redis back: each connection that logged its failure says it is over, with
  // the attempts not logged, at the warning's level.
  await closeStand()
  await redis.start()
  await eventually(() => loggedAs<Line>(gateway.logText(), 'redis error: over').length >= byConnection.size, 'an end line for each connection that logged', 20_000, 50)
  const ends = loggedAs<Line>(gateway.logText(), 'redis error: over')
  t.same(ends.map((line) => String(line.connection)).sort(), [...byConnection.keys()].sort(), 'one end line per connection that logged')
  const heldBack = ends.reduce((sum, line) => sum + (line.heldBack ?? 0), 0)
  t.ok(heldBack > 0, `the attempts not logged are counted (${heldBack} held back, ${attempts} refused in all)`)
  t.ok(ends.every((line) => typeof line.lastedMs === 'number' && line.lastedMs > 0), 'with how long the outage lasted')
})

t.test('Redis frozen (its connections up, nothing answered): the ingress lease checks failing several times a second are one warning, and its end counts the rest', async (t) => {
  if (!(await needRedis(t))) return
  const redis = await startOwnRedis(t)
  const gateway = await startGateway(t, { REDIS_URL: redis.url, REDIS_PREFIX: uniquePrefix('frozenlog'), REDIS_COMMAND_TIMEOUT_MS: '300', LOG_LEVEL: 'warn' }, { captureLogs: true })
  // Only what is logged from the freeze on: on a loaded machine a check may
  // have timed out before it (300 ms), which is an outage of its own.
  const atFreeze = gateway.logs.length
  const sinceFreeze = (msg: string): Line[] => loggedAs<Line>(gateway.logs.slice(atFreeze).join('\n'), msg)
  redis.freeze()
  t.teardown(() => redis.thaw())
  // Each refused publish waits out one command timeout, as each lease check does (one every 250 ms).
  for (let n = 0; n < 5; n++) t.equal((await publish(gateway.url, publisherToken(), { to: { user: 'u1' }, data: n })).status, 503, `publish ${n} refused while Redis is frozen`)
  redis.thaw()
  await eventually(() => sinceFreeze('ingress lease check failed: over').length >= 1, 'the end of the failures logged', 10_000, 50)
  t.ok(sinceFreeze('ingress lease check failed').length <= 1, `one warning at most for the failed checks (${sinceFreeze('ingress lease check failed').length})`)
  const ends = sinceFreeze('ingress lease check failed: over')
  t.equal(ends.length, 1, 'one end line')
  t.ok((ends[0]?.heldBack ?? 0) >= 1, `the checks that failed after the warning are counted (${ends[0]?.heldBack ?? 0})`)
})
