/**
 * Embedded mode's history under HISTORY_MAX_BYTES: the oldest events leave
 * every channel that keeps them once the history's estimated memory passes
 * the cap; a cursor that needed them gets `reset`, one that did not replays
 * as before; events trimmed by HISTORY_SIZE or age give their memory back.
 */
import { setFlagsFromString } from 'node:v8'
import { runInNewContext } from 'node:vm'
import t, { type Test } from 'tap'
import { ForgottenMarks, MemoryBus } from '../src/core/memory-bus'
import { renderBody } from '../src/core/framing'
import { eventually, openStream, publishOk, publisherToken, startGateway, userToken } from './helpers'
import { metricValue, scrape } from './helpers/raw'
import { fakePerformanceNow } from './helpers/stream-core'

const KB = 'x'.repeat(1000)

function busWithCap (t: Test, maxHistoryBytes: number, historySize = 1000): MemoryBus {
  const bus = new MemoryBus({ historySize, historyTtlS: 3600, maxHistoryBytes })
  t.teardown(async () => await bus.close())
  return bus
}

function publishMany (bus: MemoryBus, channel: string, count: number): number[] {
  const ids: number[] = []
  for (let n = 0; n < count; n++) ids.push(...bus.publishNow([{ channels: [channel], body: renderBody('e', `${n} ${KB}`) }]))
  return ids
}

t.test('past the cap the oldest events go: the newest are kept, in order, and a cursor below them gets trimmed', async (t) => {
  const bus = busWithCap(t, 64 * 1024)
  const ids = publishMany(bus, 'user:a', 200)
  const kept = (await bus.window(['user:a'])).map((entry) => entry.id)
  t.ok(kept.length > 30 && kept.length < 64, `64 KB holds some dozens of 1 KB events (${kept.length})`)
  t.same(kept, ids.slice(ids.length - kept.length), 'the newest ones')
  t.same(await bus.replay(['user:a'], ids[0]), { reset: 'trimmed', events: [] }, 'a cursor below them: trimmed')
  const from = ids.length - kept.length - 1
  const replayed = await bus.replay(['user:a'], ids[from])
  t.equal(replayed.reset, null, 'a cursor at the last event dropped: no reset')
  t.same(replayed.events.map((entry) => entry.id), kept, 'and every event after it')
})

t.test('a quiet channel loses its old events to another channel\'s traffic; a cursor past them still replays', async (t) => {
  const bus = busWithCap(t, 64 * 1024)
  const [quiet] = bus.publishNow([{ channels: ['user:b'], body: renderBody('e', 'early') }])
  publishMany(bus, 'user:a', 200)
  t.same(await bus.window(['user:b']), [], 'the quiet channel\'s event is gone')
  t.same(await bus.replay(['user:b'], quiet - 1), { reset: 'trimmed', events: [] }, 'a cursor that needed it: trimmed')
  t.same(await bus.replay(['user:b'], quiet), { reset: null, events: [] }, 'a cursor at it: nothing missed')
})

t.test('an event of many channels counts once, with an entry per channel, and leaves them all', async (t) => {
  const bus = busWithCap(t, 64 * 1024)
  const channels = Array.from({ length: 50 }, (_, n) => `user:u${n}`)
  const [shared] = bus.publishNow([{ channels, body: renderBody('e', KB) }])
  const keptIn = async (): Promise<number> => (await Promise.all(channels.map(async (name) => (await bus.window([name])).length))).reduce((sum, count) => sum + count, 0)
  t.equal(await keptIn(), 50, 'kept in each channel')
  publishMany(bus, 'user:a', 100)
  t.equal(await keptIn(), 0, 'gone from every channel')
  for (const name of channels.slice(0, 3)) t.same(await bus.replay([name], shared - 1), { reset: 'trimmed', events: [] })
})

t.test('events trimmed by HISTORY_SIZE give their memory back: they do not push other channels\' events out', async (t) => {
  const bus = busWithCap(t, 64 * 1024, 5)
  const [quiet] = bus.publishNow([{ channels: ['user:b'], body: renderBody('e', 'early') }])
  publishMany(bus, 'user:a', 500)
  t.equal((await bus.window(['user:a'])).length, 5, 'HISTORY_SIZE keeps 5')
  t.same((await bus.window(['user:b'])).map((entry) => entry.id), [quiet], 'the quiet channel keeps its event: 500 KB went through, 5 KB is kept')
})

t.test('HISTORY_MAX_BYTES=0: no cap', async (t) => {
  const bus = busWithCap(t, 0)
  const ids = publishMany(bus, 'user:a', 200)
  t.equal((await bus.window(['user:a'])).length, 200)
  t.equal((await bus.replay(['user:a'], ids[0])).reset, null)
})

t.test('a stream reconnecting with a cursor the cap dropped gets reset, nothing older, then live events', async (t) => {
  const { url } = await startGateway(t, { HISTORY_MAX_BYTES: '65536', MAX_EVENT_BYTES: '16384' })
  const publisher = publisherToken()
  const ids: string[] = []
  for (let n = 0; n < 150; n++) ids.push(...await publishOk(url, publisher, { to: { user: 'u1' }, event: 'e', data: `${n} ${KB}` }))
  const stream = await openStream(`${url}/v1/stream?token=${userToken('u1')}`, { t, headers: { 'last-event-id': ids[0] } })
  t.equal(stream.status, 200)
  const reset = await stream.nextEvent('reset')
  t.match(JSON.parse(reset.data), { reason: 'trimmed' })
  const [live] = await publishOk(url, publisher, { to: { user: 'u1' }, event: 'live', data: 'now' })
  t.equal((await stream.nextEvent('live')).id, live, 'then live events')
  t.equal(stream.events.filter((event) => event.event === 'e').length, 0, 'and nothing older')
  const historyBytes = metricValue(await scrape(url), 'sse_history_bytes')
  t.ok(historyBytes > 32 * 1024 && historyBytes <= 65536, `sse_history_bytes is under the cap (${historyBytes})`)
})

function exposedGc (): () => void {
  setFlagsFromString('--expose-gc')
  return runInNewContext('gc') as () => void
}

t.test('an entry dropped from a channel lets its frame go at once, before the channel\'s list is compacted', async (t) => {
  const gc = exposedGc()
  const bus = busWithCap(t, 0, 1)
  bus.publishNow([{ channels: ['user:a'], body: renderBody('e', KB) }])
  const frameOfFirst = async (): Promise<WeakRef<Buffer>> => new WeakRef((await bus.window(['user:a']))[0].frame)
  const first = await frameOfFirst()
  bus.publishNow([{ channels: ['user:a'], body: renderBody('e', 'second') }])
  // The fan-out's own reference goes on the next turn.
  await new Promise((resolve) => setImmediate(resolve))
  gc()
  t.equal(first.deref(), undefined, 'the first frame was collected: HISTORY_SIZE=1 dropped it')
})

/** The newest event's record in the channel, weakly: no frame of the caller's keeps it. */
async function recordOfNewest (bus: MemoryBus, channel: string): Promise<WeakRef<object>> {
  const entries = await bus.window([channel])
  return new WeakRef((entries[entries.length - 1] as unknown as { stored: object }).stored)
}

t.test('events a busy channel trimmed behind an older one a quiet channel keeps let their records go', async (t) => {
  const gc = exposedGc()
  const bus = busWithCap(t, 0, 5)
  bus.publishNow([{ channels: ['user:quiet'], body: renderBody('e', 'kept for an hour') }])
  const channelLists: Array<WeakRef<string[]>> = []
  const records: Array<WeakRef<object>> = []
  for (let n = 0; n < 3000; n++) {
    const channels = ['user:busy']
    bus.publishNow([{ channels, body: renderBody('e', `${n}`) }])
    if (n < 10) {
      channelLists.push(new WeakRef(channels))
      records.push(await recordOfNewest(bus, 'user:busy'))
    }
  }
  await new Promise((resolve) => setImmediate(resolve))
  gc()
  t.equal(channelLists.filter((ref) => ref.deref() !== undefined).length, 0, 'their channel lists were collected')
  t.equal(records.filter((ref) => ref.deref() !== undefined).length, 0, 'and their records')
  t.equal((await bus.window(['user:quiet'])).length, 1, 'the quiet channel keeps its event')
})

t.test('an event larger than the cap (many lines) is kept until the next publish, not dropped as it is published', async (t) => {
  const bus = busWithCap(t, 64 * 1024)
  const [before] = bus.publishNow([{ channels: ['user:a'], body: renderBody('e', 'small') }])
  // 7 bytes a line as written: 140 KB from 20 000 line breaks.
  const [large] = bus.publishNow([{ channels: ['user:a'], body: renderBody('e', '\n'.repeat(20_000)) }])
  const replayed = await bus.replay(['user:a'], before)
  t.equal(replayed.reset, null, 'a cursor at the event before it: no reset')
  t.same(replayed.events.map((entry) => entry.id), [large], 'the large event is replayed')
  bus.publishNow([{ channels: ['user:a'], body: renderBody('e', 'next') }])
  t.same(await bus.replay(['user:a'], before), { reset: 'trimmed', events: [] }, 'the next publish lets it go')
})

t.test('a frame kept in history does not keep the memory of frames dropped around it', async (t) => {
  const gc = exposedGc()
  const bus = busWithCap(t, 0, 1)
  bus.publishNow([{ channels: ['user:quiet'], body: renderBody('e', 'kept') }])
  bus.publishNow([{ channels: ['user:busy'], body: renderBody('e', 'dropped next') }])
  const dropped = await memoryOfNewest(bus, 'user:busy')
  bus.publishNow([{ channels: ['user:busy'], body: renderBody('e', 'keeps the busy channel') }])
  await new Promise((resolve) => setImmediate(resolve))
  gc()
  t.equal(dropped.deref(), undefined, 'the dropped frame\'s memory was collected while the quiet channel keeps its own')
  t.equal((await bus.window(['user:quiet'])).length, 1)
})

/** The memory under the newest frame of the channel, weakly. */
async function memoryOfNewest (bus: MemoryBus, channel: string): Promise<WeakRef<ArrayBufferLike>> {
  const entries = await bus.window([channel])
  return new WeakRef(entries[entries.length - 1].frame.buffer)
}

/** Events to `count` channels of their own, a thousand channels a publish, as a notification to every user would be. */
function publishToManyChannels (bus: MemoryBus, count: number): number[] {
  const ids: number[] = []
  const body = renderBody('e', '{"n":1}')
  for (let first = 0; first < count; first += 1000) {
    const channels = Array.from({ length: Math.min(1000, count - first) }, (_, n) => `user:m${first + n}`)
    ids.push(...bus.publishNow([{ channels, body }]))
  }
  return ids
}

for (const historySize of [1000, 0]) {
  t.test(`HISTORY_SIZE=${historySize}: the records of channels whose events left count under the cap too, so many channels do not grow the heap past it`, async (t) => {
    const gc = exposedGc()
    gc()
    const before = process.memoryUsage().heapUsed
    const bus = busWithCap(t, 1024 * 1024, historySize)
    publishToManyChannels(bus, 300_000)
    await new Promise((resolve) => setImmediate(resolve))
    gc()
    const grown = process.memoryUsage().heapUsed - before
    // Before records counted, 300 000 channels took 97 MB here with HISTORY_SIZE=1000, 53 MB with 0.
    t.ok(grown < 24 * 1024 * 1024, `the heap grew by ${(grown / 1048576).toFixed(1)} MB`)
    t.ok(bus.historyBytes() <= 1024 * 1024, `the estimate, records included, is under the cap (${bus.historyBytes()})`)
  })
}

/** `count` channel names that hash to one slot of `table`. */
function namesSharingASlot (table: ForgottenMarks, count: number): string[] {
  const bySlot = new Map<number, string[]>()
  for (let n = 0; n < 100_000; n++) {
    const name = `user:t${n}`
    const slot = table.slotOf(name)
    const sharing = bySlot.get(slot) ?? []
    sharing.push(name)
    if (sharing.length === count) return sharing
    bySlot.set(slot, sharing)
  }
  throw new Error(`no ${count} names share a slot`)
}

/** Publishes to new channels, one a publish, until `done` says so. */
async function publishUntil (bus: MemoryBus, done: () => boolean | Promise<boolean>): Promise<void> {
  for (let n = 0; n < 100_000; n++) {
    bus.publishNow([{ channels: [`user:fill${n}`], body: renderBody('e', 'x') }])
    if (await done()) return
  }
  throw new Error('never done')
}

/** Until the cap first lets a record go: with nothing kept but records, the estimate stops growing. */
async function publishUntilARecordGoes (bus: MemoryBus): Promise<void> {
  let before = bus.historyBytes()
  await publishUntil(bus, () => {
    const now = bus.historyBytes()
    const grew = now > before
    before = now
    return !grew
  })
}

t.test('a channel whose record the cap let go: a cursor below its last event gets trimmed, one at it does not', async (t) => {
  const bus = busWithCap(t, 64 * 1024, 0)
  const [before] = bus.publishNow([{ channels: ['user:other'], body: renderBody('e', 'first') }])
  const [own] = bus.publishNow([{ channels: ['user:early'], body: renderBody('e', 'not kept') }])
  // user:other's record goes first, user:early's after it.
  await publishUntilARecordGoes(bus)
  bus.publishNow([{ channels: ['user:fill-next'], body: renderBody('e', 'x') }])
  t.same(await bus.replay(['user:early'], before), { reset: 'trimmed', events: [] }, 'its record gone: a cursor below its event, trimmed')
  t.same(await bus.replay(['user:early'], own), { reset: null, events: [] }, 'a cursor at its last event: nothing missed')
  t.same(await bus.replay(['user:never'], before), { reset: null, events: [] }, 'a channel that never had a record, its slot of marks shared with none let go: no reset')
  t.notOk(await bus.trimmed(['user:never']), 'nor is its window trimmed')
  t.ok(await bus.trimmed(['user:early']), 'the window of the channel let go may have lost events')
  // 20 000 records let go into 1 024 slots of marks: each slot is shared by several (a slot gets fewer than two with odds of 1 in 15 million).
  publishToManyChannels(bus, 20_000)
  t.same(await bus.replay(['user:early'], own), { reset: 'trimmed', events: [] }, 'once records sharing its slot went later, a cursor at its event is below their marks')
  t.same(await bus.replay(['user:never'], before), { reset: 'trimmed', events: [] }, 'and so is one on a channel that never had a record')
})

t.test('a channel whose record the cap let go, published to again: a cursor below what it lost still gets trimmed, and so does its window', async (t) => {
  const bus = busWithCap(t, 64 * 1024)
  const [cursor] = bus.publishNow([{ channels: ['user:other'], body: renderBody('e', 'seen') }])
  bus.publishNow([{ channels: ['user:again'], body: renderBody('e', 'lost') }])
  await publishUntil(bus, async () => (await bus.replay(['user:again'], cursor)).reset !== null)
  // 64 KB holds a few hundred records at most: its record goes too.
  publishToManyChannels(bus, 2000)
  const [later] = bus.publishNow([{ channels: ['user:again'], body: renderBody('e', 'later') }])
  t.same(await bus.replay(['user:again'], cursor), { reset: 'trimmed', events: [] }, 'the event it lost is told, not skipped')
  t.same((await bus.window(['user:again'])).map((entry) => entry.id), [later])
  t.ok(await bus.trimmed(['user:again']), 'its window lacks what it lost')
})

t.test('a channel that never had a record is not told it may have missed events because one let go shares its slot of marks', async (t) => {
  const bus = busWithCap(t, 64 * 1024, 0)
  const [before] = bus.publishNow([{ channels: ['user:other'], body: renderBody('e', 'first') }])
  bus.publishNow([{ channels: ['user:early'], body: renderBody('e', 'not kept') }])
  await publishUntilARecordGoes(bus)
  bus.publishNow([{ channels: ['user:fill-next'], body: renderBody('e', 'x') }])
  t.same(await bus.replay(['user:early'], before), { reset: 'trimmed', events: [] }, 'the channel let go is told')
  // Two records let go into 1 024 slots: about 20 of these names share a slot with one of them.
  const told: string[] = []
  for (let n = 0; n < 10_000; n++) {
    const name = `user:never${n}`
    if ((await bus.replay([name], before)).reset !== null || await bus.trimmed([name])) told.push(name)
  }
  t.same(told, [], 'none of 10 000 channels without a record is told')
})

t.test('the table of marks: a slot answers for the channel whose mark it holds, for every channel once two share it, and for nobody once its mark left the window', async (t) => {
  const table = new ForgottenMarks(64 * 1024)
  const [first, second, third] = namesSharingASlot(table, 3)
  const since = 1000
  t.equal(table.of(first), 0, 'nothing let go yet')
  table.raise(first, 2000, since)
  t.equal(table.of(first), 2000, 'the channel let go gets its mark')
  t.equal(table.of(second), 0, 'another channel in its slot does not')
  table.raise(second, 1500, since)
  t.equal(table.of(first), 2000, 'shared: the highest mark')
  t.equal(table.of(second), 2000, 'for both channels let go')
  t.equal(table.of(third), 2000, 'and for any other, as the slot cannot tell whose marks it holds')
  table.raise(third, 5000, 3000)
  t.equal(table.of(third), 5000, 'a mark older than the window is nobody\'s: the next channel let go there owns the slot')
  t.equal(table.of(first), 0, 'and the others\' drops, out of the window, no longer answer')
  t.equal(table.of(second), 0)
})

t.test('a channel let go whose drop is past the window but inside the second of slack, then another let go into its slot: trimmed() still counts its drop (the slot is shared, not taken over)', async (t) => {
  const bus = new MemoryBus({ historySize: 0, historyTtlS: 1, maxHistoryBytes: 64 * 1024 })
  t.teardown(async () => await bus.close())
  let skew = 0
  fakePerformanceNow(t, (real) => real + skew)
  const table = new ForgottenMarks(64 * 1024)
  const [early, late] = namesSharingASlot(table, 2)
  bus.publishNow([{ channels: [early], body: renderBody('e', 'a') }])
  bus.publishNow([{ channels: [late], body: renderBody('e', 'b') }])
  // early's record goes first (emptied first), late's after it.
  await publishUntil(bus, () => !bus['histories'].has(early))
  t.ok(bus['histories'].has(late), 'early\'s record let go, late\'s kept')
  t.ok(await bus.trimmed([early]), 'early\'s drop counts')
  // late drops another event 0.8 s on, so that its mark is inside the window when it goes.
  skew += 800
  bus.publishNow([{ channels: [late], body: renderBody('e', 'c') }])
  // 1.3 s on, early's drop is past the 1 s window, inside the second of slack
  // that a reopen which read its window 0.5 s earlier relies on.
  skew += 500
  await publishUntil(bus, () => !bus['histories'].has(late))
  t.ok(await bus.trimmed([late]), 'late\'s record let go into the same slot')
  t.ok(await bus.trimmed([early]), 'and early\'s drop, inside the slack, still counts: the slot is shared, not taken over by late')
})

t.test('the table of marks is counted under the cap from the start, a thirteenth to a sixth of it', async (t) => {
  t.equal(busWithCap(t, 64 * 1024).historyBytes(), 1024 * 10, '1 024 slots of 10 bytes at the 64 KB minimum')
  t.equal(busWithCap(t, 256 * 1024 * 1024).historyBytes(), 40 * 1024 * 1024, 'at most 40 MB, as at the 256 MB default')
  t.equal(busWithCap(t, 0).historyBytes(), 0, 'no cap, no table')
})

t.test('a drop older than the window no longer marks the window trimmed: what it took would have left by age anyway', async (t) => {
  const bus = new MemoryBus({ historySize: 1000, historyTtlS: 1, maxHistoryBytes: 1024 * 1024 })
  t.teardown(async () => await bus.close())
  const [first] = bus.publishNow([{ channels: ['user:a'], body: renderBody('e', 'dropped by the cap') }])
  // Within the 1 s window, or the reset would say 'expired'.
  await publishUntil(bus, async () => (await bus.replay(['user:a'], first - 1)).reset !== null)
  t.equal((await bus.replay(['user:a'], first - 1)).reset, 'trimmed', 'the cap dropped it inside the window')
  t.ok(await bus.trimmed(['user:a']), 'while the dropped event is inside the window')
  // The channel is kept busy (its record stays) until the drop is older
  // than the 1 s window and the second of slack the check allows.
  let latest = first
  await eventually(() => {
    latest = bus.publishNow([{ channels: ['user:a'], body: renderBody('e', 'keeps it busy') }])[0]
    return latest - first > 2_200_000
  }, 'the drop to leave the window')
  const window = (await bus.window(['user:a'])).map((entry) => entry.id)
  t.equal(window[window.length - 1], latest, 'the window holds what is left')
  t.notOk(await bus.trimmed(['user:a']), 'and lacks nothing it should hold')
})

t.test('a window longer than the clock has run (a clock set early, a window set past the allowed 30 days) does not count an unset mark as a drop', async (t) => {
  const bus = new MemoryBus({ historySize: 1000, historyTtlS: 1e10, maxHistoryBytes: 1024 * 1024 })
  t.teardown(async () => await bus.close())
  bus.publishNow([{ channels: ['user:a'], body: renderBody('e', 'kept') }])
  t.notOk(await bus.trimmed(['user:a', 'user:fresh']), 'neither a channel with events nor one without is trimmed')
})

t.test('without the cap reached, a channel that never had an event replays from any cursor without reset', async (t) => {
  const bus = busWithCap(t, 64 * 1024, 0)
  const [first] = bus.publishNow([{ channels: ['user:other'], body: renderBody('e', 'first') }])
  publishToManyChannels(bus, 100)
  t.same(await bus.replay(['user:never'], first), { reset: null, events: [] })
  t.notOk(await bus.trimmed(['user:never']))
})

t.test('past the cap, the oldest event goes first', async (t) => {
  const bus = busWithCap(t, 64 * 1024)
  const [keptEarly] = bus.publishNow([{ channels: ['user:kept-early'], body: renderBody('e', 'a') }])
  const [keptLate] = bus.publishNow([{ channels: ['user:kept-late'], body: renderBody('e', 'b') }])
  await publishUntil(bus, async () => (await bus.replay(['user:kept-early'], keptEarly - 1)).reset !== null)
  t.same(await bus.replay(['user:kept-early'], keptEarly - 1), { reset: 'trimmed', events: [] }, 'the oldest event went')
  t.same(await bus.replay(['user:kept-early'], keptEarly), { reset: null, events: [] }, 'a cursor at it missed nothing')
  const late = await bus.replay(['user:kept-late'], keptEarly)
  t.equal(late.reset, null, 'the next one is kept')
  t.same(late.events.map((entry) => entry.id), [keptLate])
})
