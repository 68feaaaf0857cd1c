/**
 * The benchmark's baseline: the SSE server a developer writes by hand with
 * node:http in an afternoon. Streams held in a Set per topic; POST /v1/publish
 * writes `id/event/data` to each subscriber in a loop, one `write` per
 * subscriber per event, before answering. Same wire format and routes as the
 * gateway for what the bench uses; no authentication (the token is ignored),
 * no history, no limits.
 *
 * It also answers `POST /bench/floor`, which measures the machine rather than
 * a server: see writeFloor.
 *
 * With REDIS_URL set, a publish goes through one Redis PUBLISH per event and
 * every instance writes it to its own subscribers (the minimal multi-instance
 * design), so scenario S4 has a baseline too.
 *
 *   PORT=3100 HOST=127.0.0.1 [REDIS_URL=redis://127.0.0.1:6379 REDIS_PREFIX=x:] node dist/bench/baseline-server.js
 */
import { createServer, type IncomingMessage, type ServerResponse } from 'node:http'
import Redis from 'ioredis'

const port = Number(process.env.PORT ?? 3100)
const host = process.env.HOST ?? '127.0.0.1'
const redisUrl = process.env.REDIS_URL
const prefix = process.env.REDIS_PREFIX ?? 'sse-baseline:'
const keepaliveMs = Number(process.env.KEEPALIVE_MS ?? 15000)

const byTopic = new Map<string, Set<ServerResponse>>()
/** Each topic's Redis subscription, settled once Redis has confirmed it. */
const subscriptions = new Map<string, Promise<unknown>>()
const streams = new Set<ServerResponse>()
let nextConnection = 0
let lastId = Date.now() * 1000

const publisher = redisUrl === undefined ? null : new Redis(redisUrl)
const subscriber = redisUrl === undefined ? null : new Redis(redisUrl)
subscriber?.on('messageBuffer', (channel: Buffer, message: Buffer) => {
  fanOut(channel.toString().slice(prefix.length), message)
})

function fanOut (topic: string, frame: Buffer): void {
  const set = byTopic.get(topic)
  if (set === undefined) return
  for (const res of set) res.write(frame)
}

function json (res: ServerResponse, status: number, body: unknown): void {
  const text = JSON.stringify(body)
  res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(text) })
  res.end(text)
}

function openStream (req: IncomingMessage, res: ServerResponse, url: URL): void {
  const topics = (url.searchParams.get('topics') ?? '').split(',').filter((topic) => topic !== '')
  res.writeHead(200, {
    'content-type': 'text/event-stream; charset=utf-8',
    'cache-control': 'no-cache, no-transform',
    'x-accel-buffering': 'no',
    connection: 'keep-alive'
  })
  const connectionId = `b_${++nextConnection}`
  streams.add(res)
  for (const topic of topics) {
    let set = byTopic.get(topic)
    if (set === undefined) {
      set = new Set()
      byTopic.set(topic, set)
      subscriptions.set(topic, subscriber?.subscribe(prefix + topic).catch(() => {}) ?? Promise.resolve())
    }
    set.add(res)
  }
  // `connected` only once Redis delivers the topics here: an event published
  // right after it would otherwise be missed (Redis mode).
  void Promise.all(topics.map(async (topic) => await subscriptions.get(topic))).then(() => {
    res.write(`retry: 3000\n\nevent: connected\ndata: ${JSON.stringify({ connectionId, topics })}\n\n`)
  })
  req.on('close', () => {
    streams.delete(res)
    for (const topic of topics) {
      const set = byTopic.get(topic)
      if (set === undefined) continue
      set.delete(res)
      if (set.size === 0) {
        byTopic.delete(topic)
        subscriptions.delete(topic)
        subscriber?.unsubscribe(prefix + topic).catch(() => {})
      }
    }
  })
}

function publish (req: IncomingMessage, res: ServerResponse): void {
  const chunks: Buffer[] = []
  req.on('data', (chunk: Buffer) => chunks.push(chunk))
  req.on('end', () => {
    let body: { to?: { topic?: unknown }, event?: unknown, data?: unknown }
    try {
      body = JSON.parse(Buffer.concat(chunks).toString('utf8')) as typeof body
    } catch {
      json(res, 400, { statusCode: 400, error: 'Bad Request', message: 'invalid JSON' })
      return
    }
    const topic = body.to?.topic
    if (typeof topic !== 'string' || body.data === undefined) {
      json(res, 400, { statusCode: 400, error: 'Bad Request', message: 'needs to.topic and data' })
      return
    }
    const event = typeof body.event === 'string' ? body.event : 'message'
    const data = typeof body.data === 'string' ? body.data : JSON.stringify(body.data)
    const id = ++lastId
    const lines = data.split(/\r\n|\r|\n/).map((line) => `data: ${line}\n`).join('')
    const frame = Buffer.from(`id: ${id}\n${event === 'message' ? '' : `event: ${event}\n`}${lines}\n`)
    if (publisher === null) {
      fanOut(topic, frame)
      json(res, 202, { id: String(id) })
      return
    }
    publisher.publish(prefix + topic, frame).then(
      () => json(res, 202, { id: String(id) }),
      () => json(res, 503, { statusCode: 503, error: 'Service Unavailable', message: 'redis' })
    )
  })
}

/**
 * The loopback write floor: what one bare `socket.write` to every open stream
 * costs on this machine, with nothing around it (no framing per recipient, no
 * routing, no bookkeeping). Each pass writes one SSE comment, which clients
 * ignore, the size of an event, as one HTTP chunk on each stream's socket, and
 * is timed in CPU and wall time. A server that writes once per subscriber per
 * event cannot fan an event out faster than one such pass.
 */
async function writeFloor (res: ServerResponse, url: URL): Promise<void> {
  const passes = Math.min(20, Math.max(1, Number(url.searchParams.get('passes') ?? 5) || 5))
  const bytes = Math.min(4096, Math.max(8, Number(url.searchParams.get('bytes') ?? 100) || 100))
  const comment = `: ${'f'.repeat(bytes - 4)}\n\n`
  const chunk = Buffer.from(`${Buffer.byteLength(comment).toString(16)}\r\n${comment}\r\n`)
  const sockets = [...streams].flatMap((stream) => stream.socket === null || stream.socket.destroyed ? [] : [stream.socket])
  const results: Array<{ cpuUsPerWrite: number, wallMs: number }> = []
  for (let pass = 0; pass < passes && sockets.length > 0; pass++) {
    // The client reads the previous pass meanwhile, so no socket is backed up.
    await new Promise((resolve) => setTimeout(resolve, 50))
    const cpuBefore = process.cpuUsage()
    const wallBefore = performance.now()
    for (const socket of sockets) socket.write(chunk)
    const wallMs = performance.now() - wallBefore
    const cpu = process.cpuUsage(cpuBefore)
    results.push({ cpuUsPerWrite: (cpu.user + cpu.system) / sockets.length, wallMs })
  }
  json(res, 200, { writes: sockets.length, chunkBytes: chunk.length, passes: results })
}

const server = createServer((req, res) => {
  const url = new URL(req.url ?? '/', 'http://localhost')
  if (req.method === 'GET' && url.pathname === '/v1/stream') return openStream(req, res, url)
  if (req.method === 'POST' && url.pathname === '/v1/publish') return publish(req, res)
  if (req.method === 'POST' && url.pathname === '/bench/floor') {
    writeFloor(res, url).catch((error: unknown) => json(res, 500, { statusCode: 500, error: 'Internal Server Error', message: String(error) }))
    return
  }
  if (req.method === 'GET' && url.pathname === '/health') return json(res, 200, { status: 'ok' })
  if (req.method === 'GET' && url.pathname === '/stats') {
    return json(res, 200, { connections: streams.size, handles: process.getActiveResourcesInfo().length, heapUsed: process.memoryUsage().heapUsed })
  }
  json(res, 404, { statusCode: 404, error: 'Not Found', message: 'not found' })
})

const keepalive = setInterval(() => {
  for (const res of streams) res.write(': keepalive\n\n')
}, keepaliveMs)
keepalive.unref()

server.listen(port, host)

function shutdown (): void {
  for (const res of streams) res.end()
  server.close()
  publisher?.disconnect()
  subscriber?.disconnect()
  setTimeout(() => process.exit(0), 200).unref()
}
process.on('SIGTERM', shutdown)
process.on('SIGINT', shutdown)
