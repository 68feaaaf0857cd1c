/**
 * A stream keeps nothing of the request that opened it: a browser's URL
 * carries its token (EventSource cannot send headers), and a stream lives
 * for hours. Nor does a job or a conversation keep the URL of the request
 * that named it, where a publisher may have put its token. V8 makes a substring of 13 characters or more a view into the
 * string it was cut from, so a path id or a topic kept as parsed would keep
 * the whole URL alive. Checked in a heap snapshot of this process.
 */
import t from 'tap'
import { getHeapSnapshot } from 'node:v8'
import { publisherToken, startGateway, userToken } from './helpers'
import { putJobOk } from './helpers/channels'
import { rawConnect, type RawClient } from './helpers/raw'

/** Whether a heap snapshot of this process holds `needle` in a string; searched as bytes, so that the search adds no string of its own. */
async function heapHolds (needle: Buffer): Promise<boolean> {
  let tail = Buffer.alloc(0)
  for await (const chunk of getHeapSnapshot()) {
    const window = Buffer.concat([tail, chunk as Buffer])
    if (window.includes(needle)) return true
    tail = window.subarray(Math.max(0, window.length - needle.length))
  }
  return false
}

/**
 * Opens `path` with the token in the query. The token lives here only as
 * bytes, never as a string this test keeps, so a snapshot that holds it holds
 * the gateway's copy.
 */
async function openWithTokenInUrl (t: Parameters<typeof rawConnect>[0], port: number, path: string, token: Buffer): Promise<RawClient> {
  const client = await rawConnect(t, port)
  const separator = path.includes('?') ? '&' : '?'
  client.write(Buffer.concat([
    Buffer.from(`GET ${path}${separator}token=`),
    token,
    Buffer.from(' HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n')
  ]))
  await client.until(() => client.events().some((event) => event.event === 'connected'), 5000, 'the connected event')
  return client
}

/** Sends `method path?token=…` with a JSON body and waits for the whole answer, the token kept as bytes only. */
async function sendWithTokenInUrl (t: Parameters<typeof rawConnect>[0], port: number, method: string, path: string, token: Buffer, body: object): Promise<number> {
  const client = await rawConnect(t, port)
  const json = JSON.stringify(body)
  client.write(Buffer.concat([
    Buffer.from(`${method} ${path}?token=`),
    token,
    Buffer.from(` HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: ${Buffer.byteLength(json)}\r\n\r\n${json}`)
  ]))
  await client.until(() => client.response().complete, 5000, 'the answer')
  const { status } = client.response()
  client.destroy()
  return status
}

const IN_CHILD = 'RETENTION_TEST_IN_CHILD'

if (process.env[IN_CHILD] === undefined) {
  // The test runner's preload makes a heap snapshot of its processes take
  // ≈ 30 s; in a plain node, with the same gateway, ≈ 2 s. (env(1) runs it:
  // the runner puts its preload back into any node it sees spawned.)
  t.spawn('env', ['-u', 'NODE_OPTIONS', process.execPath, __filename], { env: { ...process.env, [IN_CHILD]: '1' } }, 'in a node without the runner\'s preload')
} else {
  t.test('a stream opened with its token in the URL keeps neither the URL nor the token', async (t) => {
    const { port } = await startGateway(t)
    const first = await openWithTokenInUrl(t, port, '/v1/stream', Buffer.from(userToken('u-retention')))
    const connectionId = String(JSON.parse(first.events().find((event) => event.event === 'connected')?.data ?? '{}').connectionId)
    first.destroy()

    // A reopen by path id, with topics long enough to be cut as views.
    const token = Buffer.from(userToken('u-retention'))
    const reopened = await openWithTokenInUrl(t, port, `/v1/stream/${connectionId}?topics=retention-topic-one,retention-topic-two`, token)
    t.notOk(reopened.closed, 'the reopened stream is open')
    t.equal(await heapHolds(token), false, 'no string in the heap holds the token')
  })

  t.test('a job stream opened with its token in the URL keeps neither the URL nor the token', async (t) => {
    const gateway = await startGateway(t)
    const { port } = gateway
    const jobId = 'job-retention-0001'
    await putJobOk(gateway, jobId, { userId: 'u-retention', status: 'active', progress: 40 })
    const token = Buffer.from(userToken('u-retention'))
    const stream = await openWithTokenInUrl(t, port, `/v1/jobs/${jobId}/stream`, token)
    t.notOk(stream.closed, 'the job stream is open')
    t.equal(await heapHolds(token), false, 'no string in the heap holds the token')
  })

  t.test('a job and a conversation named in a URL that carries a publisher token keep neither the URL nor the token', async (t) => {
    const { port } = await startGateway(t)
    const token = Buffer.from(publisherToken())
    t.equal(await sendWithTokenInUrl(t, port, 'PUT', '/v1/jobs/job-retention-by-publisher', token, { userId: 'u-retention', status: 'active' }), 200, 'the job is stored')
    t.equal(await sendWithTokenInUrl(t, port, 'PUT', '/v1/conversations/conversation-retention/members', token, { members: ['u-retention', 'u-other'] }), 200, 'the members are stored')
    t.equal(await heapHolds(token), false, 'no string in the heap holds the token')
  })
}
