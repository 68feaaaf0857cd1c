/**
 * A Server-Sent Events client over a real socket (node:http, one socket per
 * stream), parsing the body as a browser's EventSource does
 * (https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation).
 * Tests await events with a bounded timeout; they never sleep.
 */
import http from 'node:http'
import type { Socket } from 'node:net'
import { StringDecoder } from 'node:string_decoder'
import { Waiters } from './wait'

export interface SseEvent {
  /** The value of this event's own `id:` line, or undefined when its block had none. */
  id: string | undefined
  /** The event type (`message` when the block had no `event:` line). */
  event: string
  /** The data exactly as `MessageEvent.data` would hold it. */
  data: string
  /** The block's lines as received, joined with `\n` (without the blank line ending it). */
  raw: string
  /** The browser's last event id once this event was dispatched. */
  lastEventId: string
}

export interface OpenStreamOptions {
  headers?: Record<string, string>
  /** Bound on the wait for the response head (and a non-200 body). */
  timeoutMs?: number
  /** Closes the stream in this test's teardown. */
  t?: { teardown: (fn: () => unknown) => void }
}

export const DEFAULT_TIMEOUT_MS = 5000

const openClients = new Set<SseClient>()

/** Closes every test stream opened to a URL starting with `origin` (gateways call it in teardown). */
export function closeStreamsTo (origin: string): void {
  for (const client of [...openClients]) if (client.url.startsWith(origin)) client.close()
}

/** Closes every test stream still open. */
export function closeAllStreams (): void {
  for (const client of [...openClients]) client.close()
}

/**
 * A response body read as a browser's EventSource reads it, with the events
 * consumed in order by `next`/`take`. The transport (HTTP/1.1 here, HTTP/2 in
 * h2.ts) feeds it text and says how to wait.
 */
export abstract class SseReader {
  /** Every event dispatched so far, in order. */
  readonly events: SseEvent[] = []
  /** Comment lines (without the leading `:` and one space). */
  readonly comments: string[] = []
  /** Values of valid `retry:` fields. */
  readonly retries: number[] = []
  lastEventId = ''

  /** Index of the first event `next` has not consumed. */
  private cursor = 0
  // Parser state.
  private pending = ''
  private blockLines: string[] = []
  private data = ''
  private hasData = false
  private eventType = ''
  private blockId: string | undefined = undefined

  /** Resolves when `check` holds; rejects when the stream ends first or after `timeoutMs`. */
  abstract until (check: () => boolean, timeoutMs?: number, what?: string): Promise<void>

  /**
   * The first event not yet consumed by `next` that matches `predicate`; it and
   * the events before it count as consumed.
   */
  async next (predicate: (event: SseEvent) => boolean = () => true, timeoutMs = DEFAULT_TIMEOUT_MS, what = 'an event'): Promise<SseEvent> {
    let scanned = this.cursor
    let found: SseEvent | undefined
    await this.until(() => {
      for (let index = Math.max(scanned, this.cursor); index < this.events.length; index++) {
        if (predicate(this.events[index])) {
          found = this.events[index]
          this.cursor = index + 1
          return true
        }
      }
      scanned = this.events.length
      return false
    }, timeoutMs, what)
    return found as SseEvent
  }

  /** The next event of type `name`. */
  async nextEvent (name: string, timeoutMs = DEFAULT_TIMEOUT_MS): Promise<SseEvent> {
    return await this.next((event) => event.event === name, timeoutMs, `event "${name}"`)
  }

  /** The next `count` events, whatever they are. */
  async take (count: number, timeoutMs = DEFAULT_TIMEOUT_MS): Promise<SseEvent[]> {
    const from = this.cursor
    await this.until(() => this.events.length >= from + count, timeoutMs, `${count} events`)
    this.cursor = from + count
    return this.events.slice(from, from + count)
  }

  /** Events not yet consumed by `next`/`take`. */
  unread (): SseEvent[] {
    return this.events.slice(this.cursor)
  }

  /** Splits into lines on CRLF, LF or CR, keeping a trailing CR until the next byte is known. */
  protected parse (chunk: string, final: boolean): void {
    const buffer = this.pending + chunk
    let start = 0
    let cr = buffer.indexOf('\r')
    let lf = buffer.indexOf('\n')
    for (;;) {
      if (cr !== -1 && cr < start) cr = buffer.indexOf('\r', start)
      if (lf !== -1 && lf < start) lf = buffer.indexOf('\n', start)
      if (cr === -1 && lf === -1) break
      let end: number
      let next: number
      if (cr !== -1 && (lf === -1 || cr < lf)) {
        if (cr === buffer.length - 1 && !final) break
        end = cr
        next = lf === cr + 1 ? cr + 2 : cr + 1
      } else {
        end = lf
        next = lf + 1
      }
      this.line(buffer.slice(start, end))
      start = next
    }
    this.pending = buffer.slice(start)
  }

  private line (line: string): void {
    if (line === '') {
      this.dispatch()
      return
    }
    this.blockLines.push(line)
    if (line.startsWith(':')) {
      this.comments.push(line.slice(1).replace(/^ /, ''))
      return
    }
    const colon = line.indexOf(':')
    const field = colon === -1 ? line : line.slice(0, colon)
    let value = colon === -1 ? '' : line.slice(colon + 1)
    if (value.startsWith(' ')) value = value.slice(1)
    switch (field) {
      case 'event':
        this.eventType = value
        break
      case 'data':
        this.data += `${value}\n`
        this.hasData = true
        break
      case 'id':
        if (!value.includes('\u0000')) {
          this.lastEventId = value
          this.blockId = value
        }
        break
      case 'retry':
        if (/^\d+$/.test(value)) this.retries.push(Number(value))
        break
      default:
        break
    }
  }

  private dispatch (): void {
    const raw = this.blockLines.join('\n')
    const { hasData, eventType, blockId } = this
    let data = this.data
    this.blockLines = []
    this.data = ''
    this.hasData = false
    this.eventType = ''
    this.blockId = undefined
    if (!hasData) return
    if (data.endsWith('\n')) data = data.slice(0, -1)
    this.events.push({ id: blockId, event: eventType === '' ? 'message' : eventType, data, raw, lastEventId: this.lastEventId })
  }
}

export class SseClient extends SseReader {
  status = 0
  headers: http.IncomingHttpHeaders = {}
  /** Everything received, decoded as UTF-8 (for a non-200 answer: its body). */
  text = ''
  ended = false
  error: Error | null = null
  socket: Socket | null = null

  private readonly request: http.ClientRequest
  private response: http.IncomingMessage | null = null
  private readonly decoder = new StringDecoder('utf8')
  private readonly waiters = new Waiters()

  constructor (readonly url: string, private readonly options: OpenStreamOptions) {
    super()
    this.request = http.request(url, {
      method: 'GET',
      agent: false,
      headers: {
        accept: 'text/event-stream',
        'cache-control': 'no-cache',
        connection: 'keep-alive',
        ...options.headers
      }
    })
    this.request.on('socket', (socket: Socket) => {
      this.socket = socket
    })
    // Once a response exists, its own events end the stream.
    this.request.on('error', (error) => {
      if (this.response === null) this.finish(error)
      else this.error ??= error
    })
    this.request.on('close', () => {
      if (this.response === null) this.finish()
    })
    this.request.end()
    openClients.add(this)
  }

  /** Resolves once the head arrived (and, for a non-200 answer, the whole body). */
  async ready (): Promise<void> {
    const timeoutMs = this.options.timeoutMs ?? DEFAULT_TIMEOUT_MS
    await new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.close()
        reject(new Error(`no answer from ${this.url} within ${timeoutMs} ms`))
      }, timeoutMs)
      const settle = (error?: Error): void => {
        clearTimeout(timer)
        if (error !== undefined) reject(error)
        else resolve()
      }
      this.request.once('error', (error) => settle(error))
      this.request.once('response', (response: http.IncomingMessage) => {
        this.response = response
        this.status = response.statusCode ?? 0
        this.headers = response.headers
        response.on('data', (chunk: Buffer) => this.receive(this.decoder.write(chunk)))
        response.on('end', () => this.finish())
        response.on('error', (error) => this.finish(error))
        response.on('close', () => this.finish())
        if (this.status === 200) settle()
        else {
          this.until(() => this.ended, timeoutMs, 'the end of the answer').then(() => settle(), settle)
        }
      })
    })
  }

  /** The body of a non-stream answer, parsed. */
  json<T = Record<string, unknown>> (): T {
    return JSON.parse(this.text) as T
  }

  /** Resolves when `check` holds; rejects when the stream ends first or after `timeoutMs`. */
  async until (check: () => boolean, timeoutMs = DEFAULT_TIMEOUT_MS, what = 'a condition'): Promise<void> {
    await this.waiters.until(check, {
      timeoutMs,
      what,
      describe: () => this.describe(),
      gaveUp: () => this.ended ? 'stream ended' : null
    })
  }

  /** Resolves when the server has ended the stream. */
  async waitEnd (timeoutMs = DEFAULT_TIMEOUT_MS): Promise<void> {
    await this.until(() => this.ended, timeoutMs, 'the end of the stream')
  }

  /** Stops reading (the server then meets backpressure). */
  pause (): void {
    this.response?.pause()
  }

  resume (): void {
    this.response?.resume()
  }

  /** Closes the stream the way a browser tab does. */
  close (): void {
    openClients.delete(this)
    this.request.destroy()
    this.response?.destroy()
    this.finish()
  }

  /** Drops the connection abruptly with a TCP reset. */
  reset (): void {
    openClients.delete(this)
    if (this.socket !== null && !this.socket.destroyed) this.socket.resetAndDestroy()
    this.close()
  }

  private describe (): string {
    const last = this.events.slice(-3).map((event) => `${event.event}#${event.id ?? '-'}`).join(', ')
    return `status ${this.status}, ${this.events.length} events${last !== '' ? ` (last: ${last})` : ''}${this.ended ? ', ended' : ''}${this.error !== null ? `, error ${this.error.message}` : ''}`
  }

  private finish (error?: Error): void {
    if (error !== undefined && this.error === null) this.error = error
    if (this.ended) return
    this.receive(this.decoder.end(), true)
    this.ended = true
    openClients.delete(this)
    this.wake()
  }

  private wake (): void {
    this.waiters.wake()
  }

  private receive (chunk: string, final = false): void {
    if (chunk === '' && !final) return
    this.text += chunk
    if (this.status !== 200) return
    this.parse(chunk, final)
    this.wake()
  }

}

/** Opens a stream; resolves with the head (status, headers) received. */
export async function openStream (url: string, options: OpenStreamOptions = {}): Promise<SseClient> {
  const client = new SseClient(url, options)
  options.t?.teardown(() => client.close())
  await client.ready()
  return client
}

export interface ConnectedData {
  connectionId: string
  userId: string
  topics: string[]
}

/** Opens a stream and waits for its `connected` event. */
export async function openConnected (url: string, options: OpenStreamOptions = {}): Promise<{ stream: SseClient, connected: ConnectedData }> {
  const stream = await openStream(url, options)
  if (stream.status !== 200) throw new Error(`stream answered ${stream.status}: ${stream.text}`)
  const event = await stream.nextEvent('connected')
  return { stream, connected: JSON.parse(event.data) as ConnectedData }
}
