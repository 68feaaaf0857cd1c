/**
 * Jobs (seed 001): PUT /v1/jobs/:jobId stores state and emits `job_update`;
 * GET /v1/jobs/:jobId/stream sends `connected`, `initial_status`, the updates
 * and closes after the terminal one; 204 for a reconnect at or past it;
 * GET /v1/jobs/stream carries all of a user's jobs. Every test runs in
 * embedded and Redis mode; in Redis mode the worker and the browser talk to
 * different instances.
 */
import t, { type Test } from 'tap'
import { eventually, request, userToken, type SseClient } from './helpers'
import type { Gateway } from './helpers/gateway'
import { ADMIN, dataOf, increasing, pair, putJob, putJobOk, PUBLISHER } from './helpers/channels'
import { forEachMode } from './helpers/modes'
import { openStream } from './helpers/sse'
import { needRedis, redisClient, uniquePrefix } from './helpers/redis'
import { proxiedCluster } from './helpers/proxy'

interface JobEvent {
  jobId: string
  status: string
  progress: number
  result?: unknown
  error?: string
  updatedAt: string
}

/** The job stream as a browser opens it with a header token (seed 001's curl). */
async function jobStream (t: Test, gateway: Gateway, jobId: string, user: string, lastEventId?: string, path = `/v1/jobs/${jobId}/stream`): Promise<SseClient> {
  const headers: Record<string, string> = { authorization: `Bearer ${userToken(user)}` }
  if (lastEventId !== undefined) headers['last-event-id'] = lastEventId
  return await openStream(`${gateway.url}${path}`, { t, headers })
}

async function getJob (gateway: Gateway, jobId: string, token: string): Promise<{ status: number, json: Record<string, unknown> }> {
  return await request<Record<string, unknown>>(`${gateway.url}/v1/jobs/${jobId}`, { token })
}

forEachMode(t, 'a job stream sends connected, initial_status, each job_update, and closes after the terminal update', async (t, mode) => {
  const [worker, browser] = await pair(t, mode)
  const queued = await putJobOk(worker, 'job-1', { userId: 'alice', status: 'queued', meta: { kind: 'character' } })
  t.match(queued, { jobId: 'job-1', userId: 'alice', status: 'queued', progress: 0, meta: { kind: 'character' }, createdAt: String, updatedAt: String })

  const stream = await jobStream(t, browser, 'job-1', 'alice')
  t.equal(stream.status, 200)
  t.equal(stream.headers['content-type'], 'text/event-stream; charset=utf-8')
  const connected = await stream.nextEvent('connected')
  t.equal(connected.id, undefined, 'connected carries no id')
  t.match(dataOf(connected), { connectionId: /^c_/, userId: 'alice', jobId: 'job-1' })
  t.same(stream.retries, [3000], 'a job stream gets retry: like any stream')
  const initial = await stream.nextEvent('initial_status')
  t.match(initial.id, /^\d+$/, 'initial_status carries the id of the update it reflects')
  t.match(dataOf(initial), { jobId: 'job-1', userId: 'alice', status: 'queued', progress: 0 })

  await putJobOk(worker, 'job-1', { userId: 'alice', status: 'active', progress: 40 })
  await putJobOk(browser, 'job-1', { userId: 'alice', status: 'active', progress: 60 })
  const done = await putJobOk(worker, 'job-1', { userId: 'alice', status: 'completed', result: { characterId: 'abc123', name: 'Character Name' } })
  t.match(done, { status: 'completed', progress: 100, result: { characterId: 'abc123' } })

  const updates = [await stream.nextEvent('job_update'), await stream.nextEvent('job_update'), await stream.nextEvent('job_update')]
  t.match(updates.map((event) => dataOf<JobEvent>(event)), [
    { jobId: 'job-1', status: 'active', progress: 40, updatedAt: String },
    { jobId: 'job-1', status: 'active', progress: 60 },
    { jobId: 'job-1', status: 'completed', progress: 100, result: { characterId: 'abc123', name: 'Character Name' } }
  ])
  t.ok(increasing([initial.id, ...updates.map((event) => event.id)]), 'ids increase from initial_status on')
  t.equal(initial.id, queued.eventId, 'a PUT answers the id of the job_update it emitted')
  t.equal(updates[2].id, done.eventId)
  await stream.waitEnd()
  t.pass('the stream closed after the terminal update')
  t.same(stream.events.map((event) => event.event), ['connected', 'initial_status', 'job_update', 'job_update', 'job_update'])
})

forEachMode(t, 'a job stream closes after a failed update too, carrying the error', async (t, mode) => {
  const [worker, browser] = await pair(t, mode)
  await putJobOk(worker, 'job-f', { userId: 'alice', status: 'active', progress: 10 })
  const stream = await jobStream(t, browser, 'job-f', 'alice')
  t.match(dataOf(await stream.nextEvent('initial_status')), { status: 'active', progress: 10 })
  await putJobOk(worker, 'job-f', { userId: 'alice', status: 'failed', error: 'Error message' })
  t.match(dataOf(await stream.nextEvent('job_update')), { jobId: 'job-f', status: 'failed', error: 'Error message' })
  await stream.waitEnd()
  t.pass('closed after failed')
})

forEachMode(t, 'a finished job opened without a cursor: connected, initial_status, then close; a reconnect at or after the terminal update gets 204', async (t, mode) => {
  const [worker, browser] = await pair(t, mode)
  await putJobOk(worker, 'job-2', { userId: 'alice', status: 'active', progress: 50 })
  const watching = await jobStream(t, browser, 'job-2', 'alice')
  const before = await watching.nextEvent('initial_status')
  await putJobOk(worker, 'job-2', { userId: 'alice', status: 'completed', result: { url: '/x' } })
  const terminal = await watching.nextEvent('job_update')
  await watching.waitEnd()
  const terminalId = terminal.id ?? ''

  const finished = await jobStream(t, worker, 'job-2', 'alice')
  t.equal(finished.status, 200)
  await finished.waitEnd()
  t.same(finished.events.map((event) => event.event), ['connected', 'initial_status'], 'connected, initial_status, close')
  const initial = finished.events[1]
  t.equal(initial.id, terminalId, 'initial_status carries the terminal update\'s id')
  t.match(dataOf(initial), { jobId: 'job-2', status: 'completed', progress: 100, result: { url: '/x' } })

  // The browser reconnects with the id it last saw: the job has nothing more to say.
  for (const cursor of [terminalId, String(BigInt(terminalId) + 1n)]) {
    const again = await jobStream(t, mode === 'redis' ? browser : worker, 'job-2', 'alice', cursor)
    t.equal(again.status, 204, `Last-Event-ID ${cursor === terminalId ? 'at' : 'after'} the terminal update: 204`)
    t.equal(again.text, '', '204 has no body')
  }
  const query = await openStream(`${browser.url}/v1/jobs/job-2/stream?token=${userToken('alice')}&lastEventId=${terminalId}`, { t })
  t.equal(query.status, 204, 'the lastEventId query works the same')

  const earlier = await jobStream(t, browser, 'job-2', 'alice', before.id)
  t.equal(earlier.status, 200, 'a cursor before the terminal update opens the stream')
  await earlier.waitEnd()
  t.same(earlier.events.map((event) => [event.event, event.id]), [['connected', undefined], ['initial_status', terminalId]], 'which shows the final state and closes')
})

forEachMode(t, 'GET /v1/jobs/:jobId: the owner and a publisher see the stored state; another user and an unknown job get 404', async (t, mode) => {
  const [worker, browser] = await pair(t, mode)
  await putJobOk(worker, 'job-3', { userId: 'alice', status: 'active', progress: 30, meta: { step: 'render' } })
  const own = await getJob(browser, 'job-3', userToken('alice'))
  t.equal(own.status, 200)
  t.match(own.json, { jobId: 'job-3', userId: 'alice', status: 'active', progress: 30, meta: { step: 'render' }, createdAt: String, updatedAt: String })
  t.equal((await getJob(browser, 'job-3', PUBLISHER)).status, 200, 'a publisher may read any job')

  const foreign = await getJob(browser, 'job-3', userToken('mallory'))
  t.equal(foreign.status, 404, "another user's job is 404")
  t.match(foreign.json, { statusCode: 404, error: 'Not Found', message: String })
  t.equal((await getJob(browser, 'no-such-job', userToken('alice'))).status, 404, 'an unknown job is 404')
  t.equal((await getJob(browser, 'job-3', '')).status, 401, 'no token: 401')
})

forEachMode(t, "another user's job stream and an unknown job's stream are 404; the owner's job updates never reach another user", async (t, mode) => {
  const [worker, browser] = await pair(t, mode)
  await putJobOk(worker, 'job-4', { userId: 'alice', status: 'active', progress: 5 })
  const foreign = await jobStream(t, browser, 'job-4', 'mallory')
  t.equal(foreign.status, 404)
  t.match(foreign.json(), { statusCode: 404, error: 'Not Found' })
  t.equal((await jobStream(t, browser, 'nope', 'alice')).status, 404)

  const malloryJobs = await jobStream(t, browser, '', 'mallory', undefined, '/v1/jobs/stream')
  await putJobOk(worker, 'job-4', { userId: 'alice', status: 'active', progress: 50 })
  await putJobOk(worker, 'mallory-job', { userId: 'mallory', status: 'queued' })
  const own = await malloryJobs.nextEvent('job_update')
  t.equal(dataOf<JobEvent>(own).jobId, 'mallory-job', "mallory's job stream shows only her own job")
})

forEachMode(t, 'job updates are validated: a job named "stream", a bad status or progress are 400; a user token is 403', async (t, mode) => {
  const [worker] = await pair(t, mode)
  const named = await putJob(worker, 'stream', { userId: 'alice', status: 'queued' })
  t.equal(named.status, 400, 'a job may not be named "stream"')
  t.match(named.json, { statusCode: 400, error: 'Bad Request', message: String })
  const cases: Array<[string, Record<string, unknown>]> = [
    ['an unknown status', { userId: 'alice', status: 'done' }],
    ['progress above 100', { userId: 'alice', status: 'active', progress: 101 }],
    ['negative progress', { userId: 'alice', status: 'active', progress: -1 }],
    ['no userId', { status: 'queued' }],
    ['an unknown field', { userId: 'alice', status: 'queued', owner: 'bob' }],
    ['a non-string error', { userId: 'alice', status: 'failed', error: { message: 'x' } }]
  ]
  for (const [what, body] of cases) t.equal((await putJob(worker, 'job-5', body)).status, 400, `${what}: 400`)
  t.equal((await getJob(worker, 'job-5', PUBLISHER)).status, 404, 'nothing was stored')
  t.equal((await putJob(worker, 'job-5', { userId: 'alice', status: 'queued' }, userToken('alice'))).status, 403, 'a user may not PUT jobs')
})

forEachMode(t, '409 for a PUT naming another owner and for any update after completed or failed; nothing is emitted', async (t, mode) => {
  const [worker, browser] = await pair(t, mode)
  const aliceJobs = await jobStream(t, browser, '', 'alice', undefined, '/v1/jobs/stream')
  const bobJobs = await jobStream(t, browser, '', 'bob', undefined, '/v1/jobs/stream')

  await putJobOk(worker, 'job-6', { userId: 'alice', status: 'active', progress: 10 })
  const stolen = await putJob(browser, 'job-6', { userId: 'bob', status: 'active', progress: 20 })
  t.equal(stolen.status, 409, 'the owner is fixed at creation')
  t.match(stolen.json, { statusCode: 409, error: 'Conflict', message: String })
  t.match((await getJob(worker, 'job-6', PUBLISHER)).json, { userId: 'alice', progress: 10 }, 'the state is unchanged')

  await putJobOk(worker, 'job-6', { userId: 'alice', status: 'completed' })
  await putJobOk(worker, 'job-7', { userId: 'alice', status: 'failed', error: 'boom' })
  for (const [jobId, status] of [['job-6', 'active'], ['job-6', 'completed'], ['job-7', 'active'], ['job-7', 'failed']] as const) {
    const late = await putJob(browser, jobId, { userId: 'alice', status, progress: 99 })
    t.equal(late.status, 409, `${status} after the job ended: 409`)
  }
  t.match((await getJob(worker, 'job-6', PUBLISHER)).json, { status: 'completed', progress: 100 })
  t.match((await getJob(worker, 'job-7', PUBLISHER)).json, { status: 'failed', error: 'boom' })

  // Markers: a refused update emitted nothing before them.
  await putJobOk(worker, 'marker-a', { userId: 'alice', status: 'queued' })
  await putJobOk(worker, 'marker-b', { userId: 'bob', status: 'queued' })
  await aliceJobs.next((event) => event.data.includes('"marker-a"'))
  await bobJobs.next((event) => event.data.includes('"marker-b"'))
  t.same(aliceJobs.events.filter((event) => event.event === 'job_update').map((event) => [dataOf<JobEvent>(event).jobId, dataOf<JobEvent>(event).status]),
    [['job-6', 'active'], ['job-6', 'completed'], ['job-7', 'failed'], ['marker-a', 'queued']])
  t.same(bobJobs.events.filter((event) => event.event === 'job_update').map((event) => dataOf<JobEvent>(event).jobId), ['marker-b'], 'the refused PUT reached no one')
})

forEachMode(t, 'many workers updating one job at once, on both instances: every update is applied (none 409 for the race), each emitted once, and the terminal one ends the stream', async (t, mode) => {
  const [worker, browser] = await pair(t, mode)
  await putJobOk(worker, 'hot', { userId: 'alice', status: 'active', progress: 0 })
  const stream = await jobStream(t, browser, 'hot', 'alice')
  await stream.nextEvent('initial_status')
  const count = 60
  const answers = await Promise.all(Array.from({ length: count }, async (_, n) =>
    await putJob(n % 2 === 0 ? worker : browser, 'hot', { userId: 'alice', status: 'active', progress: n + 1 })))
  const statuses = answers.map((answer) => answer.status)
  t.same(statuses.filter((status) => status !== 200), [], `all ${count} concurrent updates answered 200 (${answers.find((answer) => answer.status !== 200)?.text ?? ''})`)
  const done = await putJobOk(worker, 'hot', { userId: 'alice', status: 'completed' })
  await stream.waitEnd()
  const updates = stream.events.filter((event) => event.event === 'job_update')
  t.equal(updates.length, count + 1, 'each update emitted once, then the terminal one')
  t.equal(updates.at(-1)?.id, done.eventId, 'the terminal update last')
  t.ok(increasing(updates.map((event) => event.id)), 'ids increase')
})

t.test('Redis mode: updates of one job past the 64 an instance holds are answered 503 at once while Redis has not answered; those held are then applied in turn', async (t) => {
  if (!(await needRedis(t))) return
  const { proxy, viaProxy } = await proxiedCluster(t, { REDIS_PREFIX: uniquePrefix('jobbound') })
  t.teardown(() => proxy.cut())
  await putJobOk(viaProxy, 'crowded', { userId: 'alice', status: 'active', progress: 0 })
  // The first update's read of the job gets no answer: it and the 63 behind
  // it wait, and nothing else can answer but a refusal.
  proxy.holdReplies('sse-gateway')
  const answered: number[] = []
  const updates = Array.from({ length: 80 }, async (_, n) => {
    const answer = await putJob(viaProxy, 'crowded', { userId: 'alice', status: 'active', progress: n + 1 })
    answered.push(answer.status)
    return answer
  })
  await eventually(() => answered.length >= 16, 'the updates past the bound to be answered', 10_000, 10)
  t.same(answered, Array(16).fill(503), 'the 16 past the bound answered 503 while the others wait on Redis')
  proxy.releaseReplies('sse-gateway')
  const answers = await Promise.all(updates)
  const refused = answers.filter((answer) => answer.status === 503)
  t.equal(refused.length, 16, 'no other update refused')
  t.equal(answers.filter((answer) => answer.status === 200).length, 64, 'the 64 held are applied')
  t.match(refused[0].headers.get('retry-after'), /^\d+$/, 'a refusal says when to retry')
  t.match(refused[0].json, { statusCode: 503, error: 'Service Unavailable', message: /too many at once/ })
  const applied = answers.filter((answer) => answer.status === 200).map((answer) => answer.json)
  const last = applied.reduce((latest, state) => BigInt(state.eventId ?? 0) > BigInt(latest.eventId ?? 0) ? state : latest)
  t.match((await getJob(viaProxy, 'crowded', PUBLISHER)).json, { progress: last.progress }, 'the job is as the last update applied left it')
})

forEachMode(t, 'GET /v1/jobs/stream carries every job of the user, stays open after one ends, and shows no one else\'s', async (t, mode) => {
  const [worker, browser] = await pair(t, mode)
  const stream = await jobStream(t, browser, '', 'alice', undefined, '/v1/jobs/stream')
  t.equal(stream.status, 200)
  await stream.nextEvent('connected')
  await putJobOk(worker, 'j-a', { userId: 'alice', status: 'queued' })
  await putJobOk(worker, 'j-b', { userId: 'alice', status: 'active', progress: 20 })
  await putJobOk(worker, 'j-c', { userId: 'bob', status: 'active', progress: 70 })
  await putJobOk(browser, 'j-a', { userId: 'alice', status: 'completed', result: 1 })
  await putJobOk(worker, 'j-b', { userId: 'alice', status: 'failed', error: 'no' })
  await putJobOk(worker, 'j-d', { userId: 'alice', status: 'queued' })
  await stream.next((event) => event.event === 'job_update' && dataOf<JobEvent>(event).jobId === 'j-d')
  const updates = stream.events.filter((event) => event.event === 'job_update')
  t.same(updates.map((event) => [dataOf<JobEvent>(event).jobId, dataOf<JobEvent>(event).status]),
    [['j-a', 'queued'], ['j-b', 'active'], ['j-a', 'completed'], ['j-b', 'failed'], ['j-d', 'queued']], 'all of alice\'s jobs, in order, none of bob\'s')
  t.ok(increasing(updates.map((event) => event.id)))
  t.notOk(stream.ended, 'still open after jobs ended')
})

forEachMode(t, 'a job stream counts as a stream: GET /v1/stats sees it while it is open', async (t, mode) => {
  const [worker, browser] = await pair(t, mode)
  await putJobOk(worker, 'job-8', { userId: 'alice', status: 'active' })
  const stream = await jobStream(t, browser, 'job-8', 'alice')
  await stream.nextEvent('initial_status')
  const answer = await request<{ connections: number, users: number }>(`${worker.url}/v1/stats`, { token: ADMIN })
  t.match(answer.json, { connections: 1, users: 1 })
})

forEachMode(t, 'finished job state is forgotten JOB_TTL_S after its last update', async (t, mode) => {
  const [worker, browser] = await pair(t, mode, { JOB_TTL_S: '1' })
  await putJobOk(worker, 'job-9', { userId: 'alice', status: 'completed' })
  t.equal((await getJob(browser, 'job-9', userToken('alice'))).status, 200)
  await eventually(async () => (await getJob(browser, 'job-9', userToken('alice'))).status === 404, 'the job to expire', 5000, 100)
  t.equal((await jobStream(t, browser, 'job-9', 'alice')).status, 404, 'its stream is gone too')
  t.equal((await putJob(worker, 'job-9', { userId: 'bob', status: 'queued' })).status, 200, 'the id may be reused')
})

forEachMode(t, 'a job id reused by another owner after it expired: the first owner\'s open stream of its jobs hears nothing of the new job', async (t, mode) => {
  // Keepalives mark the end of what a stream was sent: all bytes before one have arrived.
  const [worker, browser] = await pair(t, mode, { JOB_TTL_S: '1', KEEPALIVE_MS: '200' })
  const alice = await jobStream(t, browser, 'stream', 'alice', undefined, '/v1/jobs/stream')
  await alice.nextEvent('connected')
  await putJobOk(worker, 'reused', { userId: 'alice', status: 'completed', result: { mine: 'alice-data' } })
  await alice.nextEvent('job_update')
  await eventually(async () => (await getJob(browser, 'reused', userToken('alice'))).status === 404, 'the job to expire', 5000, 100)

  const bob = await jobStream(t, browser, 'stream', 'bob', undefined, '/v1/jobs/stream')
  await bob.nextEvent('connected')
  await putJobOk(worker, 'reused', { userId: 'bob', status: 'active', progress: 50, result: { secret: 'bob-data' } })
  t.match(dataOf<JobEvent>(await bob.nextEvent('job_update')), { jobId: 'reused', result: { secret: 'bob-data' } }, 'the new owner hears of it')
  const keepalives = alice.comments.length
  await alice.until(() => alice.comments.length > keepalives, 5000, 'a keepalive after the update')
  t.equal(alice.events.filter((event) => event.event === 'job_update').length, 1, 'the first owner got none of the new owner\'s updates')
  t.notOk(alice.text.includes('bob-data'), 'nor any of its data')
})

forEachMode(t, 'an unfinished job is kept past JOB_TTL_S without an update (it may wait in a queue); finished ones are not', async (t, mode) => {
  const [worker, browser] = await pair(t, mode, { JOB_TTL_S: '1' })
  await putJobOk(worker, 'waiting', { userId: 'alice', status: 'queued' })
  await putJobOk(worker, 'running', { userId: 'alice', status: 'active', progress: 40 })
  // Put after the two: once it has expired, so would they have under JOB_TTL_S.
  await putJobOk(worker, 'done', { userId: 'alice', status: 'failed', error: 'boom' })
  await eventually(async () => (await getJob(browser, 'done', userToken('alice'))).status === 404, 'the finished job to expire', 5000, 100)
  t.equal((await getJob(browser, 'waiting', userToken('alice'))).status, 200, 'the queued job is still there')
  t.equal((await getJob(browser, 'running', userToken('alice'))).status, 200, 'the active job is still there')
  const stream = await jobStream(t, browser, 'running', 'alice')
  t.equal(stream.status, 200, 'its stream opens')
  t.match(dataOf<JobEvent>(await stream.nextEvent('initial_status')), { status: 'active', progress: 40 })
  await putJobOk(worker, 'running', { userId: 'alice', status: 'completed' })
  t.match(dataOf<JobEvent>(await stream.nextEvent('job_update')), { status: 'completed' }, 'and gets the terminal update')
  if (mode === 'redis') {
    const ttl = await redisClient(t).ttl(`${worker.app.config.redisPrefix}job:waiting`)
    t.ok(ttl > 86400 && ttl <= 30 * 86400, `the queued job is still bounded in Redis (${ttl} s)`)
  }
})

forEachMode(t, 'a job\'s whole state is bounded by MAX_EVENT_BYTES: an update that would carry it past is 413, emits nothing, changes nothing', async (t, mode) => {
  const [worker, browser] = await pair(t, mode, { MAX_EVENT_BYTES: '400' })
  const aliceJobs = await jobStream(t, browser, '', 'alice', undefined, '/v1/jobs/stream')
  // Each update is under the limit; the state keeps `result` and `meta` from
  // earlier ones and is sent whole as initial_status.
  await putJobOk(worker, 'job-big', { userId: 'alice', status: 'active', result: 'r'.repeat(200) })
  const tooLarge = await putJob(worker, 'job-big', { userId: 'alice', status: 'active', meta: 'm'.repeat(200) })
  t.equal(tooLarge.status, 413)
  t.match(tooLarge.json, { statusCode: 413, message: /job-big/ })
  t.notOk('meta' in (await getJob(worker, 'job-big', PUBLISHER)).json, 'the state is unchanged')
  await putJobOk(worker, 'job-big', { userId: 'alice', status: 'completed', meta: 'small' })
  const stream = await jobStream(t, browser, 'job-big', 'alice')
  const initial = await stream.next((event) => event.event === 'initial_status')
  t.ok(Buffer.byteLength(initial.data) <= 400, `initial_status carries ${Buffer.byteLength(initial.data)} bytes, within the limit`)
  t.match(dataOf<JobEvent>(initial), { status: 'completed', meta: 'small' })
  await aliceJobs.next((event) => event.event === 'job_update' && dataOf<JobEvent>(event).status === 'completed')
  t.same(aliceJobs.events.filter((event) => event.event === 'job_update').map((event) => dataOf<JobEvent>(event).status), ['active', 'completed'], 'the refused update reached no one')
})

forEachMode(t, 'a job stream whose cursor no history could have issued (malformed, from the future) gets reset right after connected, then initial_status', async (t, mode) => {
  const [worker, browser] = await pair(t, mode)
  const job = await putJobOk(worker, 'job-c', { userId: 'alice', status: 'active', progress: 5 })
  const jobEventId = job.eventId ?? ''
  const future = String(BigInt(jobEventId) + 5_000_000n)
  for (const [cursor, reason] of [[future, 'future'], ['abc', 'malformed']] as const) {
    const stream = await jobStream(t, browser, 'job-c', 'alice', cursor)
    await stream.nextEvent('initial_status')
    t.same(stream.events.map((event) => event.event), ['connected', 'reset', 'initial_status'], `${reason}: reset between connected and initial_status`)
    t.same(dataOf(stream.events[1]), { reason })
    stream.close()
  }
  // A cursor the history issued needs no reset: the snapshot covers it.
  const current = await jobStream(t, browser, 'job-c', 'alice', jobEventId)
  await current.nextEvent('initial_status')
  t.same(current.events.map((event) => event.event), ['connected', 'initial_status'], 'an issued cursor: no reset')
})
