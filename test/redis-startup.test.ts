/**
 * Start-up in Redis mode when Redis is not there yet (compose and pods start
 * both at once): the gateway keeps trying until REDIS_STARTUP_TIMEOUT_MS, then
 * serves as soon as Redis answers; past the timeout it exits 1 with one line.
 */
import { createServer, type Server, type Socket } from 'node:net'
import t, { type Test } from 'tap'
import { eventually, freePort, launch, openConnected, publisherToken, publishOk, runServerToExit, spawnServer, TEST_SECRET, userToken } from './helpers'
import { FaultyProxy } from './helpers/proxy'
import { needRedis, OwnRedis, redisClient, REDIS_URL, uniquePrefix } from './helpers/redis'
import { within } from './helpers/wait'
import { loggedAs } from './helpers/gateway'

/** A listener on `port` that drops every connection at once, as a Redis still starting does; counts them. */
async function refusingRedis (port: number): Promise<{ attempts: (count: number) => Promise<void>, close: () => Promise<void> }> {
  let seen = 0
  let onAttempt = (): void => {}
  const server: Server = createServer((socket) => {
    seen++
    socket.destroy()
    onAttempt()
  })
  await new Promise<void>((resolve) => server.listen(port, '127.0.0.1', resolve))
  return {
    attempts: async (count) => {
      if (seen >= count) return
      await new Promise<void>((resolve) => {
        onAttempt = () => { if (seen >= count) resolve() }
        onAttempt()
      })
    },
    close: async () => {
      await new Promise<void>((resolve) => server.close(() => resolve()))
    }
  }
}

/** A Redis of the test's own, not started yet; meanwhile its port drops every connection. */
async function lateRedis (t: Test): Promise<{ redis: OwnRedis, early: Awaited<ReturnType<typeof refusingRedis>> }> {
  const redis = new OwnRedis(await freePort())
  t.teardown(async () => await redis.stop())
  const early = await refusingRedis(redis.port)
  t.teardown(async () => await early.close())
  return { redis, early }
}

t.test('Redis coming up after the gateway: it waits, then serves streams and publishes', async (t) => {
  if (!(await needRedis(t))) return
  const { redis, early } = await lateRedis(t)

  const serving = spawnServer(t, { REDIS_URL: redis.url, REDIS_PREFIX: uniquePrefix('startup'), JWT_SECRET: TEST_SECRET, HOST: '127.0.0.1', LOG_LEVEL: 'warn' })
  serving.catch(() => {})
  // Two connections from each of the gateway's two first clients: it
  // survived its first refusal and tried again.
  await within(early.attempts(4), 15_000, 'the gateway retrying Redis')
  await early.close()
  await redis.start()

  const gateway = await serving
  t.equal(gateway.child.exitCode, null, 'still running')
  const { stream } = await openConnected(`${gateway.url}/v1/stream?topics=news&token=${userToken('u1')}`, { t })
  await publishOk(gateway.url, publisherToken(), { to: { topic: 'news' }, event: 'hello', data: { n: 1 } })
  const event = await stream.nextEvent('hello')
  t.same(JSON.parse(event.data), { n: 1 }, 'a published event reaches the stream')
  t.match(gateway.stdout(), /waiting for redis/, 'the wait is logged')
})

t.test('Redis still absent after REDIS_STARTUP_TIMEOUT_MS: exit 1 with one line naming the setting', async (t) => {
  const port = await freePort()
  const early = await refusingRedis(port)
  t.teardown(async () => await early.close())
  const exit = await runServerToExit(t, { REDIS_URL: `redis://127.0.0.1:${port}`, REDIS_STARTUP_TIMEOUT_MS: '500', JWT_SECRET: TEST_SECRET, PORT: '0', HOST: '127.0.0.1', LOG_LEVEL: 'warn' })
  t.equal(exit.code, 1)
  const lines = exit.stderr.trim().split('\n')
  t.equal(lines.length, 1, 'one line, no stack')
  t.match(lines[0], /REDIS_STARTUP_TIMEOUT_MS/)
})

t.test('a wait longer than Fastify\'s 10 s plugin timeout: the gateway still starts once Redis answers', async (t) => {
  if (!(await needRedis(t))) return
  const { redis, early } = await lateRedis(t)

  const startedAt = Date.now()
  const serving = spawnServer(t, { REDIS_URL: redis.url, REDIS_PREFIX: uniquePrefix('startup'), REDIS_STARTUP_TIMEOUT_MS: '60000', JWT_SECRET: TEST_SECRET, HOST: '127.0.0.1', LOG_LEVEL: 'warn' }, 60_000)
  serving.catch(() => {})
  // Retries come at most 2 s apart: keep refusing until past 11 s.
  for (let count = 2; Date.now() - startedAt < 11_000; count += 2) {
    await within(early.attempts(count), 15_000, 'the gateway retrying Redis')
  }
  await early.close()
  await redis.start()
  const gateway = await serving
  t.equal((await fetch(`${gateway.url}/ready`)).status, 200, 'ready')
})

t.test('a Redis that takes the connection and never answers (frozen): the wait is logged all the same, then the first error once it is gone, and SIGTERM still exits 0', async (t) => {
  const port = await freePort()
  const sockets = new Set<Socket>()
  const silent = createServer((socket) => {
    sockets.add(socket)
    socket.on('close', () => sockets.delete(socket))
  })
  await new Promise<void>((resolve) => silent.listen(port, '127.0.0.1', resolve))
  t.teardown(async () => {
    for (const socket of sockets) socket.destroy()
    if (silent.listening) await new Promise<void>((resolve) => silent.close(() => resolve()))
  })
  // Beats every 333 ms: one sent before Redis first answered would be logged within the wait.
  // Commands time out after 1 s: the 'no answer' line, at 2 s, comes after that.
  const server = launch(t, { REDIS_URL: `redis://127.0.0.1:${port}`, REDIS_STARTUP_TIMEOUT_MS: '60000', REDIS_COMMAND_TIMEOUT_MS: '1000', INSTANCE_TTL_MS: '1000', JWT_SECRET: TEST_SECRET, PORT: '0', HOST: '127.0.0.1', LOG_LEVEL: 'warn' }, 0)
  const waits = (): Array<{ connection?: string, reason?: string, waitMs?: number }> => loggedAs(server.stdout(), 'waiting for redis')
  await eventually(() => waits().length > 0, 'the wait to be logged', 15_000)
  const [line] = waits()
  t.equal(line.reason, 'no answer', 'it says why')
  t.ok((line.waitMs ?? 0) > 0, 'and how much longer it waits')

  // The frozen Redis goes: its port refuses from now on.
  for (const socket of sockets) socket.destroy()
  await new Promise<void>((resolve) => silent.close(() => resolve()))
  const of = (connection: string): typeof line[] => waits().filter((wait) => wait.connection === connection)
  for (const connection of ['commands', 'subscriber']) {
    await eventually(() => of(connection).length > 1, `what changed to be logged for the ${connection} connection`, 15_000)
    // (A reset or a refusal, where the kernel gives one first.)
    t.match(of(connection)[1].reason, /^(the connection closed before Redis answered|read ECONNRESET|connect ECONNREFUSED .*)$/, 'in words an operator reads')
    t.equal(of(connection).length, 2, 'said once more, not at every retry')
  }
  t.notMatch(server.stdout(), /heartbeat failed/, 'no beat is sent before Redis has answered')
  server.child.kill('SIGTERM')
  t.same(await server.waitExit(5000), { code: 0, signal: null })
})

t.test('SIGTERM while waiting for Redis: exit 0 at once', async (t) => {
  const port = await freePort()
  const early = await refusingRedis(port)
  t.teardown(async () => await early.close())
  const server = launch(t, { REDIS_URL: `redis://127.0.0.1:${port}`, JWT_SECRET: TEST_SECRET, PORT: '0', HOST: '127.0.0.1', LOG_LEVEL: 'warn' }, 0)
  await within(early.attempts(4), 15_000, 'the gateway retrying Redis')
  server.child.kill('SIGTERM')
  t.same(await server.waitExit(5000), { code: 0, signal: null })
})

t.test('SIGTERM once the start has registered the instance and taken the ingress lease: both are given back, exit 0', async (t) => {
  if (!(await needRedis(t))) return
  const prefix = uniquePrefix('startstop')
  const proxy = await FaultyProxy.start(t, Number(new URL(REDIS_URL).port || 6379))
  // The last connection the start opens never becomes ready: the start waits there.
  proxy.holdReplies('sse-gateway-ingress')
  const server = launch(t, { REDIS_URL: proxy.url, REDIS_PREFIX: prefix, JWT_SECRET: TEST_SECRET, PORT: '0', HOST: '127.0.0.1', LOG_LEVEL: 'warn' }, 0)
  const redis = redisClient(t)
  await eventually(async () => await redis.zcard(`${prefix}instances`) === 1 && await redis.exists(`${prefix}leader`) === 1, 'the instance registered, holding the lease', 15_000, 50)
  server.child.kill('SIGTERM')
  t.same(await server.waitExit(10_000), { code: 0, signal: null })
  t.equal(await redis.zcard(`${prefix}instances`), 0, 'the instance record is gone')
  t.equal(await redis.exists(`${prefix}leader`), 0, 'the lease is free for the other instances')
})

t.test('a second SIGTERM while the stopped start gives back what it set up: exit 1 at once, with a line saying so', async (t) => {
  if (!(await needRedis(t))) return
  const prefix = uniquePrefix('startstop2')
  const proxy = await FaultyProxy.start(t, Number(new URL(REDIS_URL).port || 6379))
  proxy.holdReplies('sse-gateway-ingress')
  const server = launch(t, { REDIS_URL: proxy.url, REDIS_PREFIX: prefix, JWT_SECRET: TEST_SECRET, PORT: '0', HOST: '127.0.0.1', LOG_LEVEL: 'warn', REDIS_COMMAND_TIMEOUT_MS: '30000' }, 0)
  const redis = redisClient(t)
  await eventually(async () => await redis.zcard(`${prefix}instances`) === 1 && await redis.exists(`${prefix}leader`) === 1, 'the instance registered, holding the lease', 15_000, 50)
  // Every reply held: giving the instance record and the lease back waits.
  proxy.holdReplies()
  server.child.kill('SIGTERM')
  // Commands still reach Redis: the give-back has begun, its answer held.
  await eventually(async () => await redis.zcard(`${prefix}instances`) === 0 || await redis.exists(`${prefix}leader`) === 0, 'the start giving back its records', 10_000, 20)
  t.equal(server.child.exitCode, null, 'the first signal waits for Redis')
  server.child.kill('SIGTERM')
  t.same(await server.waitExit(5000), { code: 1, signal: null })
  t.match(server.stderr(), /second stop signal \(SIGTERM\) while starting: exiting at once/)
  await redis.del(`${prefix}instances`, `${prefix}leader`)
})

t.test('a port already taken: exit 1, and the instance record and the lease are given back', async (t) => {
  if (!(await needRedis(t))) return
  const prefix = uniquePrefix('porttaken')
  const taken = createServer()
  await new Promise<void>((resolve) => taken.listen(0, '127.0.0.1', resolve))
  t.teardown(async () => await new Promise<void>((resolve) => taken.close(() => resolve())))
  const address = taken.address()
  const port = typeof address === 'object' && address !== null ? address.port : 0
  const exit = await runServerToExit(t, { REDIS_URL, REDIS_PREFIX: prefix, JWT_SECRET: TEST_SECRET, PORT: String(port), HOST: '127.0.0.1', LOG_LEVEL: 'warn' })
  t.equal(exit.code, 1)
  t.match(exit.stderr, new RegExp(`cannot listen on HOST=127\\.0\\.0\\.1 PORT=${port}: .*EADDRINUSE`), 'the message names the variables')
  const redis = redisClient(t)
  t.equal(await redis.zcard(`${prefix}instances`), 0, 'no instance record left')
  t.equal(await redis.exists(`${prefix}leader`), 0, 'no lease left')
})

t.test('a HOST that names no address of this machine: exit 1 with one line naming HOST', async (t) => {
  const exit = await runServerToExit(t, { JWT_SECRET: TEST_SECRET, PORT: '0', HOST: 'no-such-host.invalid', LOG_LEVEL: 'warn', REDIS_URL: '' })
  t.equal(exit.code, 1)
  t.match(exit.stderr, /^gateway failed to start: cannot listen on HOST=no-such-host\.invalid PORT=0: .*ENOTFOUND/)
  t.equal(exit.stderr.trim().split('\n').length, 1, 'one line')
})

t.test('through sentinels that do not answer, REDIS_STARTUP_TIMEOUT_MS=0 gives up at the first refusal too: exit 1 naming the setting', async (t) => {
  const port = await freePort()
  // Nothing listens there: every sentinel refuses.
  const exit = await runServerToExit(t, { REDIS_URL: 'redis://mymaster', REDIS_SENTINELS: `127.0.0.1:${port}`, REDIS_STARTUP_TIMEOUT_MS: '0', JWT_SECRET: TEST_SECRET, PORT: '0', HOST: '127.0.0.1', LOG_LEVEL: 'warn' }, 8000)
  t.equal(exit.code, 1)
  t.match(exit.stderr, /REDIS_STARTUP_TIMEOUT_MS/)
})

t.test('a REDIS_URL database this Redis does not have: exit 1 with one line naming REDIS_URL, no key written to database 0', async (t) => {
  if (!(await needRedis(t))) return
  const prefix = uniquePrefix('nodb')
  const url = new URL(REDIS_URL)
  url.pathname = '/9999'
  const exit = await runServerToExit(t, { REDIS_URL: url.toString(), REDIS_PREFIX: prefix, REDIS_STARTUP_TIMEOUT_MS: '5000', JWT_SECRET: TEST_SECRET, PORT: '0', HOST: '127.0.0.1', LOG_LEVEL: 'warn' })
  t.equal(exit.code, 1)
  const lines = exit.stderr.trim().split('\n')
  t.equal(lines.length, 1, 'one line, no stack')
  t.match(lines[0], /REDIS_URL.*DB index/)
  t.same(await redisClient(t).keys(`${prefix}*`), [], 'nothing of it in database 0')
})

t.test('a REDIS_URL database its ACL user may not SELECT: exit 1 with one line naming REDIS_URL, no key written to database 0', async (t) => {
  if (!(await needRedis(t))) return
  const prefix = uniquePrefix('noselect')
  const admin = redisClient(t)
  const user = `${prefix.replace(/[^a-z0-9]/gi, '')}-user`
  await admin.call('ACL', 'SETUSER', user, 'on', '>test-password', '~*', '&*', '+@all', '-select')
  t.teardown(async () => { await admin.call('ACL', 'DELUSER', user) })
  const url = new URL(REDIS_URL)
  url.username = user
  url.password = 'test-password'
  url.pathname = '/3'
  const exit = await runServerToExit(t, { REDIS_URL: url.toString(), REDIS_PREFIX: prefix, REDIS_STARTUP_TIMEOUT_MS: '5000', JWT_SECRET: TEST_SECRET, PORT: '0', HOST: '127.0.0.1', LOG_LEVEL: 'warn' })
  t.equal(exit.code, 1)
  const lines = exit.stderr.trim().split('\n')
  t.equal(lines.length, 1, 'one line, no stack')
  t.match(lines[0], /REDIS_URL.*NOPERM/)
  t.notMatch(lines[0], /test-password/, 'the password is not echoed')
  t.same(await admin.keys(`${prefix}*`), [], 'nothing of it in database 0')
})

t.test('a REDIS_URL password Redis refuses: exit 1 at once with one line naming REDIS_URL, not after REDIS_STARTUP_TIMEOUT_MS', async (t) => {
  if (!(await needRedis(t))) return
  const prefix = uniquePrefix('wrongpass')
  const admin = redisClient(t)
  const user = `${prefix.replace(/[^a-z0-9]/gi, '')}-user`
  await admin.call('ACL', 'SETUSER', user, 'on', '>right-password', '~*', '&*', '+@all')
  t.teardown(async () => { await admin.call('ACL', 'DELUSER', user) })
  const url = new URL(REDIS_URL)
  url.username = user
  url.password = 'wrong-password'
  const exit = await runServerToExit(t, { REDIS_URL: url.toString(), REDIS_PREFIX: prefix, REDIS_STARTUP_TIMEOUT_MS: '20000', JWT_SECRET: TEST_SECRET, PORT: '0', HOST: '127.0.0.1', LOG_LEVEL: 'warn' })
  t.equal(exit.code, 1)
  const lines = exit.stderr.trim().split('\n')
  t.equal(lines.length, 1, 'one line, no stack')
  t.match(lines[0], /REDIS_URL: Redis refused its credentials \(WRONGPASS/)
  t.notMatch(lines[0], /REDIS_STARTUP_TIMEOUT_MS/, 'not given up on as a Redis that never answered')
  t.notMatch(lines[0], /wrong-password|right-password/, 'no password echoed')
})
