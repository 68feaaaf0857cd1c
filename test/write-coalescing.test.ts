/**
 * The core's write path over a real loopback socket: events due on a stream
 * within one turn go out as one write, in order, and runs of frames that lie
 * back to back in the arena are written as views without copying, except to
 * a socket that is already behind.
 */
import t from 'tap'
import { setFlagsFromString } from 'node:v8'
import { runInNewContext } from 'node:vm'
import type { Test } from 'tap'
import type { Socket } from 'node:net'
import { FrameArena, slabBytesFor } from '../src/core/arena'
import { StreamConnection, WriteScheduler, type Sink } from '../src/core/connection'
import { channel } from '../src/core/channels'
import { chunkOfText, frameWithId, renderBody } from '../src/core/framing'
import { Hub } from '../src/core/hub'
import { MemoryBus } from '../src/core/memory-bus'
import { loopbackPair } from './helpers/raw'
import { Waiters } from './helpers/wait'

interface Pair {
  /** The gateway's end, wrapped to record what each write hands to the socket. */
  server: Socket
  client: Socket
  writes: Buffer[]
  received: () => Buffer
  waiters: Waiters
}

async function socketPair (t: Test): Promise<Pair> {
  const { server, client } = await loopbackPair(t)
  const writes: Buffer[] = []
  const write = server.write.bind(server) as (chunk: Buffer) => boolean
  server.write = ((chunk: Buffer) => {
    writes.push(chunk)
    return write(chunk)
  }) as typeof server.write
  const chunks: Buffer[] = []
  const waiters = new Waiters()
  client.on('data', (data: Buffer) => {
    chunks.push(data)
    waiters.wake()
  })
  return { server, client, writes, received: () => Buffer.concat(chunks), waiters }
}

function streamOn (pair: Pair, scheduler: WriteScheduler, maxBufferedBytes = 64 * 1024 * 1024, id = 'c1', live = true): StreamConnection {
  const connection = new StreamConnection({
    id,
    userId: 'u1',
    kind: 'stream',
    topics: [],
    sink: pair.server,
    scheduler,
    maxBufferedBytes,
    tokenExpiresAt: null,
    remoteAddress: '127.0.0.1'
  })
  if (live) connection.goLive()
  return connection
}

async function receivedAll (pair: Pair, expected: Buffer): Promise<void> {
  await pair.waiters.until(() => pair.received().length >= expected.length, {
    timeoutMs: 5000,
    what: `${expected.length} bytes`,
    describe: () => `${pair.received().length} bytes so far`
  })
}

t.test('events due in one turn go out in one write, in order, arena runs and other frames interleaved', async (t) => {
  const pair = await socketPair(t)
  const arena = new FrameArena()
  const connection = streamOn(pair, new WriteScheduler())
  const placed = (body: string): [Buffer, number] => [arena.place(frameWithId(1, body)), arena.placement]
  const one = placed('data: one\n\n')
  const two = placed('data: two\n\n')
  const comment = chunkOfText(': a comment from elsewhere\n\n')
  const three = placed('data: three\n\n')
  const four = placed('data: four\n\n')
  connection.deliver(1, ...one)
  connection.deliver(2, ...two)
  connection.sendSystem(comment)
  connection.deliver(3, ...three)
  connection.deliver(4, ...four)
  const expected = Buffer.concat([one[0], two[0], comment, three[0], four[0]])
  await receivedAll(pair, expected)
  t.equal(pair.writes.length, 1, 'one write for five frames')
  t.ok(pair.received().equals(expected), 'the bytes arrive exactly, in order')
  connection.close('shutdown')
})

t.test('a run of arena frames is written as a view of the slab, not a copy', async (t) => {
  const pair = await socketPair(t)
  const arena = new FrameArena()
  const connection = streamOn(pair, new WriteScheduler())
  const first = arena.place(frameWithId(10, 'data: a\n\n'))
  connection.deliver(10, first, arena.placement)
  const second = arena.place(frameWithId(11, 'data: b\n\n'))
  connection.deliver(11, second, arena.placement)
  await receivedAll(pair, Buffer.concat([first, second]))
  t.equal(pair.writes.length, 1)
  t.equal(pair.writes[0].buffer, first.buffer, 'the write shares the arena\'s memory')
  t.equal(pair.writes[0].byteOffset, first.byteOffset)
  t.equal(pair.writes[0].length, first.length + second.length)
  connection.close('shutdown')
})

t.test('a socket that is already behind gets copies, so its queue does not pin more of the arena\'s slabs', async (t) => {
  const pair = await socketPair(t)
  pair.client.pause()
  const arena = new FrameArena()
  const scheduler = new WriteScheduler()
  const connection = streamOn(pair, scheduler)
  // Fill the kernel's buffers until Node has to queue: the client reads nothing.
  const filler = chunkOfText(`data: ${'x'.repeat(60_000)}\n\n`)
  let id = 0
  for (let round = 0; round < 400 && pair.server.writableLength === 0; round++) {
    connection.deliver(++id, filler)
    connection.flush()
  }
  t.ok(pair.server.writableLength > 0, `Node queues for this socket (${pair.server.writableLength} bytes unsent)`)
  const writesBefore = pair.writes.length
  const first = arena.place(frameWithId(++id, 'data: late one\n\n'))
  connection.deliver(id, first, arena.placement)
  const second = arena.place(frameWithId(++id, 'data: late two\n\n'))
  connection.deliver(id, second, arena.placement)
  connection.flush()
  const late = pair.writes.slice(writesBefore)
  t.equal(late.length, 1, 'one write for both frames')
  t.not(late[0].buffer, first.buffer, 'written from its own copy')
  t.ok(late[0].equals(Buffer.concat([first, second])), 'with the same bytes')
  connection.close('slow')
})

t.test('arena placements: consecutive numbers always mean neighbouring bytes, across slabs, big frames and arenas', async (t) => {
  const small = new FrameArena(256)
  const other = new FrameArena(256)
  const placed: Array<{ frame: Buffer, placement: number }> = []
  const slabsSeen = new Set<ArrayBufferLike>()
  for (let index = 0; index < 400; index++) {
    // Sizes that cross slab ends at odd places, a frame too big for a slab now
    // and then, and a second arena numbering in between.
    const arena = index % 7 === 3 ? other : small
    const size = index % 23 === 11 ? 200 : 5 + (index * 37) % 50
    const frame = arena.place(chunkOfText('x'.repeat(size)))
    placed.push({ frame, placement: arena.placement })
    slabsSeen.add(frame.buffer)
  }
  t.ok(slabsSeen.size > 20, `the frames span many slabs (${slabsSeen.size})`)
  const numbers = new Map(placed.map((entry) => [entry.placement, entry.frame]))
  t.equal(numbers.size, placed.length, 'every placement has its own number')
  let neighbours = 0
  for (const { frame, placement } of placed) {
    const next = numbers.get(placement + 1)
    if (next === undefined) continue
    neighbours++
    t.equal(next.buffer, frame.buffer, `${placement + 1} is in the slab of ${placement}`)
    t.equal(next.byteOffset, frame.byteOffset + frame.length, `${placement + 1} starts where ${placement} ends`)
  }
  t.ok(neighbours > 200, `most frames have a numbered neighbour (${neighbours})`)
})

t.test('frames delivered across slab ends, big frames and system frames arrive exactly, in one write', async (t) => {
  const pair = await socketPair(t)
  const arena = new FrameArena(256)
  const connection = streamOn(pair, new WriteScheduler())
  const expected: Buffer[] = []
  for (let id = 1; id <= 60; id++) {
    const frame = arena.place(frameWithId(id, `data: ${'y'.repeat(id % 13 === 0 ? 120 : id % 40)}\n\n`))
    connection.deliver(id, frame, arena.placement)
    expected.push(frame)
    if (id % 17 === 0) {
      const comment = chunkOfText(`: between ${id}\n\n`)
      connection.sendSystem(comment)
      expected.push(comment)
    }
  }
  const all = Buffer.concat(expected)
  await receivedAll(pair, all)
  t.equal(pair.writes.length, 1, 'one write')
  t.ok(pair.received().equals(all), 'every byte in order')
  connection.close('shutdown')
})

t.test('an event to many streams is rendered once: every stream writes the same bytes in memory', async (t) => {
  const bus = new MemoryBus({ historySize: 10, historyTtlS: 60 })
  t.teardown(async () => await bus.close())
  const hub = new Hub(bus)
  const scheduler = new WriteScheduler()
  const pairs = await Promise.all([0, 1, 2].map(async () => await socketPair(t)))
  const connections = pairs.map((pair, index) => streamOn(pair, scheduler, undefined, `c${index}`))
  for (const connection of connections) await hub.join(connection, [channel.topic('news')])
  const [id] = bus.publishNow([{ channels: [channel.topic('news')], body: renderBody('note', 'hello') }])
  const expected = frameWithId(id, renderBody('note', 'hello'))
  for (const pair of pairs) await receivedAll(pair, expected)
  const writes = pairs.map((pair) => pair.writes)
  t.same(writes.map((list) => list.length), [1, 1, 1], 'one write per stream')
  for (const pair of pairs) t.ok(pair.received().equals(expected), 'each stream receives the event exactly')
  const [first] = writes[0]
  for (const [write] of writes.slice(1)) {
    t.equal(write.buffer, first.buffer, 'the same memory')
    t.equal(write.byteOffset, first.byteOffset, 'at the same place')
  }
  for (const connection of connections) connection.close('shutdown')
})


t.test('slabs are a sixteenth of MAX_BUFFERED_BYTES, from 8 KB to 64 KB', async (t) => {
  t.equal(slabBytesFor(1024 * 1024), 64 * 1024, 'the default bound: 64 KB')
  t.equal(slabBytesFor(256 * 1024), 16 * 1024)
  t.equal(slabBytesFor(16 * 1024), 8 * 1024, 'never below Node\'s own pool')
  t.equal(slabBytesFor(1024 * 1024 * 1024), 64 * 1024, 'nor above 64 KB')
})

t.test('with the default bound, a burst of 400 events due on a stream is one view of one slab, not a copy', async (t) => {
  const bus = new MemoryBus({ historySize: 1000, historyTtlS: 60 })
  t.teardown(async () => await bus.close())
  const hub = new Hub(bus, slabBytesFor(1024 * 1024))
  const pair = await socketPair(t)
  const connection = streamOn(pair, new WriteScheduler())
  await hub.join(connection, [channel.topic('burst')])
  const expected: Buffer[] = []
  // About 100 bytes each, as in the fan-out benchmark: 40 KB in all, which
  // 8 KB slabs split into pieces that had to be concatenated.
  for (let seq = 0; seq < 400; seq++) {
    const body = renderBody('bench', JSON.stringify({ t: 1796340779890473 + seq, seq }))
    const [id] = bus.publishNow([{ channels: [channel.topic('burst')], body }])
    expected.push(frameWithId(id, body))
  }
  const all = Buffer.concat(expected)
  await receivedAll(pair, all)
  t.ok(pair.received().equals(all), 'every event, exactly and in order')
  t.equal(pair.writes.length, 1, 'one write')
  t.equal(pair.writes[0].buffer.byteLength, 64 * 1024, 'a view of the arena\'s slab')
  connection.close('shutdown')
})

t.test('a long hold of sparse events does not keep a slab alive per event: the held frames are copied out once they pin twice the bound', async (t) => {
  setFlagsFromString('--expose-gc')
  const gc = runInNewContext('gc') as () => void
  const pair = await socketPair(t)
  // Still in its setup phase (replaying): live events are held.
  const connection = streamOn(pair, new WriteScheduler(), 64 * 1024, 'c-held', false)
  const slabs: Array<WeakRef<ArrayBuffer>> = []
  const expected: Buffer[] = []
  for (let id = 1; id <= 100; id++) {
    // Each event the only one of this stream's in a slab the others filled.
    const frame = frameWithId(id, renderBody('sparse', String(id)))
    const slab = new ArrayBuffer(64 * 1024)
    const view = Buffer.from(slab, 1000, frame.length)
    frame.copy(view)
    slabs.push(new WeakRef(slab))
    expected.push(frame)
    connection.deliver(id, view)
  }
  gc()
  await new Promise((resolve) => setImmediate(resolve))
  gc()
  const alive = slabs.filter((slab) => slab.deref() !== undefined).length
  t.ok(alive <= 3, `${alive} of the 100 slabs still alive (at most twice the bound's worth)`)
  t.notOk(connection.closed, 'the stream is not called slow for it')
  connection.goLive()
  const all = Buffer.concat(expected)
  await receivedAll(pair, all)
  t.ok(pair.received().equals(all), 'every held event, exactly and in order')
  connection.close('shutdown')
})

t.test('streams holding the same sparse events share one copy of each, not one each, and each writes its events exactly', async (t) => {
  setFlagsFromString('--expose-gc')
  const gc = runInNewContext('gc') as () => void
  // Sinks that take everything and keep what they were given.
  const written = new Map<string, Buffer[]>()
  const sink = (id: string): Sink => {
    const chunks: Buffer[] = []
    written.set(id, chunks)
    return { write: (chunk: Buffer) => chunks.push(Buffer.from(chunk)) > 0, end () {}, destroy () {}, resetAndDestroy () {}, writableLength: 0, destroyed: false, on: () => undefined, once: () => undefined, off: () => undefined }
  }
  const scheduler = new WriteScheduler()
  const streams = Array.from({ length: 200 }, (_, index) => new StreamConnection({
    id: `c-shared-${index}`, userId: 'u1', kind: 'stream', topics: [], sink: sink(`c-shared-${index}`), scheduler, maxBufferedBytes: 64 * 1024, tokenExpiresAt: null, remoteAddress: '127.0.0.1'
  }))
  const slabs: Array<WeakRef<ArrayBuffer>> = []
  const expected: Buffer[] = []
  let slab = new ArrayBuffer(64 * 1024)
  for (let id = 1; id <= 100; id++) {
    // Four of these events to a slab, at different places in it, among others' traffic.
    if (id % 4 === 1) {
      slab = new ArrayBuffer(64 * 1024)
      slabs.push(new WeakRef(slab))
    }
    const frame = frameWithId(id, renderBody('sparse', JSON.stringify(String(id).repeat(100).slice(0, 380))))
    const view = Buffer.from(slab, 1000 + (id % 4) * 8000, frame.length)
    frame.copy(view)
    expected.push(frame)
    // One view for every recipient, as the hub hands them out.
    for (const stream of streams) stream.deliver(id, view)
  }
  gc()
  await new Promise((resolve) => setImmediate(resolve))
  gc()
  // The buffers under the streams' held frames, each counted once. (Not
  // process.memoryUsage(): V8 sweeps dead ArrayBuffers on another thread, so
  // slabs already gone may still be counted there.)
  const underHeldFrames = new Set<ArrayBufferLike>()
  for (const stream of streams) for (const entry of stream['held'] ?? []) underHeldFrames.add(entry.frame.buffer)
  const held = [...underHeldFrames].reduce((sum, buffer) => sum + buffer.byteLength, 0)
  const alive = slabs.filter((ref) => ref.deref() !== undefined).length
  t.ok(alive <= 3, `${alive} of the ${slabs.length} slabs still alive`)
  // 100 events of 0.4 KB: 40 KB once, 8 MB if each of the 200 streams had its own.
  t.ok(held < 1024 * 1024, `the streams keep ${(held / 1024).toFixed(0)} KB of buffers`)
  t.ok(streams.every((stream) => !stream.closed), 'none is called slow for it')

  for (const stream of streams) stream.goLive()
  const all = Buffer.concat(expected)
  const bytesOf = (id: string): Buffer => Buffer.concat(written.get(id) ?? [])
  // The scheduler writes them on the next turns: bounded, not a sleep.
  const deadline = Date.now() + 5000
  while (!streams.every((stream) => bytesOf(stream.id).length >= all.length) && Date.now() < deadline) await new Promise((resolve) => setImmediate(resolve))
  t.ok(streams.every((stream) => bytesOf(stream.id).equals(all)), 'every stream wrote every held event, exactly and in order')
  for (const stream of streams) stream.close('shutdown')
})

t.test('more than the bound due in many small pieces (channels interleaved in the arena) to a socket that takes everything: a few grouped writes, every byte in order, not one write per piece', async (t) => {
  const writes: Buffer[] = []
  const sink: Sink = { write: (chunk: Buffer) => writes.push(Buffer.from(chunk)) > 0, end () {}, destroy () {}, resetAndDestroy () {}, writableLength: 0, destroyed: false, on: () => undefined, once: () => undefined, off: () => undefined }
  const connection = new StreamConnection({
    id: 'c-pieces', userId: 'u1', kind: 'stream', topics: [], sink, scheduler: new WriteScheduler(), maxBufferedBytes: 16 * 1024, tokenExpiresAt: null, remoteAddress: '127.0.0.1'
  })
  connection.goLive()
  const arena = new FrameArena()
  const expected: Buffer[] = []
  for (let id = 1; id <= 2000; id++) {
    const frame = arena.place(frameWithId(id, renderBody('a', JSON.stringify(`event ${id}`))))
    connection.deliver(id, frame, arena.placement)
    expected.push(frame)
    // Another channel's event between each two of this stream's: every frame is a piece of its own.
    arena.place(frameWithId(id, renderBody('b', '"elsewhere"')))
  }
  const all = Buffer.concat(expected)
  const deadline = Date.now() + 5000
  while (Buffer.concat(writes).length < all.length && Date.now() < deadline) await new Promise((resolve) => setImmediate(resolve))
  t.ok(Buffer.concat(writes).equals(all), `${all.length} bytes, exactly and in order`)
  t.ok(writes.length <= Math.ceil(all.length / (64 * 1024)) + 1, `${writes.length} writes for 2000 pieces`)
  t.notOk(connection.closed, 'a socket that takes everything is not slow')
  connection.close('shutdown')
})
