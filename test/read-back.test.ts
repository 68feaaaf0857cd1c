/**
 * A stream that replays while live events come holds them, and lets them go
 * past MAX_BUFFERED_BYTES to read them back from history before it goes live
 * (slow-consumer.test.ts covers that end to end). Here, on the stream core
 * with a sink the test drains by hand, so that a subscription can change at
 * a chosen point of the read-back: a topic joined meanwhile is read from when
 * it was joined, and one left is read no more, as a replay reads them. The
 * paged bus reads history a few events at a time, as the Redis bus does.
 * A catch-up after a lost subscription lets held events go the same way,
 * but closes the stream as slow rather than read them back in its turn.
 */
import t, { type Test } from 'tap'
import { channel } from '../src/core/channels'
import type { Sink, StreamConnection } from '../src/core/connection'
import { renderBody } from '../src/core/framing'
import { Hub } from '../src/core/hub'
import type { DeliveryListener, ReplayResult, SubscriptionListeners } from '../src/core/bus'
import { MemoryBus } from '../src/core/memory-bus'
import { Registry } from '../src/core/registry'
import { StreamService, type StreamSpec } from '../src/core/streams'
import { fakePerformanceNow, HandDrainedSink, noEvents } from './helpers/stream-core'

class PagedBus extends MemoryBus {
  constructor (private readonly pageSize: number) {
    super({ historySize: 10_000, historyTtlS: 3600 })
  }

  override async replay (channels: string[], after: number): Promise<ReplayResult> {
    const result = await super.replay(channels, after)
    if (result.reset !== null || this.pageSize === 0 || result.events.length <= this.pageSize) return result
    return { reset: null, events: result.events.slice(0, this.pageSize), more: true }
  }
}

const USER = channel.user('u')
const TOPIC = channel.topic('T')

function setup (t: Test, pageSize: number): { bus: PagedBus, registry: Registry, streams: StreamService, publish: (to: string, name: string, size?: number) => number } {
  const bus = new PagedBus(pageSize)
  const registry = new Registry('read-back')
  // A bound of 1 KiB: a few live events of 300 bytes pass it.
  const streams = new StreamService(bus, new Hub(bus), registry, { retryMs: 1000, keepaliveMs: 60_000, maxBufferedBytes: 1024, historyTtlS: 3600 }, noEvents)
  t.teardown(async () => {
    streams.stop()
    await bus.close()
  })
  const publish = (to: string, name: string, size = 10): number => bus.publishNow([{ channels: [to], body: renderBody('e', `${name} ${'x'.repeat(size)}`) }])[0]
  return { bus, registry, streams, publish }
}

/** Drains the sink, a turn at a time, until it has been given event `name`. */
async function drainUntilSent (sink: HandDrainedSink, name: string): Promise<void> {
  for (let guard = 0; guard < 50 && !sink.names().includes(name); guard++) {
    sink.drain()
    await turns(2)
  }
}

const turn = async (): Promise<void> => { await new Promise((resolve) => setImmediate(resolve)) }
const turns = async (count: number): Promise<void> => { for (let n = 0; n < count; n++) await turn() }

function spec (sink: Sink, cursor: number | null, extra: Partial<StreamSpec> = {}): StreamSpec {
  return {
    connectionId: 'c1',
    admissionSeq: 1,
    issuedBefore: 0,
    userId: 'u',
    kind: 'stream',
    topics: [],
    channels: [USER],
    sink,
    tokenExpiresAt: null,
    allowedTopics: null,
    remoteAddress: '127.0.0.1',
    cursor,
    head: Buffer.from('HEAD\n'),
    ...extra
  }
}

/** How c1 opens: the two large events before it go to `backlogTo`; with `withCursor`, its cursor comes before them. */
interface Opening {
  backlogTo: string
  withCursor: boolean
  extra: Partial<StreamSpec>
}

/**
 * Opens c1 behind a backlog of two large events, lets eight live user
 * events of 300 bytes go past the bound while it replays, and drains the
 * sink until the read-back has sent the first of them. Then `meanwhile`
 * runs, and the sink drains freely to the end.
 */
async function readBackWith (t: Test, pageSize: number, opening: Opening, meanwhile: (connection: StreamConnection, publish: (to: string, name: string, size?: number) => number, streams: StreamService, registry: Registry) => Promise<void>): Promise<string[]> {
  const { registry, streams, publish } = setup(t, pageSize)
  const first = publish(opening.backlogTo, 'b0', 5000)
  publish(opening.backlogTo, 'b1', 5000)
  await turns(2)
  const sink = new HandDrainedSink()
  const opened = streams.open(spec(sink, opening.withCursor ? first - 1 : null, opening.extra))
  await turns(3)
  for (let n = 0; n < 8; n++) publish(USER, `let${n}`, 300)
  await turn()
  const connection = registry.get('c1')
  if (connection === undefined) throw new Error('c1 is not registered')
  await drainUntilSent(sink, 'let0')
  t.ok(sink.names().includes('let0'), 'the read-back has begun')
  await meanwhile(connection, publish, streams, registry)
  sink.auto = true
  sink.drain()
  await opened
  await turns(2)
  t.ok(connection.live, 'the stream is live, not closed')
  return sink.names()
}

/** A cursor's replay of user events, the stream subscribed to `topics`. */
const withCursor = (topics: string[]): Opening => ({ backlogTo: USER, withCursor: true, extra: { topics, channels: [USER, ...topics.map(channel.topic)] } })

const LET_GO = ['let0', 'let1', 'let2', 'let3', 'let4', 'let5', 'let6', 'let7']

t.test('a topic joined during the read-back: its events from then on are sent, none from before', async (t) => {
  for (const pageSize of [0, 2]) {
    const names = await readBackWith(t, pageSize, withCursor([]), async (connection, publish, streams, registry) => {
      publish(TOPIC, 'before_join')
      await turns(2)
      registry.addTopics(connection, ['T'])
      await streams.join(connection, [TOPIC])
      publish(TOPIC, 'after_join')
      publish(USER, 'u_after')
      await turns(2)
    })
    t.same(names, ['b0', 'b1', ...LET_GO, 'after_join', 'u_after'], `pages of ${pageSize === 0 ? 'any size' : pageSize}: ${names.join(',')}`)
  }
})

t.test('a topic left during the read-back: nothing of it after the leave', async (t) => {
  for (const pageSize of [0, 2]) {
    const names = await readBackWith(t, pageSize, withCursor(['T']), async (connection, publish, streams, registry) => {
      registry.removeTopics(connection, ['T'])
      streams.leave(connection, [TOPIC])
      publish(TOPIC, 'after_leave')
      publish(USER, 'u_after')
      await turns(2)
    })
    t.same(names, ['b0', 'b1', ...LET_GO, 'u_after'], `pages of ${pageSize === 0 ? 'any size' : pageSize}: ${names.join(',')}`)
  }
})

t.test('a reopen without a cursor (its window): a topic joined during the read-back is read from its join', async (t) => {
  const own = channel.connection('c1')
  const names = await readBackWith(t, 0, { backlogTo: own, withCursor: false, extra: { channels: [USER, own], windowChannels: [own] } }, async (connection, publish, streams, registry) => {
    publish(TOPIC, 'before_join')
    await turns(2)
    registry.addTopics(connection, ['T'])
    await streams.join(connection, [TOPIC])
    for (let n = 0; n < 8; n++) publish(USER, `again${n}`, 300)
    publish(TOPIC, 'after_join')
    await turns(2)
  })
  t.same(names, ['b0', 'b1', ...LET_GO, ...LET_GO.map((name) => name.replace('let', 'again')), 'after_join'], names.join(','))
})

/** A paged bus whose subscription the test loses and restores: while lost, events go to history only. */
class LosingBus extends PagedBus {
  private subscription: SubscriptionListeners | null = null
  private down = false

  override onSubscription (listeners: SubscriptionListeners): void {
    this.subscription = listeners
  }

  override onDelivery (listener: DeliveryListener): void {
    super.onDelivery((name, id, frame) => {
      if (!this.down) listener(name, id, frame)
    })
  }

  lose (): void {
    this.down = true
    this.subscription?.lost()
  }

  restore (): void {
    this.down = false
    this.subscription?.restored()
  }
}

/**
 * c1 is live when the subscription is lost; two large events are published
 * while it is down, and `liveCount` live events of 300 bytes come while the
 * catch-up sends those two at the pace of a sink drained by hand.
 */
async function catchUpWith (t: Test, liveCount: number): Promise<{ names: string[], connection: StreamConnection, sink: HandDrainedSink }> {
  const bus = new LosingBus(2)
  const registry = new Registry('catch-up')
  const streams = new StreamService(bus, new Hub(bus), registry, { retryMs: 1000, keepaliveMs: 60_000, maxBufferedBytes: 1024, historyTtlS: 3600 }, noEvents)
  t.teardown(async () => {
    streams.stop()
    await bus.close()
  })
  const publish = (name: string, size: number): void => { bus.publishNow([{ channels: [USER], body: renderBody('e', `${name} ${'x'.repeat(size)}`) }]) }
  const sink = new HandDrainedSink()
  sink.auto = true
  await streams.open(spec(sink, null))
  const connection = registry.get('c1')
  if (connection === undefined) throw new Error('c1 is not registered')
  t.ok(connection.live, 'c1 is live before the loss')
  sink.auto = false
  bus.lose()
  publish('missed0', 5000)
  publish('missed1', 5000)
  await turns(2)
  bus.restore()
  await turns(2)
  for (let n = 0; n < liveCount; n++) publish(`live${n}`, 300)
  await turns(2)
  for (let guard = 0; guard < 50 && !connection.live && !connection.closed; guard++) {
    sink.drain()
    await turns(2)
  }
  sink.auto = true
  sink.drain()
  await turns(2)
  return { names: sink.names(), connection, sink }
}

t.test('a catch-up after a lost subscription: held live events within the bound go out after the missed ones', async (t) => {
  const { names, connection } = await catchUpWith(t, 2)
  t.ok(connection.live, 'live again')
  t.same(names, ['missed0', 'missed1', 'live0', 'live1'], names.join(','))
})

t.test('a catch-up after a lost subscription: held live events past the bound close the stream as slow, without a gap', async (t) => {
  const { names, connection, sink } = await catchUpWith(t, 8)
  t.equal(connection.closeReason, 'slow', 'closed as a slow consumer: it reconnects with its cursor')
  t.ok(sink.reset, 'its connection reset: what it held unsent is dropped, the kernel\'s copy too')
  t.same(names, ['missed0', 'missed1'], `nothing after the events let go is sent (${names.join(',')})`)
})

t.test('a catch-up that finds the store issuing lower ids (it lost its data, and its clock is behind the ids it had issued): reset, then the new events', async (t) => {
  const bus = new LosingBus(0)
  const registry = new Registry('ids-back')
  const streams = new StreamService(bus, new Hub(bus), registry, { retryMs: 1000, keepaliveMs: 60_000, maxBufferedBytes: 1024 * 1024, historyTtlS: 3600 }, noEvents)
  t.teardown(async () => {
    streams.stop()
    await bus.close()
  })
  const publish = (name: string): void => { bus.publishNow([{ channels: [USER], body: renderBody('e', name) }]) }
  const sink = new HandDrainedSink()
  sink.auto = true
  await streams.open(spec(sink, null))
  publish('before')
  await turns(2)
  t.same(sink.names(), ['before'])

  bus.lose()
  // The store comes back empty, its clock a minute behind: every id it issues now is below the stream's last.
  fakePerformanceNow(t, (real) => real - 60_000)
  bus['histories'].clear()
  bus['last'] = 0
  // And its epoch starts anew, as INIT does for a store that restarted.
  Object.assign(bus, { epoch: Math.floor((performance.timeOrigin + performance.now()) * 1000) })
  bus.restore()
  await turns(4)
  publish('after0')
  publish('after1')
  await turns(4)
  t.match(sink.text(), /event: reset\ndata: \{"reason":"future"\}/, 'the stream is told it may have missed events')
  t.same(sink.names(), ['before', 'after0', 'after1'], 'the events issued since, with their lower ids, are delivered')

  // A later loss catches up from the new ids, not from the old ones: no second reset.
  bus.lose()
  publish('missed')
  bus.restore()
  await turns(4)
  t.same(sink.names(), ['before', 'after0', 'after1', 'missed'], 'a later loss is caught up')
  t.equal([...sink.text().matchAll(/event: reset/g)].length, 1, 'one reset in all')
})
