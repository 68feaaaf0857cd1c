/**
 * Presence graces in Redis mode outlive the instance that started them: when
 * it stops (SIGTERM drains every stream, so every user on it starts a grace)
 * or dies during a grace, another instance still ends the grace and sends
 * `user:offline`, once; a reconnect within the grace still cancels it
 * wherever it happens, and the ordinary path still sends exactly one.
 * INSTANCE_TTL_MS=3000 makes the ingress lease 1.5 s, checked every 0.5 s.
 */
import { setTimeout as delay } from 'node:timers/promises'
import t, { type Test } from 'tap'
import { eventually, openConnected, publishOk, request, spawnServer, startGateway, TEST_SECRET, userToken, type Gateway, type ServerProcess, type SseClient } from './helpers'
import { connect, dataOf, namesOf, nonce, presence, PUBLISHER, settle, setMembers } from './helpers/channels'
import { needRedis, REDIS_URL, uniquePrefix } from './helpers/redis'
import { openAdmittedAsDrainBegins } from './helpers/drain'

const INSTANCE_TTL_MS = 3000
/** A lease holder that stopped cleanly is replaced within a check; a dead one within its lease and a check. */
const SWEEP_BOUND_MS = INSTANCE_TTL_MS / 2 + 1000
const OFFLINE_TIMEOUT_MS = 10_000

interface Cluster {
  /** Spawns an instance as a child process, so it can be sent a signal. */
  spawn: () => Promise<ServerProcess>
  /** An instance inside the test process. */
  start: () => Promise<Gateway>
}

/** Instances of one cluster (one prefix), with that presence grace. */
function cluster (t: Test, graceMs: number, extraEnv: Record<string, string> = {}): Cluster {
  const env = { REDIS_URL, REDIS_PREFIX: uniquePrefix('presgrace'), INSTANCE_TTL_MS: String(INSTANCE_TTL_MS), PRESENCE_GRACE_MS: String(graceMs), ...extraEnv }
  return {
    spawn: async () => await spawnServer(t, { ...env, JWT_SECRET: TEST_SECRET, HOST: '127.0.0.1', LOG_LEVEL: 'warn' }),
    start: async () => await startGateway(t, env)
  }
}

async function openOn (t: Test, url: string, user: string, lastEventId?: string): Promise<{ stream: SseClient, connectionId: string }> {
  const headers: Record<string, string> = lastEventId !== undefined ? { 'last-event-id': lastEventId } : {}
  const { stream, connected } = await openConnected(`${url}/v1/stream?token=${userToken(user)}`, { t, headers })
  return { stream, connectionId: connected.connectionId }
}

/**
 * A (a child process, started first so it holds the ingress lease) and B (in
 * process) of one cluster; u1 on B and u2 on A share conversation c1, and u1
 * has heard u2 come online.
 */
async function contactsOnTwoInstances (t: Test, graceMs: number, extraEnv: Record<string, string> = {}): Promise<{ a: ServerProcess, b: Gateway, u1: Awaited<ReturnType<typeof connect>>, u2: { stream: SseClient, connectionId: string } }> {
  const { spawn, start } = cluster(t, graceMs, extraEnv)
  const a = await spawn()
  const b = await start()
  await setMembers(b, 'c1', ['u1', 'u2'])
  const u1 = await connect(t, b, 'u1')
  const u2 = await openOn(t, a.url, 'u2')
  t.same(dataOf(await u1.stream.nextEvent('user:online')), { userId: 'u2' })
  return { a, b, u1, u2 }
}

t.test('an instance stopped with SIGTERM: the grace its drain started still ends, with one user:offline', async (t) => {
  if (!(await needRedis(t))) return
  // A holds the ingress lease: B has to take it over to end the grace.
  const { a, b, u1, u2 } = await contactsOnTwoInstances(t, 1000)

  t.ok(a.child.kill('SIGTERM'))
  await u2.stream.nextEvent('shutdown')
  t.same(await a.waitExit(10_000), { code: 0, signal: null }, 'A drained and exited')
  const offline = await u1.stream.nextEvent('user:offline', OFFLINE_TIMEOUT_MS)
  t.same(dataOf(offline), { userId: 'u2' }, 'the other members hear user:offline though A is gone')
  t.same(await presence(b, 'u2'), { userId: 'u2', online: false, connections: 0 }, 'presence agrees')
  // Nothing announces that no second event is coming: past another sweep, the marker shows it.
  await delay(SWEEP_BOUND_MS)
  t.same(namesOf(await settle(b, u1.stream, u1.connectionId)), [], 'exactly one user:offline')
})

t.test('an instance killed with SIGKILL during a grace it started: the grace still ends, with one user:offline', async (t) => {
  if (!(await needRedis(t))) return
  // Long enough that A is dead before its own timer would have fired, on a
  // loaded machine too: the presence check below shows the grace still running.
  const graceMs = 4000
  const { a, b, u1, u2 } = await contactsOnTwoInstances(t, graceMs)

  u2.stream.close()
  await eventually(async () => (await presence(b, 'u2')).connections === 0, 'A to release the stream')
  a.child.kill('SIGKILL')
  await a.waitExit(5000)
  t.same(await presence(b, 'u2'), { userId: 'u2', online: true, connections: 0 }, 'A is dead and the grace runs: online, no stream')

  const offline = await u1.stream.nextEvent('user:offline', OFFLINE_TIMEOUT_MS)
  t.same(dataOf(offline), { userId: 'u2' }, 'the other members hear user:offline though A died')
  t.same(await presence(b, 'u2'), { userId: 'u2', online: false, connections: 0 }, 'presence agrees')
  await delay(SWEEP_BOUND_MS)
  t.same(namesOf(await settle(b, u1.stream, u1.connectionId)), [], 'exactly one user:offline')
})

t.test('a user who reconnects within the grace on another instance after a SIGTERM: no user:offline, then or later', async (t) => {
  if (!(await needRedis(t))) return
  const graceMs = 2000
  const { a, b, u1, u2 } = await contactsOnTwoInstances(t, graceMs)

  t.ok(a.child.kill('SIGTERM'))
  await u2.stream.nextEvent('shutdown')
  await connect(t, b, 'u2')
  const reconnectedAt = Date.now()
  await a.waitExit(10_000)
  t.same(await presence(b, 'u2'), { userId: 'u2', online: true, connections: 1 })
  // The grace would have ended by now, and been swept since.
  await delay(Math.max(0, reconnectedAt + graceMs + SWEEP_BOUND_MS - Date.now()))
  t.same(namesOf(await settle(b, u1.stream, u1.connectionId)), [], 'neither user:offline nor a second user:online')
  t.same(await presence(b, 'u2'), { userId: 'u2', online: true, connections: 1 })
})

t.test('a drain\'s grace runs from the retry it sent: a reconnect later than PRESENCE_GRACE_MS but within RETRY_MS of it passes unseen', async (t) => {
  if (!(await needRedis(t))) return
  const graceMs = 500
  const retryMs = 6000
  const { a, b, u1, u2 } = await contactsOnTwoInstances(t, graceMs, { RETRY_MS: String(retryMs) })

  t.ok(a.child.kill('SIGTERM'))
  await u2.stream.nextEvent('shutdown')
  const closedAt = Date.now()
  t.same(await a.waitExit(10_000), { code: 0, signal: null }, 'A drained and exited')
  // A grace of PRESENCE_GRACE_MS from the close would have ended, and been
  // swept by B, by now; a browser would still be waiting out its retry.
  await delay(Math.max(0, closedAt + graceMs + SWEEP_BOUND_MS - Date.now()))
  t.same(await presence(b, 'u2'), { userId: 'u2', online: true, connections: 0 }, 'still in its grace, no stream')
  await connect(t, b, 'u2')
  t.same(namesOf(await settle(b, u1.stream, u1.connectionId)), [], 'neither user:offline nor user:online')
})

t.test('a stream admitted as the drain begins, then refused: its user:offline follows a user:online, never alone', async (t) => {
  if (!(await needRedis(t))) return
  const { start } = cluster(t, 300)
  const a = await start()
  const b = await start()
  await setMembers(b, 'c1', ['u1', 'u2'])
  const u1 = await connect(t, b, 'u1')
  const { answer: refused, closed } = await openAdmittedAsDrainBegins(t, a, 'u2')
  t.equal(refused.status, 503, 'refused: the instance drains')
  await closed

  const offline = await u1.stream.nextEvent('user:offline', OFFLINE_TIMEOUT_MS)
  t.same(dataOf(offline), { userId: 'u2' })
  const aboutU2 = u1.stream.events.filter((event) => event.event.startsWith('user:') && dataOf(event).userId === 'u2')
  t.same(namesOf(aboutU2), ['user:online', 'user:offline'], 'the members heard it come online before it went offline')
})

t.test('no instance stops: every user whose last stream closed gets exactly one user:offline', async (t) => {
  if (!(await needRedis(t))) return
  const graceMs = 300
  const { start } = cluster(t, graceMs)
  // A holds the lease, so its sweep races both its own timers and B's.
  const a = await start()
  const b = await start()
  const users = ['v0', 'v1', 'v2', 'v3', 'v4', 'v5', 'v6', 'v7']
  await setMembers(a, 'c1', ['watcher', ...users])
  const watcher = await connect(t, b, 'watcher')
  const streams: SseClient[] = []
  for (const [index, user] of users.entries()) streams.push((await connect(t, index % 2 === 0 ? a : b, user)).stream)
  await settle(b, watcher.stream, watcher.connectionId)

  for (const stream of streams) stream.close()
  const heard = new Set<string>()
  while (heard.size < users.length) {
    const offline = await watcher.stream.nextEvent('user:offline', OFFLINE_TIMEOUT_MS)
    const { userId } = dataOf<{ userId: string }>(offline)
    t.notOk(heard.has(userId), `one user:offline for ${userId}`)
    heard.add(userId)
  }
  for (const user of users) t.same(await presence(a, user), { userId: user, online: false, connections: 0 }, `presence(${user}) agrees`)
  await delay(graceMs + SWEEP_BOUND_MS)
  t.same(namesOf(await settle(b, watcher.stream, watcher.connectionId)), [], 'and nothing more, from either path')
})

t.test('a one-instance rolling restart: the new instance ends the graces the old one left, and the event replays', async (t) => {
  if (!(await needRedis(t))) return
  const { spawn } = cluster(t, 300)
  const old = await spawn()
  t.equal((await request(`${old.url}/v1/conversations/c1/members`, { method: 'PUT', token: PUBLISHER, body: { members: ['u1', 'u2'] } })).status, 200)
  const u1 = await openOn(t, old.url, 'u1')
  await openOn(t, old.url, 'u2')
  const online = await u1.stream.nextEvent('user:online')
  t.same(dataOf(online), { userId: 'u2' })

  t.ok(old.child.kill('SIGTERM'))
  await old.waitExit(10_000)
  // Its graces are due while the new one starts: it must not end them before it can announce.
  const next = await spawn()
  const back = await openOn(t, next.url, 'u1', online.id)
  const offline = await back.stream.nextEvent('user:offline', OFFLINE_TIMEOUT_MS)
  t.same(dataOf(offline), { userId: 'u2' })
  const marker = nonce()
  await publishOk(next.url, PUBLISHER, { to: { connection: back.connectionId }, event: 'marker', data: marker })
  await back.stream.next((event) => event.event === 'marker' && event.data === marker)
  t.equal(back.stream.events.filter((event) => event.event === 'user:offline').length, 1, 'once')
})
