/**
 * Evictions that cross a reopen of a live stream id (GET /v1/stream/:id).
 * The reopen's holder stays registered until the reopen registers, and an
 * eviction message can still be in flight when the id is admitted again:
 * such an eviction ends only streams of the id admitted before it was
 * decided. Each race is forced: the real admissions run, and the messages
 * and answers between them are held back until the step they race with.
 */
import t, { type Test } from 'tap'
import {
  eventually, forEachMode, interceptNextAdmission, openConnected, openStream, publishOk, publisherToken, request, startCluster, startGateway, userToken,
  type Gateway, type SseClient
} from './helpers'
import { needRedis, redisClient, REDIS_URL, uniquePrefix } from './helpers/redis'
import type { ControlAnswer, ControlMessage } from '../src/core/state'

const publisher = publisherToken()

function streamUrl (url: string, userId: string): string {
  return `${url}/v1/stream?token=${userToken(userId)}`
}

function reopenUrl (url: string, connectionId: string): string {
  return `${url}/v1/stream/${connectionId}?token=${userToken('u1')}`
}

function registered (gateways: Gateway[]): number {
  return gateways.reduce((sum, gateway) => sum + gateway.app.registry.ofUser('u1').length, 0)
}

/** Holds `gateway`'s eviction messages until `release()`. */
function holdEvictions (t: Test, gateway: Gateway): { release: () => void } {
  const state = gateway.app.state
  const broadcast = state.broadcastControl.bind(state)
  let release = (): void => {}
  const released = new Promise<void>((resolve) => { release = resolve })
  state.broadcastControl = async (message) => {
    if (message.type === 'evict') await released
    return await broadcast(message)
  }
  t.teardown(() => {
    release()
    state.broadcastControl = broadcast
  })
  return { release }
}

/** Runs `after` once the next admission on `gateway` has run in the shared state, before the open goes on. */
function afterNextAdmission (t: Test, gateway: Gateway, after: () => Promise<void>): void {
  interceptNextAdmission(t, gateway, async (admit) => {
    const admission = await admit()
    await after()
    return admission
  })
}

async function assertSurvivor (t: Test, gateways: Gateway[], survivor: SseClient, others: SseClient[]): Promise<void> {
  for (const other of others) await other.waitEnd()
  t.ok(others.every((other) => other.ended), 'the others ended')
  t.notOk(survivor.ended, 'the one admitted last is open')
  t.equal(registered(gateways), 1, 'one stream of the user registered')
  const [id] = await publishOk(gateways[0].url, publisher, { to: { user: 'u1' }, event: 'after', data: 'x' })
  t.equal((await survivor.nextEvent('after')).id, id, 'and it receives')
}

/**
 * A holder of an id on A; B's next open (`openOnB`) is admitted with its
 * eviction messages held back; then a reopen of the id on A is admitted,
 * and B's evictions arrive before it goes on (once the holder has ended).
 */
async function lateEvictionsFromB (t: Test, a: Gateway, b: Gateway, openOnB: (holderId: string) => Promise<SseClient>): Promise<{
  holder: SseClient, holderId: string, fromB: SseClient, reopenedOnA: SseClient
}> {
  const { stream: holder, connected } = await openConnected(streamUrl(a.url, 'u1'), { t })
  const late = holdEvictions(t, b)
  let reopenOnA: Promise<SseClient> | null = null
  afterNextAdmission(t, b, async () => {
    afterNextAdmission(t, a, async () => {
      late.release()
      await holder.waitEnd()
    })
    reopenOnA = openStream(reopenUrl(a.url, connected.connectionId), { t })
  })
  const fromB = await openOnB(connected.connectionId)
  if (reopenOnA === null) throw new Error('B never admitted its open')
  const reopenedOnA: SseClient = await reopenOnA
  return { holder, holderId: connected.connectionId, fromB, reopenedOnA }
}

forEachMode(t, 'evict-oldest, limit 1: a new stream on B evicts the id, a reopen of it on A is admitted after that; B\'s eviction, arriving late, leaves the reopen', async (t) => {
  const [a, b] = await startCluster(t, 'redis', 2, { MAX_CONNECTIONS_PER_USER: '1', CONNECTION_LIMIT_POLICY: 'evict-oldest' })
  const { holder, fromB, reopenedOnA } = await lateEvictionsFromB(t, a, b, async () => await openStream(streamUrl(b.url, 'u1'), { t }))
  t.equal(reopenedOnA.status, 200)
  await assertSurvivor(t, [a, b], reopenedOnA, [holder, fromB])
}, ['redis'])

forEachMode(t, 'a live id reopened on B, then on A: B\'s eviction aimed at A, arriving late, ends the holder and leaves A\'s reopen', async (t) => {
  const [a, b] = await startCluster(t, 'redis', 2)
  const { holder, holderId, fromB, reopenedOnA } = await lateEvictionsFromB(t, a, b, async (id) => await openStream(reopenUrl(b.url, id), { t }))
  t.same([fromB.status, reopenedOnA.status], [200, 200])
  await assertSurvivor(t, [a, b], reopenedOnA, [holder, fromB])
  t.ok(a.app.registry.get(holderId) !== undefined, 'A holds the id')
}, ['redis'])

forEachMode(t, 'evict-oldest, limit 1: two reopens of a live id waiting to register on one instance, then a new stream: both reopens end', async (t, mode) => {
  const gateways = await startCluster(t, mode, mode === 'redis' ? 2 : 1, { MAX_CONNECTIONS_PER_USER: '1', CONNECTION_LIMIT_POLICY: 'evict-oldest' })
  const a = gateways[0]
  const { stream: holder, connected } = await openConnected(streamUrl(a.url, 'u1'), { t })
  let second: SseClient | null = null
  let newcomer: SseClient | null = null
  // The first reopen is admitted; the second is admitted, then a new stream
  // evicts the id, and the second registers (and ends) before the first does.
  afterNextAdmission(t, a, async () => {
    afterNextAdmission(t, a, async () => {
      newcomer = (await openConnected(streamUrl(gateways[gateways.length - 1].url, 'u1'), { t })).stream
    })
    second = await openStream(reopenUrl(a.url, connected.connectionId), { t })
    await second.waitEnd()
  })
  const first = await openStream(reopenUrl(a.url, connected.connectionId), { t })
  if (second === null || newcomer === null) throw new Error('the second reopen or the new stream never opened')
  t.same([first.status, (second as SseClient).status], [200, 200])
  await assertSurvivor(t, gateways, newcomer, [holder, first, second])
})

forEachMode(t, 'a live id reopened on B, then on A: B\'s eviction aimed at A, arriving after A\'s reopen registered, leaves it', async (t) => {
  const [a, b] = await startCluster(t, 'redis', 2)
  const { stream: holder, connected } = await openConnected(streamUrl(a.url, 'u1'), { t })
  const late = holdEvictions(t, b)
  let reopenOnA: Promise<SseClient> | null = null
  afterNextAdmission(t, b, async () => {
    reopenOnA = openStream(reopenUrl(a.url, connected.connectionId), { t })
  })
  const reopenOnB = openStream(reopenUrl(b.url, connected.connectionId), { t })
  await holder.waitEnd()
  if (reopenOnA === null) throw new Error('B never admitted its reopen')
  const reopenedOnA: SseClient = await reopenOnA
  await reopenedOnA.nextEvent('connected')
  late.release()
  t.equal((await reopenOnB).status, 200)
  await assertSurvivor(t, [a, b], reopenedOnA, [holder, await reopenOnB])
}, ['redis'])

forEachMode(t, 'evict-oldest, limit 1: a new stream on A evicts the id that a reopen on B took from A\'s holder (B\'s eviction aimed at A still in flight): B\'s reopen ends, not only A\'s holder', async (t) => {
  const [a, b] = await startCluster(t, 'redis', 2, { MAX_CONNECTIONS_PER_USER: '1', CONNECTION_LIMIT_POLICY: 'evict-oldest' })
  const { stream: holder, connected } = await openConnected(streamUrl(a.url, 'u1'), { t })
  const late = holdEvictions(t, b)
  let admittedOnB = (): void => {}
  const admitted = new Promise<void>((resolve) => { admittedOnB = resolve })
  afterNextAdmission(t, b, async () => admittedOnB())
  const reopenOnB = openStream(reopenUrl(b.url, connected.connectionId), { t })
  await admitted
  // Its admission evicts B's entry of the id: A still registers the holder it replaced.
  const { stream: newcomer } = await openConnected(streamUrl(a.url, 'u1'), { t })
  late.release()
  const reopenedOnB = await reopenOnB
  t.equal(reopenedOnB.status, 200)
  await assertSurvivor(t, [a, b], newcomer, [holder, reopenedOnB])
}, ['redis'])

type ScriptRun = (name: string, args: unknown[]) => Promise<unknown>

/** Runs `gateway`'s Redis scripts through `around` (which calls `run` to send one) until the test ends. */
function aroundScripts (t: Test, gateway: Gateway, around: (name: string, args: unknown[], run: ScriptRun) => Promise<unknown>): void {
  const commands = (gateway.app.state as unknown as { commands: { run: ScriptRun } }).commands
  const run = commands.run.bind(commands)
  commands.run = async (name, args) => await around(name, args, run)
  t.teardown(() => { commands.run = run })
}

/** The cluster's keys deleted, then what each instance does when its connection to Redis is back. */
async function loseRedisData (t: Test, gateways: Gateway[]): Promise<void> {
  const redis = redisClient(t)
  const prefix = (gateways[0].app.state as unknown as { prefix: string }).prefix
  const keys = await redis.keys(`${prefix}*`)
  if (keys.length > 0) await redis.del(...keys)
  for (const gateway of gateways) await (gateway.app.state as unknown as { resync: () => Promise<void> }).resync()
}

forEachMode(t, 'Redis loses its data and the instances record their streams again: a later admission still evicts a stream admitted before the loss', async (t) => {
  const [a, b] = await startCluster(t, 'redis', 2, { MAX_CONNECTIONS_PER_USER: '1', CONNECTION_LIMIT_POLICY: 'evict-oldest' })
  // A cluster that has admitted streams for a while.
  for (let n = 0; n < 3; n++) (await openConnected(streamUrl(b.url, 'warm-up'), { t })).stream.close()
  const { stream: old } = await openConnected(streamUrl(a.url, 'u1'), { t })
  await loseRedisData(t, [a, b])
  const { stream: newcomer } = await openConnected(streamUrl(b.url, 'u1'), { t })
  await assertSurvivor(t, [a, b], newcomer, [old])
}, ['redis'])

forEachMode(t, 'evict-oldest, limit 1: two reopens of a live id on one instance registering out of their admissions\' order: the one admitted last holds the id', async (t, mode) => {
  const gateways = await startCluster(t, mode, mode === 'redis' ? 2 : 1, { MAX_CONNECTIONS_PER_USER: '1', CONNECTION_LIMIT_POLICY: 'evict-oldest' }, { captureLogs: true })
  const a = gateways[0]
  const { stream: holder, connected } = await openConnected(streamUrl(a.url, 'u1'), { t })
  let newcomer: SseClient | null = null
  let second: SseClient | null = null
  // The first reopen is admitted; a new stream evicts the id; the second
  // reopen is admitted (evicting the new stream) and registers; then the
  // first registers.
  afterNextAdmission(t, a, async () => {
    newcomer = (await openConnected(streamUrl(gateways[gateways.length - 1].url, 'u1'), { t })).stream
    second = (await openConnected(reopenUrl(a.url, connected.connectionId), { t })).stream
  })
  const first = await openStream(reopenUrl(a.url, connected.connectionId), { t })
  if (second === null || newcomer === null) throw new Error('the new stream or the second reopen never opened')
  t.equal(first.status, 200)
  await assertSurvivor(t, gateways, second, [holder, first, newcomer])
  // The first was never registered, so it has no 'stream closed' line: this one tells.
  const supersededLine = (): string | undefined => a.logs.find((line) => line.includes('"msg":"stream superseded') && line.includes(connected.connectionId))
  await eventually(() => supersededLine() !== undefined, 'the superseded open logged')
  t.notMatch(supersededLine(), /eyJ/, 'without a token')
})

/** The next `count` admissions on `gateway` each run, then wait for their own gate; `admitted[i]` resolves once the i-th has run. */
function gateAdmissions (t: Test, gateway: Gateway, count: number): { admitted: Array<Promise<void>>, open: Array<() => void> } {
  const state = gateway.app.state
  const admit = state.admit.bind(state)
  const admitted: Array<Promise<void>> = []
  const ran: Array<() => void> = []
  const open: Array<() => void> = []
  const gates: Array<Promise<void>> = []
  for (let n = 0; n < count; n++) {
    admitted.push(new Promise<void>((resolve) => ran.push(resolve)))
    gates.push(new Promise<void>((resolve) => open.push(resolve)))
  }
  let next = 0
  state.admit = async (request) => {
    const index = next++
    if (index + 1 >= count) state.admit = admit
    const admission = await admit(request)
    ran[index]()
    await gates[index]
    return admission
  }
  t.teardown(() => {
    for (const release of open) release()
    state.admit = admit
  })
  return { admitted, open }
}

/** The stream left is counted once, and a new stream under the limit of 1 ends it. */
async function countedAndLimited (t: Test, gateways: Gateway[], survivor: SseClient): Promise<void> {
  t.equal((await gateways[0].app.state.presence('u1')).connections, 1, 'the shared record counts the stream left')
  const { stream: newcomer } = await openConnected(streamUrl(gateways[gateways.length - 1].url, 'u1'), { t })
  await assertSurvivor(t, gateways, newcomer, [survivor])
}

forEachMode(t, 'evict-oldest, limit 1: two reopens of an id admitted on one instance, the first registering and closing before the second registers: the second keeps the id\'s record', async (t, mode) => {
  const gateways = await startCluster(t, mode, mode === 'redis' ? 2 : 1, { MAX_CONNECTIONS_PER_USER: '1', CONNECTION_LIMIT_POLICY: 'evict-oldest' })
  const a = gateways[0]
  const { stream: holder, connected } = await openConnected(streamUrl(a.url, 'u1'), { t })
  const gates = gateAdmissions(t, a, 2)
  const first = openConnected(reopenUrl(a.url, connected.connectionId), { t })
  await gates.admitted[0]
  const second = openConnected(reopenUrl(a.url, connected.connectionId), { t })
  await gates.admitted[1]
  gates.open[0]()
  const { stream: firstStream } = await first
  await holder.waitEnd()
  firstStream.close()
  await eventually(() => a.app.registry.get(connected.connectionId) === undefined, 'the first reopen to close')
  gates.open[1]()
  const { stream: secondStream } = await second
  await countedAndLimited(t, gateways, secondStream)
})

forEachMode(t, 'evict-oldest, limit 1: a reopen evicted as it registers, while a reopen admitted after it waits: the later one keeps the id\'s record', async (t, mode) => {
  const gateways = await startCluster(t, mode, mode === 'redis' ? 2 : 1, { MAX_CONNECTIONS_PER_USER: '1', CONNECTION_LIMIT_POLICY: 'evict-oldest' })
  const a = gateways[0]
  const { stream: holder, connected } = await openConnected(streamUrl(a.url, 'u1'), { t })
  const firstGate = gateAdmissions(t, a, 1)
  const first = openStream(reopenUrl(a.url, connected.connectionId), { t })
  await firstGate.admitted[0]
  // Evicts the id: the first reopen, admitted before, ends as it registers.
  const { stream: newcomer } = await openConnected(streamUrl(gateways[gateways.length - 1].url, 'u1'), { t })
  await holder.waitEnd()
  const secondGate = gateAdmissions(t, a, 1)
  const second = openConnected(reopenUrl(a.url, connected.connectionId), { t })
  await secondGate.admitted[0]
  firstGate.open[0]()
  const firstStream = await first
  await firstStream.waitEnd()
  secondGate.open[0]()
  const { stream: secondStream } = await second
  await newcomer.waitEnd()
  await countedAndLimited(t, gateways, secondStream)
})

forEachMode(t, 'Redis comes back empty with a clock behind the open streams\' admissions: later admissions still come after them', async (t) => {
  const [a, b] = await startCluster(t, 'redis', 2, { MAX_CONNECTIONS_PER_USER: '1', CONNECTION_LIMIT_POLICY: 'evict-oldest' })
  const { stream: old, connected } = await openConnected(streamUrl(a.url, 'u1'), { t })
  // As if admitted under a clock an hour ahead of the one Redis comes back with.
  const stream = a.app.registry.get(connected.connectionId)
  if (stream === undefined) throw new Error('the stream is not registered')
  stream.admissionSeq += 3600 * 1_000_000
  await loseRedisData(t, [a, b])
  const { stream: newcomer } = await openConnected(streamUrl(b.url, 'u1'), { t })
  await assertSurvivor(t, [a, b], newcomer, [old])
}, ['redis'])

forEachMode(t, 'a close not recorded while Redis was unreachable, given back as Redis returns while a reopen of the id is admitted but not registered: the reopen keeps the id\'s entry', async (t) => {
  const [a] = await startCluster(t, 'redis', 1, { MAX_CONNECTIONS_PER_USER: '1', CONNECTION_LIMIT_POLICY: 'evict-oldest' })
  let failed = false
  // The stream's close finds Redis unreachable: it is given back later.
  aroundScripts(t, a, async (name, args, run) => {
    if (name === 'RELEASE' && !failed) {
      failed = true
      throw new Error('Redis unreachable (test)')
    }
    return await run(name, args)
  })
  const { stream: first, connected } = await openConnected(streamUrl(a.url, 'u1'), { t })
  first.close()
  await eventually(() => failed && registered([a]) === 0, 'the close attempted and failed')
  // Redis is back (resync) right after the reopen is admitted, before it registers.
  afterNextAdmission(t, a, async () => {
    await (a.app.state as unknown as { resync: () => Promise<void> }).resync()
  })
  const { stream: reopened } = await openConnected(reopenUrl(a.url, connected.connectionId), { t })
  await countedAndLimited(t, [a], reopened)
}, ['redis'])

/** Redis loses its data while `a`'s next control message (an eviction its open asks for) waits to go out. */
function loseRedisDataOnNextControl (t: Test, a: Gateway, gateways: Gateway[]): void {
  const state = a.app.state
  const broadcast = state.broadcastControl.bind(state)
  state.broadcastControl = async (message) => {
    state.broadcastControl = broadcast
    await loseRedisData(t, gateways)
    return await broadcast(message)
  }
  t.teardown(() => { state.broadcastControl = broadcast })
}

/**
 * `a`'s next open of u1 evicts u1's stream on `b` (limit 1, evict-oldest), and
 * Redis loses its data while the open waits on the eviction message, after
 * its admission and before it registers.
 */
async function openAcrossDataLoss (t: Test, a: Gateway, b: Gateway): Promise<SseClient> {
  const { stream: oldest } = await openConnected(streamUrl(b.url, 'u1'), { t })
  loseRedisDataOnNextControl(t, a, [a, b])
  const { stream: opened } = await openConnected(streamUrl(a.url, 'u1'), { t })
  await oldest.waitEnd()
  t.ok(oldest.ended, 'the oldest stream was evicted')
  return opened
}

forEachMode(t, 'Redis loses its data while an open is admitted but not registered: its entry is written again, so it counts and a later admission evicts it', async (t) => {
  const [a, b] = await startCluster(t, 'redis', 2, { MAX_CONNECTIONS_PER_USER: '1', CONNECTION_LIMIT_POLICY: 'evict-oldest' })
  const opened = await openAcrossDataLoss(t, a, b)
  await eventually(async () => (await a.app.state.presence('u1')).connections === 1, 'the evicted stream given back')
  await countedAndLimited(t, [a, b], opened)
}, ['redis'])

forEachMode(t, 'Redis loses its data while a reopen waits to register, after an eviction of its id decided before its admission reached it: its entry is written again (the eviction was the earlier holder\'s)', async (t) => {
  const [a, b] = await startCluster(t, 'redis', 2, { MAX_CONNECTIONS_PER_USER: '1', CONNECTION_LIMIT_POLICY: 'evict-oldest' })
  const { stream: holder, connected } = await openConnected(streamUrl(b.url, 'u1'), { t })
  // While the reopen on A waits on Redis, an eviction of the id decided earlier reaches A.
  interceptNextAdmission(t, a, async (admit) => {
    await b.app.state.broadcastControl({ type: 'evict', connectionId: connected.connectionId, reason: 'too many streams for this user', instance: a.app.state.instanceId, decidedAt: 1 })
    return await admit()
  })
  // The reopen replaces the holder on B, and Redis loses its data while it tells B so.
  loseRedisDataOnNextControl(t, a, [a, b])
  const { stream: reopened } = await openConnected(reopenUrl(a.url, connected.connectionId), { t })
  await holder.waitEnd()
  await countedAndLimited(t, [a, b], reopened)
}, ['redis'])

forEachMode(t, 'Redis loses its data while an open admitted under a clock ahead of the one Redis comes back with waits to register: later admissions are still ordered after it and evict it', async (t) => {
  const [a, b] = await startCluster(t, 'redis', 2, { MAX_CONNECTIONS_PER_USER: '1', CONNECTION_LIMIT_POLICY: 'evict-oldest' })
  interceptNextAdmission(t, a, async (admit) => {
    const admission = await admit()
    if (!admission.admitted) throw new Error('the open was not admitted')
    return { ...admission, seq: admission.seq + 3600 * 1_000_000 }
  })
  const opened = await openAcrossDataLoss(t, a, b)
  await eventually(async () => (await a.app.state.presence('u1')).connections === 1, 'the evicted stream given back')
  await countedAndLimited(t, [a, b], opened)
}, ['redis'])

forEachMode(t, 'limit 2, reject: an open admitted while the instance records its streams again after Redis came back empty still counts them, and is refused', async (t) => {
  const [a] = await startCluster(t, 'redis', 1, { MAX_CONNECTIONS_PER_USER: '2' })
  for (let n = 0; n < 2; n++) await openConnected(streamUrl(a.url, 'u1'), { t })
  const redis = redisClient(t)
  const prefix = (a.app.state as unknown as { prefix: string }).prefix
  const keys = await redis.keys(`${prefix}*`)
  if (keys.length > 0) await redis.del(...keys)
  // The resync is held before it records the users' streams again, until the open has asked for its admission.
  let askedForAdmission = (): void => {}
  const asked = new Promise<void>((resolve) => { askedForAdmission = resolve })
  aroundScripts(t, a, async (name, args, run) => {
    if (name === 'REJOIN') await asked
    return await run(name, args)
  })
  const resync = (a.app.state as unknown as { resync: () => Promise<void> }).resync()
  interceptNextAdmission(t, a, async (admit) => {
    askedForAdmission()
    return await admit()
  })
  const third = await openStream(streamUrl(a.url, 'u1'), { t })
  await resync
  t.equal(third.status, 429, 'the third stream is refused')
  t.equal((await a.app.state.presence('u1')).connections, 2, 'two streams counted')
}, ['redis'])

forEachMode(t, 'a stream that closes while its instance records its streams again, its close recorded before its user is rejoined: given back again, so its id expires', async (t) => {
  const [a] = await startCluster(t, 'redis', 1)
  const { stream, connected } = await openConnected(streamUrl(a.url, 'u1'), { t })
  let closeRecorded = (): void => {}
  const recorded = new Promise<void>((resolve) => { closeRecorded = resolve })
  let closed = false
  aroundScripts(t, a, async (name, args, run) => {
    if (name === 'REJOIN' && !closed) {
      closed = true
      stream.close()
      await recorded
    }
    const result = await run(name, args)
    if (name === 'RELEASE') closeRecorded()
    return result
  })
  await (a.app.state as unknown as { resync: () => Promise<void> }).resync()
  t.ok(closed, 'the stream closed during the resync')
  const prefix = (a.app.state as unknown as { prefix: string }).prefix
  t.ok(await redisClient(t).ttl(`${prefix}conn:${connected.connectionId}`) > 0, 'its id expires')
  t.equal((await a.app.state.presence('u1')).connections, 0, 'it is not counted')
}, ['redis'])

forEachMode(t, 'a close recorded for an entry of the id left behind on A while a reopen on B holds the id (as a resync racing the reopen leaves it): the id does not expire under the live stream', async (t) => {
  const [a, b] = await startCluster(t, 'redis', 2)
  const { stream: holder, connected } = await openConnected(streamUrl(a.url, 'u1'), { t })
  const { stream: reopened } = await openConnected(reopenUrl(b.url, connected.connectionId), { t })
  await holder.waitEnd()
  await eventually(() => registered([a]) === 0, 'the holder on A gone')
  const redis = redisClient(t)
  const prefix = (a.app.state as unknown as { prefix: string }).prefix
  const id = connected.connectionId
  // A's entry of the id, recorded again after B's reopen replaced it.
  await redis.zadd(`${prefix}uc:u1`, Date.now(), `${a.app.state.instanceId}|${id}`)
  await redis.hset(`${prefix}i:${a.app.state.instanceId}:conns`, id, '{}')
  await redis.persist(`${prefix}conn:${id}`)
  await a.app.state.release(id, 'u1', 60)
  t.equal(await redis.ttl(`${prefix}conn:${id}`), -1, 'the id held by the live stream on B keeps no expiry')
  t.notOk(reopened.ended, 'the stream on B is open')
}, ['redis'])

forEachMode(t, 'a reopen on B takes the id of a stream on A while A records its streams again (between its snapshot and its user\'s rejoin): B keeps the id, with no expiry, and only its stream counts', async (t) => {
  const [a, b] = await startCluster(t, 'redis', 2)
  const { stream: holder, connected } = await openConnected(streamUrl(a.url, 'u1'), { t })
  const id = connected.connectionId
  let holderReleased = (): void => {}
  const released = new Promise<void>((resolve) => { holderReleased = resolve })
  let reopened: SseClient | null = null
  const redis = redisClient(t)
  const prefix = (a.app.state as unknown as { prefix: string }).prefix
  let listedAfterRejoin: string[] = []
  aroundScripts(t, a, async (name, args, run) => {
    const rejoin = name === 'REJOIN' && reopened === null
    if (rejoin) {
      reopened = (await openConnected(reopenUrl(b.url, id), { t })).stream
      await holder.waitEnd()
      await released
    }
    const result = await run(name, args)
    if (name === 'RELEASE' && args[3] === id) holderReleased()
    if (rejoin) listedAfterRejoin = await redis.zrange(`${prefix}uc:u1`, 0, -1)
    return result
  })
  await (a.app.state as unknown as { resync: () => Promise<void> }).resync()
  if (reopened === null) throw new Error('the reopen did not run')
  t.notOk((reopened as SseClient).ended, 'the stream on B is open')
  t.same(listedAfterRejoin, [`${b.app.state.instanceId}|${id}`], 'the rejoin left the id to B')
  t.equal(await redis.ttl(`${prefix}conn:${id}`), -1, 'the id held on B has no expiry')
  t.same(await redis.zrange(`${prefix}uc:u1`, 0, -1), [`${b.app.state.instanceId}|${id}`], 'only B\'s stream listed')
  t.equal((await b.app.state.presence('u1')).connections, 1, 'one stream counted')
}, ['redis'])

forEachMode(t, 'an open that would wait on a resync longer than a control answer may take is refused with 503, and opens once the resync is done', async (t) => {
  const [a] = await startCluster(t, 'redis', 1)
  await openConnected(streamUrl(a.url, 'u1'), { t })
  const state = a.app.state as unknown as { options: { controlTimeoutMs?: number }, resync: () => Promise<void> }
  const timeout = state.options.controlTimeoutMs
  state.options.controlTimeoutMs = 300
  let letRejoin = (): void => {}
  const rejoin = new Promise<void>((resolve) => { letRejoin = resolve })
  let rejoinHeld = (): void => {}
  const held = new Promise<void>((resolve) => { rejoinHeld = resolve })
  aroundScripts(t, a, async (name, args, run) => {
    if (name === 'REJOIN') {
      rejoinHeld()
      await rejoin
    }
    return await run(name, args)
  })
  t.teardown(() => {
    letRejoin()
    state.options.controlTimeoutMs = timeout
  })
  const resync = state.resync()
  await held
  const refused = await openStream(streamUrl(a.url, 'u2'), { t })
  t.equal(refused.status, 503, 'refused while the resync is held')
  t.ok(Number(refused.headers['retry-after']) > 0, 'with Retry-After')
  letRejoin()
  await resync
  const { stream } = await openConnected(streamUrl(a.url, 'u2'), { t })
  t.notOk(stream.ended, 'opens once it is done')
}, ['redis'])

forEachMode(t, 'limit 1, reject: a reopen that waits on the resync while its id\'s stream closes, then is refused, leaves the id to expire', async (t) => {
  const [a, b] = await startCluster(t, 'redis', 2, { MAX_CONNECTIONS_PER_USER: '1' })
  const { stream: first, connected } = await openConnected(streamUrl(a.url, 'u1'), { t })
  const id = connected.connectionId
  let firstReleased = (): void => {}
  const released = new Promise<void>((resolve) => { firstReleased = resolve })
  let reopen: Promise<SseClient> | null = null
  aroundScripts(t, a, async (name, args, run) => {
    if (name === 'REJOIN' && reopen === null) {
      // Between the resync's snapshot and its rejoin: the stream closes, another of the user opens on B, and a reopen of the id asks A for its admission.
      first.close()
      await released
      await openConnected(streamUrl(b.url, 'u1'), { t })
      let asked = (): void => {}
      const askedForAdmission = new Promise<void>((resolve) => { asked = resolve })
      interceptNextAdmission(t, a, async (admit) => {
        asked()
        return await admit()
      })
      reopen = openStream(reopenUrl(a.url, id), { t })
      await askedForAdmission
    }
    const result = await run(name, args)
    if (name === 'RELEASE' && args[3] === id) firstReleased()
    return result
  })
  await (a.app.state as unknown as { resync: () => Promise<void> }).resync()
  if (reopen === null) throw new Error('the reopen did not start')
  t.equal((await (reopen as Promise<SseClient>)).status, 429, 'the reopen is refused')
  const redis = redisClient(t)
  const prefix = (a.app.state as unknown as { prefix: string }).prefix
  await eventually(async () => await redis.ttl(`${prefix}conn:${id}`) > 0, 'the id expires')
  t.pass('the id expires')
}, ['redis'])

/**
 * Two instances, and a stream of `user` on the first (`?topics=tk-own`);
 * `takeOver()` reopens its id on the second and resolves once the first has
 * evicted its stream, the reopen then held (the takeover's window) until
 * `release()`.
 */
async function takeoverHeld (t: Test, name: string, user: string): Promise<{
  a: Gateway
  b: Gateway
  token: string
  id: string
  takeOver: () => Promise<{ reopening: ReturnType<typeof openConnected> }>
  release: () => void
}> {
  const prefix = uniquePrefix(name)
  const a = await startGateway(t, { REDIS_URL, REDIS_PREFIX: prefix })
  const b = await startGateway(t, { REDIS_URL, REDIS_PREFIX: prefix })
  const token = userToken(user)
  const { connected } = await openConnected(`${a.url}/v1/stream?token=${token}&topics=tk-own`, { t })
  const id = connected.connectionId
  const bState = b.app.state as unknown as { broadcastControl: (message: ControlMessage) => Promise<ControlAnswer> }
  const broadcast = bState.broadcastControl.bind(b.app.state)
  let evicted = false
  let release = (): void => {}
  const held = new Promise<void>((resolve) => { release = resolve })
  t.teardown(() => release())
  bState.broadcastControl = async (message) => {
    const answer = await broadcast(message)
    if (message.type === 'evict') {
      evicted = true
      await held
    }
    return answer
  }
  const takeOver = async (): Promise<{ reopening: ReturnType<typeof openConnected> }> => {
    const reopening = openConnected(`${b.url}/v1/stream/${id}?token=${token}&topics=tk-re`, { t })
    await eventually(() => evicted && a.app.registry.get(id) === undefined, 'the stream on a to be evicted')
    return { reopening }
  }
  return { a, b, token, id, takeOver, release }
}

t.test('a per-stream subscription made while a reopen on another instance takes the id over (the old stream evicted, the new one not yet registered) is applied to the new stream, not answered 404', async (t) => {
  if (!(await needRedis(t))) return
  const { a, b, token, id, takeOver, release } = await takeoverHeld(t, 'takeover', 'tk-u1')
  // The reopen on b waits until the change has reached b.
  const bState = b.app.state as unknown as { controlListener: (message: ControlMessage) => Promise<ControlAnswer> }
  const listener = bState.controlListener
  let heard = false
  bState.controlListener = async (message) => {
    if (message.type === 'topics' && message.connectionId === id) heard = true
    return await listener(message)
  }
  const { reopening } = await takeOver()
  const subscribing = request<{ topics: string[] }>(`${a.url}/v1/subscriptions`, { method: 'POST', token, body: { topics: ['tk-new'], connectionId: id } })
  await eventually(() => heard, 'the change to reach b')
  release()
  const { stream } = await reopening
  const answer = await subscribing
  t.equal(answer.status, 200, 'the subscription is answered 200')
  t.same(answer.json.topics, ['tk-re', 'tk-new'], 'with the new stream\'s topics')
  const [eventId] = await publishOk(a.url, publisher, { to: { topic: 'tk-new' }, event: 'tk', data: 1 })
  t.equal((await stream.nextEvent('tk')).id, eventId, 'and the new stream gets the topic\'s events')
})

t.test('a per-stream subscription that waited for a takeover longer than its sender waits is answered 404 and not made', async (t) => {
  if (!(await needRedis(t))) return
  const { a, b, token, id, takeOver, release } = await takeoverHeld(t, 'takeover2', 'tk-u2')
  const { reopening } = await takeOver()
  const answer = await request(`${a.url}/v1/subscriptions`, { method: 'POST', token, body: { topics: ['tk-late'], connectionId: id } })
  t.equal(answer.status, 404, 'answered 404 while the reopen is still held')
  release()
  const { connected: reopened } = await reopening
  t.same(reopened.topics, ['tk-re'], 'the new stream opens without the topic')
  // A change sent after it comes after the late one, had that been made.
  t.equal((await request(`${a.url}/v1/subscriptions`, { method: 'POST', token, body: { topics: ['tk-next'], connectionId: id } })).status, 200)
  t.same(b.app.registry.get(id)?.topics, ['tk-re', 'tk-next'], 'and never gets it')
})
