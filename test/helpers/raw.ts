/**
 * Below the HTTP client: a raw TCP client that writes its request by hand and
 * reads (or does not read) the answer, for what a well-behaved client cannot
 * show (a reader that never reads, oversized heads); a flood of events that
 * makes such a reader a slow consumer; and a reader for the Prometheus text
 * that GET /metrics answers.
 */
import { readFileSync } from 'node:fs'
import net from 'node:net'
import { once } from 'node:events'
import type { TestLike } from './gateway'
import { Waiters } from './wait'
import { publishOk } from './http'
import { publisherToken, userToken } from './tokens'

/** A GET request head written by hand (HTTP/1.1, keep-alive). */
export function getRequest (path: string, port: number, headers: Record<string, string> = {}): string {
  const lines = [`GET ${path} HTTP/1.1`, `Host: 127.0.0.1:${port}`, 'Accept: text/event-stream', 'Connection: keep-alive']
  for (const [name, value] of Object.entries(headers)) lines.push(`${name}: ${value}`)
  return `${lines.join('\r\n')}\r\n\r\n`
}

export interface RawEvent {
  id: string | undefined
  event: string
  data: string
}

export interface RawResponse {
  status: number
  /** Header names lower-cased; repeated headers joined with ", ". */
  headers: Record<string, string>
  /** The body, de-chunked when the answer is chunked (an unfinished last chunk is left out). */
  body: string
  /** True when the head was received in full. */
  complete: boolean
}

/**
 * A TCP connection that keeps every byte it reads. `pause()` stops reading
 * from the socket altogether, so the peer meets a full receive window.
 */
export class RawClient {
  readonly socket: net.Socket
  /** Bytes read so far. */
  bytes = 0
  /** The peer ended its side (FIN read). */
  ended = false
  /** The socket is closed (either side, or an error). */
  closed = false
  error: Error | null = null

  private readonly chunks: Buffer[] = []
  private readonly waiters = new Waiters()

  constructor (readonly port: number, host = '127.0.0.1') {
    this.socket = net.connect({ port, host })
    this.socket.on('connect', () => this.wake())
    this.socket.on('data', (chunk: Buffer) => {
      this.chunks.push(chunk)
      this.bytes += chunk.length
      this.wake()
    })
    this.socket.on('end', () => {
      this.ended = true
      this.wake()
    })
    this.socket.on('error', (error) => {
      this.error ??= error
      this.wake()
    })
    this.socket.on('close', () => {
      this.closed = true
      this.wake()
    })
  }

  /** Resolves once connected. */
  async connected (timeoutMs = 5000): Promise<void> {
    await this.until(() => !this.socket.connecting || this.closed, timeoutMs, 'the TCP connection')
    if (this.error !== null) throw this.error
  }

  write (data: string | Buffer): void {
    this.socket.write(data)
  }

  /** Everything read so far. */
  raw (): Buffer {
    return Buffer.concat(this.chunks)
  }

  /** Everything read so far, decoded as UTF-8. */
  text (): string {
    return this.raw().toString('utf8')
  }

  /** The answer read so far, parsed. */
  response (): RawResponse {
    return parseResponse(this.raw())
  }

  /** Complete SSE events of the body read so far. */
  events (): RawEvent[] {
    return parseSseEvents(this.response().body)
  }

  /** Stops reading from the socket: the kernel buffers fill and the writer meets backpressure. */
  pause (): void {
    this.socket.pause()
  }

  resume (): void {
    this.socket.resume()
  }

  /** Resolves when `check` holds; rejects after `timeoutMs`. */
  async until (check: () => boolean, timeoutMs = 5000, what = 'a condition'): Promise<void> {
    await this.waiters.until(check, {
      timeoutMs,
      what,
      describe: () => `read ${this.bytes} bytes${this.ended ? ', ended' : ''}${this.closed ? ', closed' : ''}${this.error !== null ? `, ${this.error.message}` : ''}`
    })
  }


  /** Resolves when the socket is closed (reading must be on for a FIN to be seen). */
  async waitClose (timeoutMs = 5000): Promise<void> {
    await this.until(() => this.closed, timeoutMs, 'the socket to close')
  }

  destroy (): void {
    this.socket.destroy()
  }

  private wake (): void {
    this.waiters.wake()
  }
}

/** Connects a raw client; it is destroyed in the test's teardown. */
export async function rawConnect (t: TestLike, port: number): Promise<RawClient> {
  const client = new RawClient(port)
  t.teardown(() => client.destroy())
  await client.connected()
  return client
}

/** Writes `request` on a fresh connection and reads until the server closes it or `timeoutMs` passes. */
export async function rawExchange (port: number, request: string | Buffer, timeoutMs = 5000): Promise<RawClient> {
  const client = new RawClient(port)
  try {
    await client.connected()
    client.write(request)
    await client.until(() => client.closed || (client.response().complete && isWhole(client)), timeoutMs, 'a whole answer')
  } finally {
    client.destroy()
  }
  return client
}

/** A whole answer: its head and a body of Content-Length bytes (or the connection ended). */
function isWhole (client: RawClient): boolean {
  const raw = client.raw()
  const headEnd = raw.indexOf('\r\n\r\n')
  if (headEnd === -1) return false
  const length = parseResponse(raw).headers['content-length']
  return length !== undefined && raw.length - headEnd - 4 >= Number(length)
}

export function parseResponse (raw: Buffer): RawResponse {
  const headEnd = raw.indexOf('\r\n\r\n')
  if (headEnd === -1) return { status: 0, headers: {}, body: '', complete: false }
  const [statusLine, ...headerLines] = raw.subarray(0, headEnd).toString('latin1').split('\r\n')
  const status = Number(/^HTTP\/1\.[01] (\d{3})/.exec(statusLine)?.[1] ?? 0)
  const headers: Record<string, string> = {}
  for (const line of headerLines) {
    const colon = line.indexOf(':')
    if (colon === -1) continue
    const name = line.slice(0, colon).trim().toLowerCase()
    const value = line.slice(colon + 1).trim()
    headers[name] = headers[name] === undefined ? value : `${headers[name]}, ${value}`
  }
  const rest = raw.subarray(headEnd + 4)
  const body = /chunked/i.test(headers['transfer-encoding'] ?? '') ? dechunk(rest) : rest
  return { status, headers, body: body.toString('utf8'), complete: true }
}

/** The payload of a chunked body; an unfinished last chunk is left out. */
function dechunk (raw: Buffer): Buffer {
  const parts: Buffer[] = []
  let offset = 0
  for (;;) {
    const lineEnd = raw.indexOf('\r\n', offset)
    if (lineEnd === -1) break
    const size = parseInt(raw.subarray(offset, lineEnd).toString('latin1'), 16)
    if (!Number.isFinite(size) || size === 0) break
    const start = lineEnd + 2
    if (raw.length < start + size + 2) break
    parts.push(raw.subarray(start, start + size))
    offset = start + size + 2
  }
  return Buffer.concat(parts)
}

/** The complete events (ended by a blank line) of an SSE body; comments and `retry:` skipped. */
export function parseSseEvents (body: string): RawEvent[] {
  const events: RawEvent[] = []
  const blocks = body.split(/\r\n\r\n|\n\n|\r\r/)
  // The last block is unfinished (or empty).
  blocks.pop()
  for (const block of blocks) {
    let id: string | undefined
    let event = 'message'
    const data: string[] = []
    for (const line of block.split(/\r\n|\n|\r/)) {
      if (line.startsWith(':')) continue
      const colon = line.indexOf(':')
      const field = colon === -1 ? line : line.slice(0, colon)
      let value = colon === -1 ? '' : line.slice(colon + 1)
      if (value.startsWith(' ')) value = value.slice(1)
      if (field === 'id') id = value
      else if (field === 'event') event = value
      else if (field === 'data') data.push(value)
    }
    if (data.length > 0) events.push({ id, event, data: data.join('\n') })
  }
  return events
}

export interface MetricSample {
  name: string
  labels: Record<string, string>
  value: number
}

/** Samples of a Prometheus text exposition (comments skipped). */
export function parseMetrics (text: string): MetricSample[] {
  const samples: MetricSample[] = []
  for (const line of text.split('\n')) {
    if (line === '' || line.startsWith('#')) continue
    const match = /^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})?\s+(\S+)/.exec(line)
    if (match === null) continue
    const labels: Record<string, string> = {}
    for (const label of (match[2] ?? '').matchAll(/([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"/g)) labels[label[1]] = label[2]
    samples.push({ name: match[1], labels, value: Number(match[3]) })
  }
  return samples
}

/** The sum of the samples named `name` whose labels include `labels` (0 when there is none). */
export function metricValue (samples: MetricSample[], name: string, labels: Record<string, string> = {}): number {
  let sum = 0
  for (const sample of samples) {
    if (sample.name !== name) continue
    if (Object.entries(labels).every(([key, value]) => sample.labels[key] === value)) sum += sample.value
  }
  return sum
}

/** Whether any sample is named `name`. */
export function hasMetric (samples: MetricSample[], name: string): boolean {
  return samples.some((sample) => sample.name === name)
}

/** GET <url>/metrics, parsed; throws on a non-200 answer. */
export async function scrape (url: string): Promise<MetricSample[]> {
  const response = await fetch(`${url}/metrics`, { signal: AbortSignal.timeout(10_000) })
  const text = await response.text()
  if (response.status !== 200) throw new Error(`GET /metrics answered ${response.status}: ${text.slice(0, 200)}`)
  return parseMetrics(text)
}

// --- Slow consumers ---------------------------------------------------------

/** Flood events are 16 KiB, published 4 to a request (64 KiB a request). */
export const FLOOD_EVENT_BYTES = 16 * 1024
export const FLOOD_PER_REQUEST = 4
/** What issue 5 publishes to a never-reading client. */
export const FLOOD_MIN_BYTES = 2 * 1024 * 1024

/** The data of flood event `n`: 16 KiB starting with `#<n>:`. */
export function floodData (n: number): string {
  const head = `#${n}:`
  return head + 'x'.repeat(FLOOD_EVENT_BYTES - head.length)
}

function procNumbers (path: string): number[] {
  try {
    return readFileSync(path, 'utf8').trim().split(/\s+/).map(Number)
  } catch {
    return []
  }
}

/**
 * The most a flood may take before the gateway must have dropped a reader
 * that never reads: what the kernel can hold on both ends of a loopback
 * connection (the sender's send buffer grows up to tcp_wmem's maximum, 4 MiB
 * on common Linux hosts; the paused receiver keeps its default receive
 * buffer), plus MAX_BUFFERED_BYTES, plus 1 MiB of slack. Only bytes the kernel
 * refuses stay in the gateway, so only they can trip MAX_BUFFERED_BYTES.
 */
export function floodMaxBytes (maxBufferedBytes: number): number {
  const wmem = procNumbers('/proc/sys/net/ipv4/tcp_wmem')[2] ?? 8 * 1024 * 1024
  const rmem = procNumbers('/proc/sys/net/ipv4/tcp_rmem')[1] ?? 1024 * 1024
  return Math.max(FLOOD_MIN_BYTES, wmem + 2 * rmem + maxBufferedBytes + 1024 * 1024)
}

export interface NeverReadingStream {
  raw: RawClient
  connectionId: string
  /** Id of the last event it read before it stopped reading. */
  markerId: string
}

/**
 * A raw stream for `userId` that reads `connected` and one `marker` event
 * (published here), then stops reading altogether.
 */
export async function neverReadingStream (t: TestLike, url: string, port: number, userId: string): Promise<NeverReadingStream> {
  const raw = await rawConnect(t, port)
  raw.write(getRequest(`/v1/stream?token=${userToken(userId)}`, port))
  await raw.until(() => raw.events().some((event) => event.event === 'connected'), 5000, 'connected on the raw stream')
  const connected = raw.events().find((event) => event.event === 'connected')
  const connectionId = (JSON.parse(connected?.data ?? '{}') as { connectionId: string }).connectionId
  const [markerId] = await publishOk(url, publisherToken(), { to: { user: userId }, event: 'marker', data: 'before the flood' })
  await raw.until(() => raw.events().some((event) => event.id === markerId), 5000, 'the marker event on the raw stream')
  raw.pause()
  return { raw, connectionId, markerId }
}

/**
 * Publishes `chunk` events of floodData(n) to `to`: at least FLOOD_MIN_BYTES,
 * then on until `dropped()` holds or `maxBytes` were published. Returns the
 * ids in order.
 */
export async function flood (url: string, to: unknown, dropped: () => boolean | Promise<boolean>, maxBytes: number): Promise<string[]> {
  const publisher = publisherToken()
  const ids: string[] = []
  while (ids.length * FLOOD_EVENT_BYTES < maxBytes) {
    const start = ids.length
    const items = Array.from({ length: FLOOD_PER_REQUEST }, (_, offset) => ({ to, event: 'chunk', data: floodData(start + offset) }))
    ids.push(...await publishOk(url, publisher, items))
    if (ids.length * FLOOD_EVENT_BYTES >= FLOOD_MIN_BYTES && await dropped()) break
  }
  return ids
}

/**
 * The bytes the kernel still holds to send on the server's end of the
 * loopback connection from `clientPort` to `serverPort`, or null once that
 * end is gone (Linux's /proc/net/tcp and tcp6: the socket outlives the
 * process's close while the kernel still has bytes to send).
 */
export function serverSendQueue (serverPort: number, clientPort: number): number | null {
  const local = `:${serverPort.toString(16).toUpperCase().padStart(4, '0')}`
  const remote = `:${clientPort.toString(16).toUpperCase().padStart(4, '0')}`
  for (const file of ['/proc/net/tcp', '/proc/net/tcp6']) {
    for (const line of readFileSync(file, 'latin1').split('\n').slice(1)) {
      // sl local_address rem_address st tx_queue:rx_queue ...
      const [, localAddress, remoteAddress, , queues] = line.trim().split(/\s+/)
      if (localAddress?.endsWith(local) === true && remoteAddress?.endsWith(remote) === true) return parseInt(queues.split(':')[0], 16)
    }
  }
  return null
}

/** Both ends of a fresh loopback TCP connection, destroyed in teardown: `server` as a listener accepted it. */
export async function loopbackPair (t: TestLike): Promise<{ server: net.Socket, client: net.Socket }> {
  const listener = net.createServer()
  listener.listen(0, '127.0.0.1')
  await once(listener, 'listening')
  const address = listener.address()
  if (address === null || typeof address === 'string') throw new Error('no TCP address')
  const accepted = once(listener, 'connection') as Promise<[net.Socket]>
  const client = net.connect(address.port, '127.0.0.1')
  await once(client, 'connect')
  const [server] = await accepted
  listener.close()
  t.teardown(() => {
    client.destroy()
    server.destroy()
  })
  return { server, client }
}
