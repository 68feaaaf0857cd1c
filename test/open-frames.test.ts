/**
 * Every stream answered 200 begins with `retry` and `connected`, which give
 * its client the stream's id, even one ended before its open got to send
 * them: a reopen of its id admitted after it took the id first, or it was
 * evicted (or drained) while its user's topics were read, a Redis round trip
 * in Redis mode. And a keepalive does not take a replay paced by its
 * reader for a slow consumer. On the stream core, with a sink that takes
 * every write.
 */
import t, { type Test } from 'tap'
import { channel } from '../src/core/channels'
import { renderBody } from '../src/core/framing'
import { Hub } from '../src/core/hub'
import { MemoryBus } from '../src/core/memory-bus'
import { Registry } from '../src/core/registry'
import { StreamService, type StreamSpec } from '../src/core/streams'
import { eventually } from './helpers/gateway'
import { HandDrainedSink, noEvents } from './helpers/stream-core'

const HEAD = 'HTTP/1.1 200 OK\r\n\r\n'

function setup (t: Test): { registry: Registry, streams: StreamService } {
  const bus = new MemoryBus({ historySize: 100, historyTtlS: 3600 })
  const registry = new Registry('open-frames')
  const streams = new StreamService(bus, new Hub(bus), registry, { retryMs: 1000, keepaliveMs: 60_000, maxBufferedBytes: 1 << 20, historyTtlS: 3600 }, noEvents)
  t.teardown(async () => {
    streams.stop()
    await bus.close()
  })
  return { registry, streams }
}

function spec (connectionId: string, admissionSeq: number, sink: HandDrainedSink, extra: Partial<StreamSpec> = {}): StreamSpec {
  return {
    connectionId,
    admissionSeq,
    issuedBefore: 0,
    userId: 'u',
    kind: 'stream',
    topics: [],
    channels: [channel.user('u'), channel.connection(connectionId)],
    sink,
    tokenExpiresAt: null,
    allowedTopics: null,
    remoteAddress: '127.0.0.1',
    cursor: null,
    head: Buffer.from(HEAD),
    ...extra
  }
}

function autoSink (): HandDrainedSink {
  const sink = new HandDrainedSink()
  sink.auto = true
  return sink
}

/** The stream's head, then retry, connected (with its id), the closing event, and the end of the body, in that order. */
function checkBegunThenEnded (t: Test, sink: HandDrainedSink, connectionId: string, closing: string): void {
  const text = sink.text()
  t.ok(text.startsWith(HEAD), 'the head first')
  const marks = ['retry: 1000\n', `event: connected\ndata: {"connectionId":"${connectionId}"`, `event: ${closing}\n`, '\r\n0\r\n\r\n'].map((mark) => text.indexOf(mark))
  t.ok(marks.every((at) => at > 0), `retry, connected, ${closing} and the end are all sent: ${JSON.stringify(text)}`)
  t.same([...marks].sort((a, b) => a - b), marks, 'in that order')
}

t.test('an open whose id a reopen admitted after it took first: connected, then evicted', async (t) => {
  const { streams } = setup(t)
  const later = autoSink()
  await streams.open(spec('c1', 2, later))
  const superseded = autoSink()
  await streams.open(spec('c1', 1, superseded))
  checkBegunThenEnded(t, superseded, 'c1', 'evicted')
})

t.test('a stream evicted while its open reads the user\'s topics: connected, then evicted', async (t) => {
  const { registry, streams } = setup(t)
  const sink = autoSink()
  let answerTopics: (topics: string[]) => void = () => {}
  const topicsRead = new Promise<string[]>((resolve) => { answerTopics = resolve })
  const opening = streams.open(spec('c2', 1, sink, { extraTopics: async () => await topicsRead }))
  await new Promise((resolve) => setImmediate(resolve))
  const connection = registry.get('c2')
  if (connection === undefined) throw new Error('c2 is not registered')
  streams.close(connection, 'evicted', 'evicted', { reason: 'too many streams for this user' })
  answerTopics(['news'])
  await opening
  checkBegunThenEnded(t, sink, 'c2', 'evicted')
})

t.test('a keepalive due while a replay waits for its reader to drain: not a slow consumer, even past a small MAX_BUFFERED_BYTES', async (t) => {
  const bus = new MemoryBus({ historySize: 100, historyTtlS: 3600 })
  const registry = new Registry('keepalive-in-replay')
  const streams = new StreamService(bus, new Hub(bus), registry, { retryMs: 1000, keepaliveMs: 60_000, maxBufferedBytes: 1024, historyTtlS: 3600 }, noEvents)
  t.teardown(async () => {
    streams.stop()
    await bus.close()
  })
  const user = channel.user('u')
  const [first] = bus.publishNow([{ channels: [user], body: renderBody('e', 'b0') }])
  for (let n = 1; n <= 3; n++) bus.publishNow([{ channels: [user], body: renderBody('e', `b${n} ${'x'.repeat(40_000)}`) }])
  await new Promise((resolve) => setImmediate(resolve))
  const sink = new HandDrainedSink()
  const opened = streams.open(spec('c3', 1, sink, { channels: [user], cursor: first }))
  const connection = registry.get('c3')
  if (connection === undefined) throw new Error('c3 is not registered')
  await eventually(() => sink.text().includes('data: b2'), 'the replay to wait for a drain')
  // Idle since long before now, by the clock of the keepalive check: one is due.
  connection.keepalive(Date.now() + 1)
  await new Promise((resolve) => setImmediate(resolve))
  t.notOk(connection.closed, 'not closed while its replay is paced by its reader')
  sink.auto = true
  sink.drain()
  await opened
  t.ok(connection.live, 'live once the reader took the backlog')
  t.match(sink.text(), /data: b3 /, 'the whole backlog sent')
})
