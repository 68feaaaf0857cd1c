/**
 * Server-Sent Events over HTTP/2 (node:http2): many streams on one session,
 * that is one TLS connection, each body parsed as a browser's EventSource
 * does, with bounded waits. For the HTTPS listener of deploy/nginx.conf.
 */
import http2, { type ClientHttp2Session, type ClientHttp2Stream, type IncomingHttpHeaders } from 'node:http2'
import tls from 'node:tls'
import { StringDecoder } from 'node:string_decoder'
import type { TestLike } from './gateway'
import { SseReader } from './sse'
import { Waiters, within } from './wait'

export interface TlsTarget {
  /** `https://127.0.0.1:<port>` */
  url: string
  port: number
  /** The server's self-signed certificate (PEM), trusted as the only CA. */
  certificate: string
}

/**
 * The protocol the server picks by ALPN when offered both `h2` and
 * `http/1.1`, as a browser offers them (false if it picks none).
 */
export async function negotiatedProtocol (target: TlsTarget, timeoutMs = 5000): Promise<string | false> {
  const socket = tls.connect({ host: '127.0.0.1', port: target.port, ca: target.certificate, ALPNProtocols: ['h2', 'http/1.1'] })
  try {
    return await within(new Promise<string | false>((resolve, reject) => {
      socket.once('secureConnect', () => resolve(socket.alpnProtocol ?? false))
      socket.once('error', reject)
    }), timeoutMs, `a TLS handshake with ${target.url}`)
  } finally {
    socket.destroy()
  }
}

/** One HTTP/2 session to `target`, destroyed (with its streams) in teardown. */
export async function connectH2 (t: TestLike, target: TlsTarget, timeoutMs = 5000): Promise<ClientHttp2Session> {
  const session = http2.connect(target.url, { ca: target.certificate })
  const closed = new Promise<void>((resolve) => session.once('close', () => resolve()))
  t.teardown(async () => {
    session.destroy()
    await within(closed, 5000, 'the HTTP/2 session to close').catch(() => {})
  })
  // An error after connecting surfaces on the streams; before it, here.
  session.on('error', () => {})
  await within(new Promise<void>((resolve, reject) => {
    session.once('connect', () => resolve())
    session.once('error', reject)
  }), timeoutMs, `an HTTP/2 session with ${target.url}`)
  return session
}

export class H2SseStream extends SseReader {
  status = 0
  headers: IncomingHttpHeaders = {}
  /** Everything received, decoded as UTF-8. */
  text = ''
  ended = false
  error: Error | null = null

  private readonly waiters = new Waiters()
  private readonly decoder = new StringDecoder('utf8')

  constructor (readonly path: string, readonly stream: ClientHttp2Stream) {
    super()
    stream.on('data', (chunk: Buffer) => this.receive(this.decoder.write(chunk)))
    stream.on('end', () => this.finish())
    stream.on('close', () => this.finish())
    stream.on('error', (error) => this.finish(error))
  }

  /** Resolves once the response head arrived. */
  async ready (timeoutMs: number): Promise<void> {
    await within(new Promise<void>((resolve, reject) => {
      this.stream.once('response', (headers) => {
        this.status = Number(headers[':status'])
        this.headers = headers
        resolve()
      })
      this.stream.once('error', reject)
      this.stream.once('close', () => reject(new Error(`${this.path} closed before its response head (${this.error?.message ?? 'no error'})`)))
    }), timeoutMs, `the response head of ${this.path}`)
  }

  /** Cancels the stream (RST_STREAM), as a browser does when a tab closes; the session stays. */
  close (): void {
    if (!this.stream.closed) this.stream.close(http2.constants.NGHTTP2_CANCEL)
    this.finish()
  }

  async until (check: () => boolean, timeoutMs = 5000, what = 'a condition'): Promise<void> {
    await this.waiters.until(check, {
      timeoutMs,
      what: `${what} on ${this.path.replace(/token=[^&]*/, 'token=…')}`,
      describe: () => `status ${this.status}, ${this.events.length} events${this.ended ? ', ended' : ''}${this.error !== null ? `, error ${this.error.message}` : ''}`,
      gaveUp: () => this.ended ? 'stream ended' : null
    })
  }

  private finish (error?: Error): void {
    if (error !== undefined && this.error === null) this.error = error
    if (this.ended) return
    this.ended = true
    this.waiters.wake()
  }

  private receive (chunk: string): void {
    this.text += chunk
    this.parse(chunk, false)
    this.waiters.wake()
  }
}

/** Opens `path` as a stream on `session`; resolves with its head. Cancelled in `t`'s teardown. */
export async function openH2Stream (session: ClientHttp2Session, path: string, options: { t?: TestLike, headers?: Record<string, string>, timeoutMs?: number } = {}): Promise<H2SseStream> {
  const request = session.request({
    ':method': 'GET',
    ':path': path,
    accept: 'text/event-stream',
    'cache-control': 'no-cache',
    ...options.headers
  }, { endStream: true })
  const stream = new H2SseStream(path, request)
  options.t?.teardown(() => stream.close())
  await stream.ready(options.timeoutMs ?? 5000)
  return stream
}
