/**
 * The five hand-written SSE systems the gateway replaces (../shared/seeds/),
 * each served end to end: its browser flow and its backend's publish flow,
 * written the way the seed's own example reads. Each runs in embedded and
 * Redis mode; in Redis mode the browser and the backend use different
 * instances.
 */
import t, { type Test } from 'tap'
import { eventually, openStream, publishOk, request, token, userToken, type SseClient } from './helpers'
import {
  ADMIN, dataOf, namesOf, pair, presence, PUBLISHER, putJob, putJobOk, settle, setMembers, stats, subscriptions
} from './helpers/channels'
import type { Gateway } from './helpers/gateway'
import { forEachMode } from './helpers/modes'
import { redisClient } from './helpers/redis'

/** A blog post body as the generator streams it, cut at arbitrary places (mid-word, mid-line, between newlines). */
const POST_MARKDOWN = [
  '## Why SSE?\n\nServer-Sent Events push updates over plain HTTP. ',
  'They reconnect by themselves and resume with `Last-Event-ID`.\n',
  '\n',
  '### The wire\n\n```\nid: 18\nevent: message:new\ndata: {"text":"hi"}\n```\n\n',
  'A line that starts with data: is just text here, and so is event: y or id: 5.',
  '\n\n',
  '  Indented line kept as is.\n- bullet ',
  'continued\n- second bullet\n\n> quote: caf\u00e9, \u65e5\u672c\u8a9e, \ud83d\ude80\n',
  '',
  '\n\nThe end.'
]

async function eventSource (t: Test, url: string): Promise<{ stream: SseClient, connectionId: string }> {
  const stream = await openStream(url, { t })
  if (stream.status !== 200) throw new Error(`stream answered ${stream.status}: ${stream.text}`)
  const connected = await stream.nextEvent('connected')
  return { stream, connectionId: dataOf<{ connectionId: string }>(connected).connectionId }
}

/** streamManager.publish(connectionId, event, data) */
async function streamManagerPublish (backend: Gateway, connectionId: string, event: string, data: unknown): Promise<void> {
  await publishOk(backend.url, PUBLISHER, { to: { connection: connectionId }, event, data })
}

forEachMode(t, 'seed 000 (blog generation stream): /v1/stream?token= gives connected {connectionId}; the backend streams content-chunk markdown to it over the POST and Redis stream:<id>; a pre-created id can be joined', async (t, mode) => {
  const [api, worker] = await pair(t, mode)
  const accessToken = userToken('user-1')

  // Invalid or missing token returns 401.
  t.equal((await openStream(`${api.url}/v1/stream`, { t })).status, 401)
  t.equal((await openStream(`${api.url}/v1/stream?token=not-a-jwt`, { t })).status, 401)

  // new EventSource(`${API_BASE}/api/v1/stream?token=${accessToken}`)
  const { stream, connectionId } = await eventSource(t, `${api.url}/v1/stream?token=${accessToken}`)
  t.match(connectionId, /^c_/)

  // POST /blog/generate-stream: the worker publishes only post-body markdown in content-chunk events.
  for (const chunk of POST_MARKDOWN) await streamManagerPublish(worker, connectionId, 'content-chunk', chunk)
  await streamManagerPublish(worker, connectionId, 'complete', { words: 80 })
  await stream.nextEvent('complete')
  const body = stream.events.filter((event) => event.event === 'content-chunk').map((event) => event.data)
  t.same(body, POST_MARKDOWN, 'every chunk arrives intact and in order')
  t.equal(body.join(''), POST_MARKDOWN.join(''), 'the frontend rebuilds the exact markdown')

  if (mode === 'redis') {
    // Any process may publish over Redis: PUBLISH stream:{connectionId} {"event","data"}.
    const redis = redisClient(t)
    for (const data of POST_MARKDOWN) await redis.publish(`stream:${connectionId}`, JSON.stringify({ event: 'content-chunk', data }))
    await redis.publish(`stream:${connectionId}`, JSON.stringify({ event: 'complete', data: { words: 80 } }))
    await stream.nextEvent('complete')
    const overRedis = stream.events.filter((event) => event.event === 'content-chunk').slice(POST_MARKDOWN.length).map((event) => event.data)
    t.same(overRedis, POST_MARKDOWN, 'over Redis too: intact, in order, once')
    // The gateway's own ingress channel takes the POST body.
    await redis.publish(`${api.app.config.redisPrefix}publish`, JSON.stringify(POST_MARKDOWN.map((data) => ({ to: { connection: connectionId }, event: 'content-chunk', data }))))
    const last = POST_MARKDOWN.length
    await stream.until(() => stream.events.filter((event) => event.event === 'content-chunk').length >= 3 * last, 5000, 'the chunks sent to <prefix>publish')
    t.same(stream.events.filter((event) => event.event === 'content-chunk').slice(2 * last).map((event) => event.data), POST_MARKDOWN, 'and through <prefix>publish')
  }

  // Join existing stream by connectionId (returned by POST /audiences/generate-stream).
  const created = await request<{ connectionId: string }>(`${worker.url}/v1/connections`, { method: 'POST', token: PUBLISHER, body: { userId: 'user-1' } })
  t.equal(created.status, 201)
  const streamId = created.json.connectionId
  const [early, late] = [POST_MARKDOWN.slice(0, 4), POST_MARKDOWN.slice(4)]
  for (const chunk of early) await streamManagerPublish(worker, streamId, 'content-chunk', chunk)
  const joined = await eventSource(t, `${api.url}/v1/stream/${streamId}?token=${accessToken}`)
  t.equal(joined.connectionId, streamId, 'connected carries the pre-created id')
  for (const chunk of late) await streamManagerPublish(worker, streamId, 'content-chunk', chunk)
  await streamManagerPublish(worker, streamId, 'complete', {})
  await joined.stream.nextEvent('complete')
  t.equal(joined.stream.events.filter((event) => event.event === 'content-chunk').map((event) => event.data).join(''), POST_MARKDOWN.join(''),
    'chunks sent before and after the join make the whole post')
  t.equal((await openStream(`${api.url}/v1/stream/${streamId}?token=${userToken('someone-else')}`, { t })).status, 404, 'nobody else can join it')
})

forEachMode(t, 'seed 001 (job progress): the worker PUTs job state; the owner sees initial_status then each job_update to completed or failed; nobody else can watch', async (t, mode) => {
  const [api, worker] = await pair(t, mode)
  const owner = userToken('user-42')

  // The worker has started job 123 before the page opens.
  await putJobOk(worker, '123', { userId: 'user-42', status: 'active', progress: 40, meta: { type: 'character', startedAt: '2025-01-24T10:00:00Z' } })

  // curl -N -H "Authorization: Bearer YOUR_TOKEN" /api/v1/sse/jobs/character/JOB_ID
  const job = await openStream(`${api.url}/v1/jobs/123/stream`, { t, headers: { authorization: `Bearer ${owner}` } })
  t.equal(job.status, 200)
  // The page watching all of the user's jobs (/api/v1/sse/jobs/my).
  const myJobs = await openStream(`${api.url}/v1/jobs/stream?token=${owner}`, { t })
  await myJobs.nextEvent('connected')

  t.match(dataOf(await job.nextEvent('connected')), { jobId: '123' })
  t.match(dataOf(await job.nextEvent('initial_status')), { jobId: '123', status: 'active', progress: 40 })

  // sseService.broadcastJobUpdate(jobId, { status: 'active', progress: 60 })
  await putJobOk(worker, '123', { userId: 'user-42', status: 'active', progress: 60 })
  t.match(dataOf(await job.nextEvent('job_update')), { jobId: '123', status: 'active', progress: 60 })

  // Someone else cannot watch it, nor read it.
  t.equal((await openStream(`${api.url}/v1/jobs/123/stream`, { t, headers: { authorization: `Bearer ${userToken('user-7')}` } })).status, 404)
  t.equal((await request(`${api.url}/v1/jobs/123`, { token: userToken('user-7') })).status, 404)

  await putJobOk(worker, '123', { userId: 'user-42', status: 'completed', result: { characterId: 'abc123', displayId: 'char-123', name: 'Character Name' } })
  const completed = dataOf(await job.nextEvent('job_update'))
  t.match(completed, { jobId: '123', status: 'completed', progress: 100, result: { characterId: 'abc123', displayId: 'char-123', name: 'Character Name' } })
  // onComplete: the stream ends; the browser's reconnect would get 204 and stop.
  await job.waitEnd()
  const lastSeen = job.lastEventId
  t.equal((await openStream(`${api.url}/v1/jobs/123/stream`, { t, headers: { authorization: `Bearer ${owner}`, 'last-event-id': lastSeen } })).status, 204)

  // A media job fails.
  await putJobOk(worker, 'media-9', { userId: 'user-42', status: 'active', progress: 10 })
  await putJobOk(worker, 'media-9', { userId: 'user-42', status: 'failed', error: 'Error message' })
  t.equal((await putJob(worker, 'media-9', { userId: 'user-42', status: 'active' })).status, 409, 'a failed job takes no more updates')
  await myJobs.next((event) => event.event === 'job_update' && dataOf(event).status === 'failed')
  t.match(myJobs.events.filter((event) => event.event === 'job_update').map((event) => dataOf(event)), [
    { jobId: '123', status: 'active', progress: 60 },
    { jobId: '123', status: 'completed' },
    { jobId: 'media-9', status: 'active', progress: 10 },
    { jobId: 'media-9', status: 'failed', error: 'Error message' }
  ], "the user's job page follows every job")

  // What polling used to ask still answers.
  t.match((await request(`${api.url}/v1/jobs/123`, { token: owner })).json, { jobId: '123', status: 'completed', progress: 100 })
})

forEachMode(t, 'seed 002 (chat): header or query auth, events to a user and to a conversation\'s members, typing and presence, Last-Event-ID replay', async (t, mode) => {
  const [a, b] = await pair(t, mode, { PRESENCE_GRACE_MS: '300' })
  await setMembers(a, 'conv123', ['user123', 'user456'])

  // GET /sse/connect?token=YOUR_JWT_TOKEN
  const user456 = await eventSource(t, `${b.url}/v1/stream?token=${userToken('user456')}`)
  // Authorization: Bearer YOUR_JWT_TOKEN, and a second tab with X-Auth-Token.
  const bearer = await openStream(`${a.url}/v1/stream`, { t, headers: { authorization: `Bearer ${userToken('user123')}` } })
  const xAuth = await openStream(`${b.url}/v1/stream`, { t, headers: { 'x-auth-token': userToken('user123') } })
  for (const tab of [bearer, xAuth]) t.match(dataOf(await tab.nextEvent('connected')), { userId: 'user123' })

  // user:online - User came online.
  t.same(dataOf(await user456.stream.nextEvent('user:online')), { userId: 'user123' })

  // sendEventToUser('userId123', 'message:new', {...})
  const direct = { conversationId: 'conv123', message: { text: 'Hello!', senderId: 'user456' } }
  await publishOk(a.url, PUBLISHER, { to: { user: 'user123' }, event: 'message:new', data: direct })
  for (const tab of [bearer, xAuth]) t.same(dataOf(await tab.nextEvent('message:new')), direct)

  // await broadcastToConversation('conv123', 'message:new', {...})
  const message = { message: { id: 'msg789', text: 'Hello everyone!', senderId: 'user123', createdAt: new Date().toISOString() } }
  const [sent] = await publishOk(b.url, PUBLISHER, { to: { conversation: 'conv123' }, event: 'message:new', data: message })
  for (const tab of [bearer, xAuth, user456.stream]) {
    const event = await tab.nextEvent('message:new')
    t.equal(event.id, sent)
    t.match(event.raw, new RegExp(`^id: ${sent}\nevent: message:new\ndata: \\{`), 'id, event and data lines as the seed shows')
  }
  await publishOk(a.url, PUBLISHER, { to: { conversation: 'conv123' }, event: 'user:typing', data: { conversationId: 'conv123', userId: 'user123' } })
  t.match(dataOf(await user456.stream.nextEvent('user:typing')), { userId: 'user123' })

  // user456's connection drops; meanwhile the chat goes on.
  user456.stream.close()
  const missed = [
    (await publishOk(a.url, PUBLISHER, { to: { conversation: 'conv123' }, event: 'message:delivered', data: { messageId: 'msg789' } }))[0],
    (await publishOk(b.url, PUBLISHER, { to: { conversation: 'conv123' }, event: 'message:read', data: { messageId: 'msg789', userId: 'user123' } }))[0],
    (await publishOk(a.url, PUBLISHER, { to: { user: 'user456' }, event: 'conversation:updated', data: { conversationId: 'conv123', title: 'Team' } }))[0]
  ]
  // GET /sse/connect?token=... with Last-Event-ID: 123 (here: the last id it saw), on the other instance.
  const back = await openStream(`${a.url}/v1/stream?token=${userToken('user456')}`, { t, headers: { 'last-event-id': user456.stream.lastEventId } })
  await back.nextEvent('connected')
  const replayed = await back.take(3)
  t.same(replayed.map((event) => event.id), missed, 'the missed chat events, in order')

  // user:offline - User went offline (after PRESENCE_GRACE_MS).
  bearer.close()
  xAuth.close()
  t.same(dataOf(await back.nextEvent('user:offline', 5000)), { userId: 'user123' })
  t.same((await presence(b, 'user123')).online, false)
})

forEachMode(t, 'seed 003 (notifications): several tabs per user all get the event, send to one user or broadcast, metrics, admin dashboard and client page', async (t, mode) => {
  const [a, b] = await pair(t, mode)
  const gateways = mode === 'redis' ? [a, b] : [a]

  // Open the Client Page in several tabs.
  const tabs = [
    await eventSource(t, `${a.url}/v1/stream?token=${userToken('user-123')}`),
    await eventSource(t, `${b.url}/v1/stream?token=${userToken('user-123')}`),
    await eventSource(t, `${a.url}/v1/stream?token=${userToken('user-123')}`)
  ]
  const other = await eventSource(t, `${b.url}/v1/stream?token=${userToken('user-456')}`)

  // The Admin Dashboard and the client page are served.
  for (const path of ['/admin', '/demo']) {
    const page = await request(`${a.url}${path}`)
    t.equal(page.status, 200, `${path} is served`)
    t.match(page.headers.get('content-type') ?? '', /^text\/html/)
  }
  // The dashboard lists the connected clients.
  const listed = await request<{ connections: Array<{ userId: string }> }>(`${b.url}/v1/connections`, { token: ADMIN })
  t.same(listed.json.connections.map((connection) => connection.userId).sort(), ['user-123', 'user-123', 'user-123', 'user-456'])

  // sendEvent("user-123", "notification", { message: "Hello!", timestamp }) from the dashboard (admin token).
  const notification = { message: 'Hello!', timestamp: Date.now() }
  const [id] = await publishOk(b.url, ADMIN, { to: { user: 'user-123' }, event: 'notification', data: notification })
  for (const tab of tabs) {
    const event = await tab.stream.nextEvent('notification')
    t.equal(event.id, id)
    t.same(dataOf(event), notification)
  }
  t.same(namesOf(await settle(a, other.stream, other.connectionId)), [], 'another client does not get it')

  // broadcast("system-alert", { level: "warning", message: "Maintenance in 5 minutes" })
  const alert = { level: 'warning', message: 'Maintenance in 5 minutes', timestamp: Date.now() }
  const [alertId] = await publishOk(a.url, PUBLISHER, { to: { broadcast: true }, event: 'system-alert', data: alert })
  for (const tab of [...tabs, other]) t.equal((await tab.stream.nextEvent('system-alert')).id, alertId)

  // GET /api/sse/metrics: totalConnections, totalClients, averageConnectionsPerClient.
  const metrics = await stats(a)
  t.match(metrics, { connections: 4, users: 2, averageConnectionsPerUser: 2 })
  let gauge = 0
  for (const gateway of gateways) {
    const text = (await request(`${gateway.url}/metrics`)).text
    const match = /^sse_connections(?:\{[^}]*\})? (\d+)$/m.exec(text)
    t.ok(match, '/metrics shows the connections gauge')
    gauge += Number(match?.[1] ?? 0)
  }
  t.equal(gauge, 4, 'the instances\' gauges add up to every open stream')

  // A tab closes: cleanup shows in the metrics.
  tabs[0].stream.close()
  await eventually(async () => (await stats(b)).connections === 3, 'the closed tab to leave the counts')
  t.match(await stats(b), { connections: 3, users: 2, averageConnectionsPerUser: 1.5 })
})

forEachMode(t, 'seed 004 (topics): subscribe and unsubscribe topics on a live stream, broadcast to a topic, to a user and to all, stats with per-topic counts, health', async (t, mode) => {
  const [a, b] = await pair(t, mode)
  const clientToken = token({ sub: 'user-1' })

  // sseClient.connect(): new EventSource(`/api/sse/stream?token=${this.token}`)
  const client = await eventSource(t, `${b.url}/v1/stream?token=${clientToken}`)
  const neighbour = await eventSource(t, `${a.url}/v1/stream?token=${userToken('user-2')}`)
  // On `connected`: subscribeToTopics(['events', 'notifications']) with the x-auth-token header.
  const subscribed = await subscriptions(a, clientToken, 'POST', { topics: ['events', 'notifications'] })
  t.equal(subscribed.status, 200)
  t.same([...subscribed.json.topics].sort(), ['events', 'notifications'])
  t.same((await subscriptions(b, userToken('user-2'), 'POST', { topics: ['posts'] })).json.topics, ['posts'])

  // sse.broadcastToTopic('events', 'newEvent', { eventId, title, date })
  const newEvent = { eventId: 'e1', title: 'Park clean-up', date: '2025-06-01' }
  await publishOk(a.url, PUBLISHER, { to: { topic: 'events' }, event: 'newEvent', data: newEvent })
  t.same(dataOf(await client.stream.nextEvent('newEvent')), newEvent)
  await publishOk(b.url, PUBLISHER, { to: { topic: 'events' }, event: 'eventUpdate', data: { eventId: 123, status: 'started' } })
  t.same(dataOf(await client.stream.nextEvent('eventUpdate')), { eventId: 123, status: 'started' })
  t.same(namesOf(await settle(a, neighbour.stream, neighbour.connectionId)), [], 'a user subscribed to posts only gets no events topic')

  // sseService.sendToUser(userId, 'notification', {...}) and sseService.broadcast('announcement', {...})
  await publishOk(a.url, PUBLISHER, { to: { user: 'user-1' }, event: 'notification', data: { text: 'You have a new message', priority: 'high' } })
  t.match(dataOf(await client.stream.nextEvent('notification')), { priority: 'high' })
  await publishOk(b.url, PUBLISHER, { to: { broadcast: true }, event: 'announcement', data: { message: 'System maintenance in 10 minutes' } })
  for (const stream of [client.stream, neighbour.stream]) t.match(dataOf(await stream.nextEvent('announcement')), { message: String })

  // sseService.getStats(): { topics: { events: 1, notifications: 1, posts: 1 } }
  t.same((await stats(b)).topics, { events: 1, notifications: 1, posts: 1 })

  // POST /api/sse/unsubscribe { topics: ['events'] }
  const left = await subscriptions(b, clientToken, 'DELETE', { topics: ['events'] })
  t.same(left.json.topics, ['notifications'])
  await publishOk(a.url, PUBLISHER, { to: { topic: 'events' }, event: 'eventUpdate', data: { eventId: 123, status: 'ended' } })
  t.same(namesOf(await settle(a, client.stream, client.connectionId)), [], 'after unsubscribing, the events topic stops')
  await publishOk(a.url, PUBLISHER, { to: { topic: 'notifications' }, event: 'notification', data: { text: 'still here' } })
  t.match(dataOf(await client.stream.nextEvent('notification')), { text: 'still here' })
  t.same((await stats(a)).topics, { notifications: 1, posts: 1 })

  // GET /api/health
  const health = await request(`${a.url}/health`)
  t.equal(health.status, 200)
  t.same(health.json, { status: 'ok' })
})
