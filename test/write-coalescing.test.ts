/**
 * The core's write path over a real loopback socket: events due on a stream
 * within one turn go out as one write, in order, and runs of frames that lie
 * back to back in the arena are written as views without copying, except to
 * a socket that is already behind.
 */
import t from 'tap'
import type { Test } from 'tap'
import { createServer, connect, type Server, type Socket } from 'node:net'
import { once } from 'node:events'
import { FrameArena } from '../src/core/arena'
import { StreamConnection, WriteScheduler } from '../src/core/connection'
import { channel } from '../src/core/channels'
import { chunkOfText, frameWithId, renderBody } from '../src/core/framing'
import { Hub } from '../src/core/hub'
import { MemoryBus } from '../src/core/memory-bus'
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
  const listener: Server = createServer()
  listener.listen(0, '127.0.0.1')
  await once(listener, 'listening')
  const address = listener.address()
  if (address === null || typeof address === 'string') throw new Error('no address')
  const accepted = once(listener, 'connection') as Promise<[Socket]>
  const client = connect(address.port, '127.0.0.1')
  await once(client, 'connect')
  const [server] = await accepted
  listener.close()
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
  t.teardown(() => {
    client.destroy()
    server.destroy()
  })
  return { server, client, writes, received: () => Buffer.concat(chunks), waiters }
}

function streamOn (pair: Pair, scheduler: WriteScheduler, maxBufferedBytes = 64 * 1024 * 1024, id = 'c1'): StreamConnection {
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
  connection.goLive()
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
  const frames = [
    arena.place(frameWithId(1, 'data: one\n\n')),
    arena.place(frameWithId(2, 'data: two\n\n')),
    chunkOfText(': a comment from elsewhere\n\n'),
    arena.place(frameWithId(3, 'data: three\n\n')),
    arena.place(frameWithId(4, 'data: four\n\n'))
  ]
  connection.deliver(1, frames[0])
  connection.deliver(2, frames[1])
  connection.sendSystem(frames[2])
  connection.deliver(3, frames[3])
  connection.deliver(4, frames[4])
  const expected = Buffer.concat(frames)
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
  const second = arena.place(frameWithId(11, 'data: b\n\n'))
  connection.deliver(10, first)
  connection.deliver(11, second)
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
  connection.deliver(id, first)
  const second = arena.place(frameWithId(++id, 'data: late two\n\n'))
  connection.deliver(id, second)
  connection.flush()
  const late = pair.writes.slice(writesBefore)
  t.equal(late.length, 1, 'one write for both frames')
  t.not(late[0].buffer, first.buffer, 'written from its own copy')
  t.ok(late[0].equals(Buffer.concat([first, second])), 'with the same bytes')
  connection.close('slow')
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

