/**
 * Reopening a stream id without a cursor (GET /v1/stream/:connectionId):
 * the connection's window is replayed, and every event published after the
 * stream joined its channels (user, topics, broadcast, the connection)
 * reaches it exactly once, with ids that strictly increase, even when it is
 * published between the join and the read of the window. The gap is made
 * deterministic by publishing from inside the gateway's own `bus.window`.
 * Every test runs in embedded and Redis mode.
 */
import t, { type Test } from 'tap'
import type { EventBus } from '../src/core/bus'
import type { PublishRequest } from '../src/core/publish'
import { eventually, publishOk, request, type SseEvent } from './helpers'
import { connect, increasing, nonce, publishTo, PUBLISHER, settle } from './helpers/channels'
import type { Gateway } from './helpers/gateway'
import { forEachMode, startCluster } from './helpers/modes'

const USER = 'alice'
const TOPIC = 'news'

/** Published events, markers and system events left out. */
function published (events: SseEvent[]): SseEvent[] {
  return events.filter((event) => event.id !== undefined && event.event !== 'marker')
}

async function precreate (gateway: Gateway, userId: string): Promise<string> {
  const answer = await request<{ connectionId: string }>(`${gateway.url}/v1/connections`, { method: 'POST', token: PUBLISHER, body: { userId } })
  if (answer.status !== 201) throw new Error(`POST /v1/connections answered ${answer.status}: ${answer.text}`)
  return answer.json.connectionId
}

/**
 * Runs `during` once, inside the first `window` read, before the read itself;
 * resolves once that read has been answered (`connected` goes out before it).
 */
async function beforeFirstWindow (t: Test, bus: EventBus, during: () => Promise<void>): Promise<void> {
  const original = bus.window
  t.teardown(() => {
    bus.window = original
  })
  await new Promise<void>((resolve, reject) => {
    bus.window = async function (this: EventBus, channels: string[]) {
      bus.window = original
      try {
        await during()
        const entries = await original.call(this, channels)
        resolve()
        return entries
      } catch (error) {
        reject(error)
        throw error
      }
    }
  })
}

forEachMode(t, 'a reopen without a cursor gets the window and every event published in the join-to-window gap, once, ids increasing', async (t, mode) => {
  const [gateway] = await startCluster(t, mode)
  const connectionId = await precreate(gateway, USER)
  const early = await publishTo(gateway, { to: { connection: connectionId }, event: 'chunk', data: 'early' })
  // The user's history is not the connection's: a reopen without a cursor does not replay it.
  await publishTo(gateway, { to: { user: USER }, event: 'user-note', data: 'before the reopen' })
  // Another stream of the same user on the same instance: once it has an
  // event, the instance has fanned it out to every local stream, the one
  // being reopened (and still holding what arrives) included.
  const observer = await connect(t, gateway, USER, { topics: TOPIC })

  const gap: string[] = []
  const gapPublished = beforeFirstWindow(t, gateway.app.bus, async () => {
    // Through the route, fanned out to the held stream before the window is read.
    const routed = await publishOk(gateway.url, PUBLISHER, [
      { to: { user: USER }, event: 'user-event', data: 'routed' },
      { to: { topic: TOPIC }, event: 'topic-event', data: 'routed' },
      { to: { broadcast: true }, event: 'broadcast-event', data: 'routed' },
      { to: { connection: connectionId }, event: 'chunk', data: 'routed' }
    ])
    gap.push(...routed)
    await observer.stream.next((event) => event.id === routed[2], 5000, 'the routed broadcast on the observer')
    // In process, right before the read: in embedded mode it is fanned out
    // only after the window has been written, so the stream never holds it.
    const requests: PublishRequest[] = [
      { target: { kind: 'user', id: USER }, event: 'user-event', text: '"in process"' },
      { target: { kind: 'connection', id: connectionId }, event: 'chunk', text: '"in process"' }
    ]
    gap.push(...(await gateway.app.publisher.publish(requests)).map(String))
  })

  const reopened = await connect(t, gateway, USER, { path: `/v1/stream/${connectionId}`, topics: TOPIC })
  t.equal(reopened.connectionId, connectionId, 'the same id')
  await gapPublished
  t.equal(gap.length, 6, 'the gap was published while the stream was being opened')
  const live = await publishTo(gateway, { to: { user: USER }, event: 'user-event', data: 'live' })
  const received = published(await settle(gateway, reopened.stream, connectionId))
  const ids = received.map((event) => event.id)
  t.same(ids, [early, ...gap, live], 'the window, then each gap event once, then live; nothing of the user\'s older history')
  t.ok(increasing(ids), 'ids strictly increase: Last-Event-ID stays a correct resume point')
  t.same(received.map((event) => event.event), ['chunk', 'user-event', 'topic-event', 'broadcast-event', 'chunk', 'user-event', 'chunk', 'user-event'])
})

forEachMode(t, 'a reopen without a gap replays the connection\'s window, then continues live on every channel', async (t, mode) => {
  const [gateway] = await startCluster(t, mode)
  const first = await connect(t, gateway, USER, { topics: TOPIC })
  const connectionId = first.connectionId
  first.stream.close()
  await eventually(() => gateway.app.registry.get(connectionId) === undefined, 'the first stream to close')
  const windowIds = [
    await publishTo(gateway, { to: { connection: connectionId }, event: 'chunk', data: 'away 1' }),
    await publishTo(gateway, { to: { connection: connectionId }, event: 'chunk', data: 'away 2' })
  ]
  await publishTo(gateway, { to: { user: USER }, event: 'user-note', data: 'not replayed' })
  await publishTo(gateway, { to: { topic: TOPIC }, event: 'topic-note', data: 'not replayed' })
  await publishTo(gateway, { to: { broadcast: true }, event: 'broadcast-note', data: 'not replayed' })

  const reopened = await connect(t, gateway, USER, { path: `/v1/stream/${connectionId}`, topics: TOPIC })
  t.equal(reopened.connectionId, connectionId)
  const replayed = published(await settle(gateway, reopened.stream, connectionId))
  t.same(replayed.map((event) => event.id), windowIds, 'the connection\'s window, in order, nothing else')

  const value = nonce()
  const liveIds = await publishOk(gateway.url, PUBLISHER, [
    { to: { user: USER }, event: 'user-event', data: value },
    { to: { topic: TOPIC }, event: 'topic-event', data: value },
    { to: { broadcast: true }, event: 'broadcast-event', data: value },
    { to: { connection: connectionId }, event: 'chunk', data: value }
  ])
  const live = published(await settle(gateway, reopened.stream, connectionId))
  t.same(live.map((event) => event.id), liveIds, 'then live events of every channel, once each')
  t.ok(increasing([...windowIds, ...liveIds]), 'ids strictly increase across replay and live')
})
