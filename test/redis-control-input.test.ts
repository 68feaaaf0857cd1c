/**
 * Control traffic (`<prefix>ctl`, `<prefix>reply:<instance>`) and the bus
 * channels (`<prefix>ch:*`) are reachable by anyone who can PUBLISH to Redis,
 * and instances listen to them: a malformed message must be dropped, never
 * crash the process nor reach a stream. Topic names
 * are user input too: ones named like Object.prototype members must be
 * counted like any other in GET /v1/stats.
 */
import t, { type Test } from 'tap'
import { eventually, request, startGateway, userToken, type Gateway } from './helpers'
import { ADMIN, connect, pair, publishTo, settle, subscriptions, type StatsReply } from './helpers/channels'
import { forEachMode, modeEnv } from './helpers/modes'
import { needRedis, redisClient, uniquePrefix } from './helpers/redis'
import { isEventBody, renderBody } from '../src/core/framing'

/*
 * tap already fails the file when the process crashes; recording what reaches
 * the monitor also names the culprit in the failing test itself. The monitor
 * sees unhandled rejections too (Node raises them as uncaught exceptions), and
 * unlike an 'uncaughtException' listener it does not stop the crash.
 */
const crashes: string[] = []
process.on('uncaughtExceptionMonitor', (error, origin) => {
  crashes.push(`${origin}: ${error instanceof Error ? error.stack ?? error.message : String(error)}`)
})

/** Appears in payloads only: it must never reach a log line. */
const SECRET = 'SECRET-CTL-7c41'

const BAD_JSON = [
  '{}', 'null', '[]', '42', '"x"', 'true', '', `not json ${SECRET}`, '{"requestId":',
  '{"requestId":1}', '{"requestId":{}}'
]

function badControl (connectionId: string): string[] {
  const envelope = (fields: Record<string, unknown>): string => JSON.stringify({ requestId: 'r', from: 'x', ...fields })
  return [
    ...BAD_JSON,
    envelope({}),
    envelope({ message: null }),
    envelope({ message: [] }),
    envelope({ message: 'evict' }),
    envelope({ message: {} }),
    envelope({ message: { type: 'nope', secret: SECRET } }),
    envelope({ message: { type: 'evict' } }),
    // Well formed but for `reason`: had it been applied, this stream would be evicted.
    envelope({ message: { type: 'evict', connectionId } }),
    envelope({ message: { type: 'evict', connectionId, reason: 7 } }),
    envelope({ message: { type: 'evict', connectionId, reason: 'r', instance: 5 } }),
    // Past every admission's seq: applied, it would evict this stream.
    envelope({ message: { type: 'evict', connectionId, reason: 'r', instance: null, decidedAt: 1e300 } }),
    envelope({ message: { type: 'topics' } }),
    envelope({ message: { type: 'topics', userId: 'u1', connectionId: null, add: 'news', remove: [] } }),
    envelope({ message: { type: 'topics', userId: 'u1', connectionId: null, add: ['leaked', 1], remove: [] } }),
    envelope({ message: { type: 'topics', userId: 'u1', connectionId: 5, add: ['leaked'], remove: [] } }),
    envelope({ message: { type: 'topics', userId: 'u1', connectionId: null, add: ['leaked'] } }),
    envelope({ requestId: 1, message: { type: 'evict', connectionId, reason: 'r' } }),
    envelope({ from: {}, message: { type: 'evict', connectionId, reason: 'r' } }),
    JSON.stringify({ message: { type: 'evict', connectionId, reason: 'r' } }),
    '{"__proto__":{"requestId":"r","from":"x"},"message":{"type":"evict"}}'
  ]
}

const BAD_REPLIES = [
  ...BAD_JSON,
  '{"requestId":"r"}',
  '{"requestId":"r","answer":"x"}',
  '{"requestId":"r","answer":[1]}',
  '{"requestId":"r","answer":{}}',
  '{"requestId":null,"answer":null}',
  '{"requestId":"r","answer":null,"from":5}',
  `{"answer":["${SECRET}"]}`
]

function count (gateway: Gateway, message: string): number {
  return gateway.logs.filter((line) => (JSON.parse(line) as { msg?: string }).msg === message).length
}

function noCrash (t: Test): void {
  t.same(crashes, [], 'no uncaught exception and no unhandled rejection')
}

t.test('malformed control messages and replies are dropped and logged without their payload; the cluster keeps working', async (t) => {
  if (!(await needRedis(t))) return
  const prefix = uniquePrefix('ctlinput')
  const env = modeEnv('redis', prefix, { MAX_CONNECTIONS_PER_USER: '2', CONNECTION_LIMIT_POLICY: 'evict-oldest' })
  const a = await startGateway(t, env, { captureLogs: true })
  const b = await startGateway(t, env, { captureLogs: true })
  const redis = redisClient(t)
  const tabA = await connect(t, a, 'u1')
  const tabB = await connect(t, b, 'u1')

  const control = badControl(tabA.connectionId)
  const receivers: number[] = []
  for (const payload of control) receivers.push(await redis.publish(`${prefix}ctl`, payload))
  t.same(receivers, control.map(() => 2), 'both instances received every control message')
  for (const gateway of [a, b]) {
    const received: number[] = []
    for (const payload of BAD_REPLIES) received.push(await redis.publish(`${prefix}reply:${gateway.app.registry.instanceId}`, payload))
    t.same(received, BAD_REPLIES.map(() => 1), 'the instance received every reply')
  }
  for (const [name, gateway] of [['A', a], ['B', b]] as const) {
    await eventually(() => count(gateway, 'malformed control message dropped') >= control.length &&
      count(gateway, 'malformed control reply dropped') >= BAD_REPLIES.length, `instance ${name} to drop every bad message`)
    t.equal(count(gateway, 'malformed control message dropped'), control.length, `instance ${name} logged each bad control message once`)
    t.equal(count(gateway, 'malformed control reply dropped'), BAD_REPLIES.length, `instance ${name} logged each bad reply once`)
    t.notOk(gateway.logText().includes(SECRET), `instance ${name} logged no payload`)
    t.equal((await request(`${gateway.url}/ready`)).status, 200, `instance ${name} is ready`)
  }
  noCrash(t)
  t.notOk(tabA.stream.ended, 'the evict message without a reason was not applied')
  t.notOk(tabA.stream.events.some((event) => event.event === 'evicted'))

  // Fan-out across instances still works.
  const note = await publishTo(b, { to: { user: 'u1' }, event: 'note', data: 'after' })
  t.equal((await tabA.stream.nextEvent('note')).id, note, 'an event published on B reaches the stream on A')
  t.equal((await tabB.stream.nextEvent('note')).id, note)

  // A per-stream subscription asked on B for a stream on A needs A's reply.
  const token = userToken('u1')
  const added = await subscriptions(b, token, 'POST', { topics: ['after'], connectionId: tabA.connectionId })
  t.equal(added.status, 200)
  t.same(added.json.topics, ['after'], "A answered with the stream's topics")
  const onTopic = await publishTo(b, { to: { topic: 'after' }, event: 'topical', data: 1 })
  t.same((await settle(a, tabA.stream, tabA.connectionId)).filter((event) => event.event === 'topical').map((event) => event.id), [onTopic])

  // A user-wide subscription asked on A reaches the user's stream on B.
  t.equal((await subscriptions(a, token, 'POST', { topics: ['wide'] })).status, 200)
  const wide = await publishTo(a, { to: { topic: 'wide' }, event: 'wide', data: 2 })
  t.equal((await tabB.stream.nextEvent('wide')).id, wide, 'the stream on B joined the user-wide topic')
  t.notOk(tabB.stream.events.some((event) => event.event === 'leaked'), 'no malformed topics message was applied')

  // A third stream on B evicts the oldest one, on A, through the control channel.
  await connect(t, b, 'u1')
  const evicted = await tabA.stream.nextEvent('evicted')
  t.match(JSON.parse(evicted.data), { reason: String })
  await tabA.stream.waitEnd()
  noCrash(t)
})

t.test('a well-formed control message still reaches the handler and is answered', async (t) => {
  if (!(await needRedis(t))) return
  const prefix = uniquePrefix('ctlthrow')
  const gateway = await startGateway(t, modeEnv('redis', prefix), { captureLogs: true })
  const redis = redisClient(t)
  const listener = redisClient(t)
  const replyChannel = `${prefix}reply:outsider`
  const answers: string[] = []
  listener.on('message', (_name: string, message: string) => answers.push(message))
  await listener.subscribe(replyChannel)
  // Validation must not reject what instances really send; an unknown stream id is a no-op.
  await redis.publish(`${prefix}ctl`, JSON.stringify({ requestId: 'q1', from: 'outsider', message: { type: 'evict', connectionId: 'c_none', reason: 'test' } }))
  await eventually(() => answers.length === 1, 'the instance to answer')
  t.same(JSON.parse(answers[0]), { requestId: 'q1', answer: null, from: gateway.app.state.instanceId }, 'a well-formed message from anyone is answered, saying by whom')
  t.equal(count(gateway, 'malformed control message dropped'), 0, 'a good message is not reported as malformed')
  noCrash(t)
})

t.test('a message on a bus channel that is not one of the gateway\'s own is dropped: the streams\' framing, cursors and later events are intact', async (t) => {
  if (!(await needRedis(t))) return
  const prefix = uniquePrefix('businput')
  const gateway = await startGateway(t, modeEnv('redis', prefix), { captureLogs: true })
  const redis = redisClient(t)
  const tab = await connect(t, gateway, 'u1')
  const first = await publishTo(gateway, { to: { user: 'u1' }, event: 'note', data: 'before' })
  t.equal((await tab.stream.nextEvent('note')).id, first)
  const next = String(Number(first) + 1)
  const bad = [
    `{\n  "event": "x", "data": "${SECRET}"\n}`,
    `${next}\nevent: forged\ndata: ${SECRET}\n`,
    `${next}\ndata: x\nid: 9000000000000000\n\n`,
    `${next}\ndata: a\n\ndata: b\n\n`,
    `${next}\ndata: a\r\n\n`,
    `${next}\n: comment\n\n`,
    `${next}\nretry: 1\ndata: x\n\n`,
    `${next}\n\n`,
    '0x10\ndata: x\n\n',
    '1e15\ndata: x\n\n',
    '-5\ndata: x\n\n',
    '05\ndata: x\n\n',
    '99999999999999999\ndata: x\n\n',
    '9007199254740993\ndata: x\n\n',
    `${next}`,
    ''
  ]
  for (const payload of bad) t.equal(await redis.publish(`${prefix}ch:b`, payload), 1, 'the instance listens to the broadcast channel')
  for (const payload of bad) t.equal(await redis.publish(`${prefix}ch:u:u1`, payload), 1, 'and to the user\'s')
  // Published after them on the same subscriber connection: it arrives after them.
  const after = await publishTo(gateway, { to: { user: 'u1' }, event: 'note', data: 'after' })
  const received = await tab.stream.nextEvent('note')
  t.same({ id: received.id, data: received.data }, { id: after, data: 'after' }, 'the next event arrives whole, with its own id')
  t.same(tab.stream.events.map((event) => event.event), ['connected', 'note', 'note'], 'nothing else reached the stream')
  t.equal(received.lastEventId, after, 'the cursor is the last event\'s id')
  await eventually(() => count(gateway, 'malformed bus message dropped') >= bad.length * 2, 'every bad message to be logged')
  t.equal(count(gateway, 'malformed bus message dropped'), bad.length * 2, 'each logged once')
  t.notOk(gateway.logText().includes(SECRET), 'without its payload')
  noCrash(t)
})

t.test('every body the gateway renders passes the bus\'s check, so none of its own events is dropped', async (t) => {
  const texts = ['', 'x', '{"a":1}', 'line one\nline two', 'a\r\nb\rc', '\n', '\n\n\n', 'trailing\n', 'data: x\n\nid: 5', ': not a comment', 'é ✓ 😀']
  for (const event of ['message', 'job_update', 'user:online', 'a.b-c_d:e']) {
    for (const text of texts) {
      const body = Buffer.from(`1796490000000000\n${renderBody(event, text)}`)
      t.ok(isEventBody(body, body.indexOf(0x0a) + 1), `${event}: ${JSON.stringify(text)}`)
    }
  }
})

forEachMode(t, 'GET /v1/stats counts topics named like Object.prototype members (constructor, __proto__, toString…)', async (t, mode) => {
  const [a, b] = await pair(t, mode)
  await connect(t, a, 'u1', { topics: 'constructor,__proto__,news' })
  await connect(t, b, 'u2', { topics: 'constructor,toString' })
  const u3 = await connect(t, a, 'u3', { topics: '__proto__,valueOf' })
  // Also through a per-stream subscription, asked on the other instance.
  const added = await subscriptions(b, userToken('u3'), 'POST', { topics: ['hasOwnProperty'], connectionId: u3.connectionId })
  t.equal(added.status, 200)
  const expected = [['__proto__', 2], ['constructor', 2], ['hasOwnProperty', 1], ['news', 1], ['toString', 1], ['valueOf', 1]]
  for (const gateway of [a, b]) {
    const answer = await request<StatsReply>(`${gateway.url}/v1/stats`, { token: ADMIN })
    t.equal(answer.status, 200, `GET /v1/stats answers 200: ${answer.text}`)
    // JSON.parse keeps "__proto__" as an own key; compare entries, which see it as one.
    t.same(Object.entries(answer.json.topics).sort(([x], [y]) => x < y ? -1 : 1), expected, 'every topic counted')
    t.match(answer.json, { connections: 3, users: 3, instances: mode === 'redis' ? 2 : 1 })
  }
  noCrash(t)
})
