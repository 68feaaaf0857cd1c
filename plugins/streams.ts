import fp from 'fastify-plugin'
import type { IncomingMessage, Server, ServerResponse } from 'node:http'
import { Socket as NetSocket, type Socket } from 'node:net'
import type { FastifyBaseLogger, FastifyReply, FastifyRequest } from 'fastify'
import { AdmissionLedger, LIMIT_EVICTION } from '../src/core/admissions'
import { slabBytesFor } from '../src/core/arena'
import { channel } from '../src/core/channels'
import type { CloseReason, Sink, StreamKind } from '../src/core/connection'
import { parseCursor, streamHead } from '../src/core/framing'
import { DESCRIPTORS_KEPT, openFileLimit, streamCapacity } from '../src/open-files'
import { Hub } from '../src/core/hub'
import { Publisher } from '../src/core/publish'
import { StoreUnavailableError, type Admission, type ControlAnswer } from '../src/core/state'
import { REOPENED_REASON, StreamService, type StreamSpec } from '../src/core/streams'
import { applyTopicChange, UserWideRealignment, type TopicsMessage } from '../src/core/topic-changes'
import { TurnsPerKey } from '../src/core/in-turns'
import { UnchunkedSink } from '../src/core/unchunked'
import { closeGraceMs } from '../src/config'
import { errors } from '../src/errors'
import { clientAddress } from '../src/client-address'
import { responseInFlight } from '../src/in-flight'
import { refuseOnSocket } from '../src/raw-answer'
import { authOf } from './auth'

export interface OpenStreamOptions {
  connectionId: string
  kind: StreamKind
  topics: string[]
  channels: string[]
  windowChannels?: string[]
  extraTopics?: StreamSpec['extraTopics']
  closeAfter?: StreamSpec['closeAfter']
  prelude?: StreamSpec['prelude']
  connectedExtra?: Record<string, unknown>
}

declare module 'fastify' {
  interface FastifyInstance {
    streams: StreamService
    publisher: Publisher
    /** Admits, hijacks and opens an SSE stream for an authenticated request. */
    openStream: (request: FastifyRequest, reply: FastifyReply, options: OpenStreamOptions) => Promise<void>
    /** Adds or removes topics on live streams of this instance. */
    applyTopics: (message: TopicsMessage) => Promise<ControlAnswer>
  }
}

const SSE_HEADERS = {
  'content-type': 'text/event-stream; charset=utf-8',
  'cache-control': 'no-cache, no-transform',
  'x-accel-buffering': 'no',
  connection: 'keep-alive'
}
// Said when the stream's end also ends its connection (RFC 9112 §9.6): the
// client asked for it, or speaks HTTP/1.0, which has no chunked coding (the
// body ends with the connection).
const SSE_HEADERS_CLOSE = { ...SSE_HEADERS, connection: 'close' }

// Node's own HTTP helpers, as the 'upgrade' path uses them; not in the typings.
// eslint-disable-next-line @typescript-eslint/no-require-imports
const httpCommon = require('_http_common') as { freeParser: (parser: unknown, req: unknown, socket: unknown) => void }

/**
 * A stream holds its socket for hours, so it lets go of what Node's HTTP
 * server keeps per connection, as Node itself does when a connection is
 * upgraded: the response object, the parser and its bound callbacks. What
 * remains is the socket; its reads are discarded and its end closes it.
 */
function releaseHttpState (response: ServerResponse, socket: Socket): void {
  response.detachSocket(socket)
  const parser = (socket as unknown as { parser?: { unconsume?: () => void, finish?: () => void } | null }).parser
  for (const event of ['data', 'end', 'drain', 'timeout', 'resume', 'pause', 'error']) socket.removeAllListeners(event)
  socket.removeAllListeners('close')
  // The server replaced these with wrappers for its own bookkeeping. (Deleting
  // them would turn the socket into a slow dictionary object, 1.6 KB larger.)
  socket.on = NetSocket.prototype.on
  socket.addListener = NetSocket.prototype.addListener
  socket.prependListener = NetSocket.prototype.prependListener
  if (parser !== null && parser !== undefined) {
    parser.finish?.()
    httpCommon.freeParser(parser, null, socket)
  }
  socket.on('error', destroySelf)
  // The server allows half-open sockets; a client that ends its side is gone.
  socket.on('end', destroySelf)
  // Reads are discarded; one marks the connection as not to be served again.
  socket.on('data', markStray)
}

/**
 * How long a change to a stream waits for an open taking its id over here:
 * under the sender's 3 s wait for answers, so that one not answered in time
 * is not made either.
 */
const OPEN_WAIT_MS = 2000
/**
 * Connections a stream's end must close rather than hand back: the client
 * asked for Connection: close, or sent bytes while the stream held it (a
 * pipelined request, which was discarded and would wait for ever).
 */
const notReusable = new WeakSet<Socket>()
/** Connections handed back to their server: no longer a stream's to close. */
const handedBack = new WeakSet<Socket>()

function markStray (this: Socket): void {
  notReusable.add(this)
}

/**
 * Requests that wait on their connection for the response before theirs to
 * end (HTTP pipelining), by connection: counted from their start until their
 * own response is sent. Rare (browsers and proxies do not pipeline), and
 * never answered if the response before them is a stream.
 */
const requestsWaiting = new WeakMap<Socket, number>()
/** The requests counted in requestsWaiting (until their response is sent). */
const waited = new WeakSet<IncomingMessage>()

/**
 * A CONNECT pipelined behind a request waits for its answer (src/app.ts),
 * which a stream never gives: it counts as a request behind it. Its
 * connection closes after its refusal, so the count is never taken back.
 */
function noteConnectIfWaiting (_request: IncomingMessage, socket: Socket): void {
  if (responseInFlight(socket) === null) return
  requestsWaiting.set(socket, (requestsWaiting.get(socket) ?? 0) + 1)
}

/** Connections whose refused request is counted in requestsWaiting (see noteRefusalIfWaiting). */
const refusalNoted = new WeakSet<Socket>()

/**
 * So does a request the HTTP parser refuses (src/app.ts waits alike), once
 * per connection: the parser reports each later chunk again, and the
 * connection closes after the refusal.
 */
function noteRefusalIfWaiting (error: Error & { code?: string }, socket: Socket): void {
  if (error.code === 'ECONNRESET' || refusalNoted.has(socket) || responseInFlight(socket) === null) return
  refusalNoted.add(socket)
  requestsWaiting.set(socket, (requestsWaiting.get(socket) ?? 0) + 1)
}

function noteIfWaiting (request: IncomingMessage, response: ServerResponse): void {
  if (response.socket !== null) return
  const socket = request.socket
  requestsWaiting.set(socket, (requestsWaiting.get(socket) ?? 0) + 1)
  waited.add(request)
  response.once('finish', () => {
    const left = (requestsWaiting.get(socket) ?? 1) - 1
    if (left > 0) requestsWaiting.set(socket, left)
    else requestsWaiting.delete(socket)
  })
}

/**
 * Whether requests wait behind this one. (One that waited itself, and whose
 * turn has come, is still counted until it is answered; those ahead of it
 * were answered before its turn came.)
 */
function hasRequestsBehind (request: FastifyRequest): boolean {
  const waiting = requestsWaiting.get(request.raw.socket) ?? 0
  return waiting > (waited.has(request.raw) ? 1 : 0)
}

function pipelinedBehindStream (): Error {
  return new errors.BadRequest('a stream request cannot be followed by other requests pipelined on its connection')
}

/** How often closes that Redis could not be told of are logged while it stays unreachable. */
const UNRECORDED_LOG_EVERY_MS = 60_000

// Shared by every stream's socket, which is `this`: no closure per socket.
function destroySelf (this: Socket): void {
  this.destroy()
}

/**
 * A stream's response has ended (its last chunk written): its connection
 * goes back to the HTTP server that accepted it, as after any response, to
 * serve the next request a keep-alive client sends. Idle, it closes after
 * the server's keep-alive timeout.
 */
function handBack (sink: Sink): void {
  // An HTTP/1.0 stream's body ends with its connection.
  if (!(sink instanceof NetSocket)) {
    sink.destroy()
    return
  }
  const socket = sink as Socket & { server?: Server }
  socket.removeListener('error', destroySelf)
  socket.removeListener('end', destroySelf)
  socket.removeListener('data', markStray)
  const server = socket.server
  // Everything is flushed: closing loses nothing. (An end() alone would
  // leave a half-open socket that the server's close waits on.)
  if (server === undefined || !server.listening || notReusable.has(socket)) {
    socket.destroy()
    return
  }
  handedBack.add(socket)
  // The 'connection' event is how Node lets a socket be given to a server.
  server.emit('connection', socket)
  // Closed idle before the server's header timeout would answer it 408
  // unasked (its fresh parser is timed from now).
  const limits = [server.keepAliveTimeout, server.headersTimeout - 1000].filter((ms) => ms > 0)
  socket.setTimeout(Math.max(1000, Math.min(...limits, 60_000)))
}

// Most streams carry no header of their own (CORS adds some): they share one head.
const PLAIN_HEAD = streamHead(SSE_HEADERS)
const PLAIN_HEAD_CLOSE = streamHead(SSE_HEADERS_CLOSE)
const PLAIN_HEAD_HTTP10 = streamHead(SSE_HEADERS_CLOSE, false)

/**
 * The stream's status line and headers: what hooks set on the reply, then the
 * SSE ones. `endsConnection`: the connection ends with the stream (always
 * over HTTP/1.0).
 */
function headOf (reply: FastifyReply, http10: boolean, endsConnection: boolean): Buffer {
  const own = reply.getHeaders()
  let headers: Record<string, string | number | string[]> | null = null
  for (const name in own) {
    const value = own[name]
    if (value !== undefined) (headers ??= {})[name] = value
  }
  if (headers === null) return http10 ? PLAIN_HEAD_HTTP10 : endsConnection ? PLAIN_HEAD_CLOSE : PLAIN_HEAD
  return streamHead({ ...headers, ...(endsConnection ? SSE_HEADERS_CLOSE : SSE_HEADERS) }, !http10)
}

/** `Last-Event-ID` header first (browsers send it), then `?lastEventId=`. */
export function cursorOf (request: FastifyRequest): ReturnType<typeof parseCursor> {
  const header = request.headers['last-event-id']
  if (typeof header === 'string' && header !== '') return parseCursor(header)
  const query = request.query as Record<string, unknown> | undefined
  const value = query?.lastEventId
  return typeof value === 'string' ? parseCursor(value) : null
}

export default fp(async (app) => {
  const { config, registry, bus, state } = app
  const fileLimit = openFileLimit()
  const streamCap = streamCapacity(config.maxConnections, fileLimit)
  if (streamCap < config.maxConnections) {
    app.log.info({ openFileLimit: fileLimit, maxConnections: config.maxConnections, streams: streamCap, descriptorsKept: DESCRIPTORS_KEPT }, 'streams capped below MAX_CONNECTIONS by the open-file limit (raise it: ulimit -n, docker run --ulimit nofile=N, systemd LimitNOFILE)')
  }
  const hub = new Hub(bus, slabBytesFor(config.maxBufferedBytes))
  const publisher = new Publisher(bus, state, config.maxPublishChannels)
  /** When a close that could not be recorded was last logged (performance.now()), and how many since. */
  let unrecordedLoggedAt = Number.NEGATIVE_INFINITY
  let unrecordedSince = 0
  let unrecordedAtShutdownLogged = false
  /** Gives a closed (or refused) stream's id and slot back; a failure is logged, and retried by the Redis state once it reconnects. */
  const recordClose = async (connectionId: string, userId: string, log: FastifyBaseLogger, graceMs?: number): Promise<void> => {
    try {
      await state.release(connectionId, userId, config.historyTtlS, graceMs)
    } catch (error) {
      if (!(error instanceof StoreUnavailableError)) {
        log.warn({ err: error, connectionId }, 'could not record stream close')
        return
      }
      // Unreachable, every stream that closes fails alike (all of them, at a
      // shutdown): a line a minute says so, not one per stream.
      if (streams.isDraining) {
        if (unrecordedAtShutdownLogged) return
        unrecordedAtShutdownLogged = true
        log.warn({ reason: error.reason }, 'stream closes not recorded before stopping (Redis unavailable): this instance\'s streams are reaped once it has been silent for INSTANCE_TTL_MS')
        return
      }
      unrecordedSince++
      if (performance.now() - unrecordedLoggedAt < UNRECORDED_LOG_EVERY_MS) return
      log.warn({ reason: error.reason, closes: unrecordedSince }, 'stream closes are recorded once Redis is back')
      unrecordedLoggedAt = performance.now()
      unrecordedSince = 0
    }
  }
  /**
   * A stream the gateway ended for its client to reconnect (a drain, a slow
   * consumer dropped) comes back no sooner than the `retry` it was sent: the
   * grace runs from then, so that a deploy does not show every user's
   * contacts user:offline and user:online. `0` (no grace) stays 0.
   */
  const presenceGraceAfter = (reason: CloseReason): number | undefined =>
    (reason === 'shutdown' || reason === 'slow') && config.presenceGraceMs > 0 ? config.retryMs + config.presenceGraceMs : undefined
  const streams = new StreamService(bus, hub, registry, {
    retryMs: config.retryMs,
    keepaliveMs: config.keepaliveMs,
    maxBufferedBytes: config.maxBufferedBytes,
    historyTtlS: config.historyTtlS,
    handBack
  }, {
    opened: (connection) => {
      app.metrics.streamOpened(connection)
      app.log.info({ reqId: connection.requestId, connectionId: connection.id, userId: connection.userId, kind: connection.kind, remoteAddress: connection.remoteAddress }, 'stream opened')
    },
    closed: (connection) => {
      const reason = connection.closeReason ?? 'client'
      app.metrics.streamClosed(connection, reason)
      app.log.info({
        reqId: connection.requestId,
        connectionId: connection.id,
        userId: connection.userId,
        kind: connection.kind,
        reason,
        durationMs: Date.now() - connection.openedAt,
        events: connection.eventsSent,
        bytes: connection.bytesSent
      }, 'stream closed')
      // Releasing a replaced stream's id would release the stream that holds it now.
      if (connection.replaced) return
      void ledger.releaseUnlessHeld(connection.id, connection.userId, app.log, presenceGraceAfter(reason))
    },
    superseded: (connection, holder) => {
      app.log.info({
        reqId: connection.requestId,
        connectionId: connection.id,
        userId: connection.userId,
        kind: connection.kind,
        holderReqId: holder.requestId
      }, 'stream superseded: a reopen of its id admitted after it holds the id')
    },
    replayed: (_connection, count) => app.metrics.replayed(count),
    cursorsMoved: (count) => app.metrics.cursorsMoved(count),
    catchingUp: (count) => app.log.warn({ streams: count }, 'bus subscription back: streams replay what they may have missed'),
    catchUpFailed: (error) => app.log.error({ err: error }, 'catch-up failed: the streams not done stay held until the bus subscription is next restored'),
    reset: (connection, reason) => {
      app.metrics.reset(reason)
      app.log.info({ connectionId: connection.id, reason }, 'replay reset')
    },
    topicsChanged: async (connection) => {
      await state.updateTopics(connection.id, connection.userId).catch((error: unknown) => {
        app.log.warn({ err: error, connectionId: connection.id }, 'could not record stream topics')
      })
    }
  })
  app.decorate('streams', streams)
  app.decorate('publisher', publisher)

  // Bounded like a publish (README, MAX_PUBLISH_CHANNELS): a user in huge
  // conversations could otherwise make every toggle of a stream write that
  // many history entries. The smallest conversations are told first.
  const announce = async (userId: string, event: 'user:online' | 'user:offline'): Promise<void> => {
    const { members, skipped } = await state.contacts(userId, config.maxPublishChannels)
    if (skipped > 0) app.log.info({ userId, event, conversations: skipped }, 'presence event not sent to the members of conversations past MAX_PUBLISH_CHANNELS')
    if (members.length === 0) return
    await publisher.emit(members.map(channel.user), event, { userId })
    app.metrics.published('presence', 1)
  }
  const announceSafely = (userId: string, event: 'user:online' | 'user:offline'): void => {
    announce(userId, event).catch((error: unknown) => {
      app.log.warn({ err: error, userId, event }, 'presence event not published')
    })
  }
  state.onOffline((userId) => announceSafely(userId, 'user:offline'))
  state.onOnline((userId) => announceSafely(userId, 'user:online'))

  // One user's topic changes are applied one after another, in the order
  // they arrive: each awaits joins and records between the user's streams,
  // and a later one must not run in the middle of it.
  const topicTurns = new TurnsPerKey()
  const applyNow = async (message: TopicsMessage): Promise<ControlAnswer> => await applyTopicChange(message, registry, streams, config.maxTopics)
  const applyTopics = async (message: TopicsMessage): Promise<ControlAnswer> => await topicTurns.run(message.userId, async () => await applyNow(message))
  app.decorate('applyTopics', applyTopics)
  const realignment = new UserWideRealignment(registry, topicTurns, applyNow)
  state.onControlMissed(async (read, retrying) => await realignment.run(read, retrying))

  const ledger = new AdmissionLedger<FastifyBaseLogger>(registry, streams, recordClose)
  state.trackOpens(ledger.tracker(app.log))
  state.onControl(async (message) => {
    if (message.type === 'topics') {
      if (message.connectionId === null) realignment.noteArrived(message.userId)
      // Not past the sender's wait: a change answered 404 must not be made after.
      else if (registry.get(message.connectionId) === undefined && !(await ledger.untilOpened(message.connectionId, OPEN_WAIT_MS))) return null
      return await applyTopics(message)
    }
    if (message.instance === null || message.instance === state.instanceId) ledger.applyEviction(message)
    return null
  })

  // Before Fastify's own listener, and synchronously: a request pipelined in
  // the same packet as a stream's is counted before the stream's handler
  // next yields. (The internal listener hands its requests to this server.)
  app.server.prependListener('request', noteIfWaiting)
  for (const server of [app.server, app.internalServer]) {
    server?.prependListener('connect', noteConnectIfWaiting)
    server?.prependListener('clientError', noteRefusalIfWaiting)
  }

  /** Streams past the MAX_CONNECTIONS check that are not in the registry yet. */
  let opening = 0
  const retryAfterS = String(Math.max(1, Math.ceil(config.retryMs / 1000)))

  /** Refuses, before it takes a slot, a stream this instance cannot serve. */
  const refuseUnservable = (request: FastifyRequest, reply: FastifyReply, http10: boolean): void => {
    if (!http10 && request.raw.httpVersion !== '1.1') throw new errors.BadRequest('streams need HTTP/1.1 or HTTP/1.0')
    // Pipelined behind another response on its connection (for ever, if a
    // stream's): it cannot be answered before that one ends, so it must not
    // take a slot, or evict one of the user's streams, meanwhile.
    if (reply.raw.socket === null) throw new errors.BadRequest('a stream request cannot be pipelined behind another on its connection')
    if (streams.isDraining || !bus.isReady()) {
      reply.header('retry-after', retryAfterS)
      throw new errors.Unavailable(streams.isDraining ? 'the gateway is shutting down' : 'the gateway cannot serve streams right now')
    }
    // Streams between this check and the registry wait on Redis (admission,
    // control messages): counted here, concurrent opens cannot all pass it.
    if (registry.size + opening >= streamCap) {
      reply.header('retry-after', retryAfterS)
      throw new errors.Unavailable(streamCap < config.maxConnections
        ? `this instance holds its maximum number of streams (${streamCap}, below MAX_CONNECTIONS for its open-file limit)`
        : 'this instance holds its maximum number of streams')
    }
  }

  /** Ends the streams an admission displaced: the user's oldest past its limit, and the id's holders elsewhere. */
  const evictFor = async (admission: Extract<Admission, { admitted: true }>, connectionId: string): Promise<void> => {
    // The evicted entry's own instance ends its stream: another stream of
    // the id here may be a holder that a reopen elsewhere replaced.
    const { evict } = admission
    if (evict !== null && evict.instance === state.instanceId) ledger.evictHere(evict.connectionId, LIMIT_EVICTION, admission.seq, true)
    else if (evict !== null) {
      await state.broadcastControl({ type: 'evict', connectionId: evict.connectionId, reason: LIMIT_EVICTION, instance: evict.instance, decidedAt: admission.seq })
    }
    // The id's holders on other instances (a live one, or reopens racing
    // this one): the id is this one's now.
    if (admission.replacedOn.length > 0) {
      await Promise.all(admission.replacedOn.map(async (instance) => {
        await state.broadcastControl({ type: 'evict', connectionId, reason: REOPENED_REASON, instance, decidedAt: admission.seq })
      }))
    }
  }
  app.decorate('openStream', async (request: FastifyRequest, reply: FastifyReply, options: OpenStreamOptions) => {
    const auth = authOf(request)
    // An HTTP/1.0 client (nginx's default to an upstream) gets the frames
    // without their chunk framing, and the connection closes at the end.
    const http10 = request.raw.httpVersion === '1.0'
    refuseUnservable(request, reply, http10)
    opening++
    let counted = true
    // A reopened stream id held by a live stream (a tab the browser has not
    // noticed is dead, maybe on another instance) moves to this request once
    // it is admitted: the holder keeps its slot until then (admission does
    // not count it), so a refused reopen leaves it be, and a new stream of
    // the user cannot take the slot between the holder's close and this
    // admission. Here, registering this stream replaces it (and the holder's
    // close meanwhile leaves the id's entry to this open); elsewhere, its
    // instance is told below.
    const pending = ledger.begin(options.connectionId)
    /** Admitted, and its entry neither held by a stream of its own nor given back. */
    let entryOwed = false
    try {
      // Nor can a request pipelined behind a stream be answered, ever: it
      // would wait (a publish carried out and never answered) until the
      // stream ended. The stream is refused instead, before it is admitted
      // (and evicts anything), and the requests behind it are served. Those
      // in the same packet as this one are parsed once its handler yields.
      await Promise.resolve()
      if (hasRequestsBehind(request)) throw pipelinedBehindStream()
      const entry = { userId: auth.userId, topics: options.topics, openedAt: Date.now() }
      const admission = await state.admit({
        connectionId: options.connectionId,
        userId: entry.userId,
        topics: entry.topics,
        openedAt: entry.openedAt,
        limit: config.maxConnectionsPerUser,
        policy: config.connectionLimitPolicy
      }).catch((error: unknown) => {
        // Redis away, or busy recording streams again: a retry will do.
        if (error instanceof StoreUnavailableError) reply.header('retry-after', retryAfterS)
        throw error
      })
      if (!admission.admitted) {
        reply.header('retry-after', retryAfterS)
        throw new errors.Limited(`user already holds ${config.maxConnectionsPerUser} streams`)
      }
      pending.seq = admission.seq
      pending.entry = entry
      entryOwed = true
      // Said at once, whatever becomes of this open: the state counts the user
      // online from here, and giving the entry back (a refusal below) starts
      // the grace whose end announces user:offline.
      if (admission.cameOnline) announceSafely(auth.userId, 'user:online')
      await evictFor(admission, options.connectionId)
      // The drain began while this request waited on Redis: it has already ended
      // every registered stream, so this one would outlive it. Its slot goes
      // back before the answer, while Redis is still open.
      // So did a request pipelined behind this one while it was admitted:
      // refused too (the checks before admission cannot see it), though
      // what the admission evicted stays evicted.
      const draining = streams.isDraining
      if (draining || hasRequestsBehind(request)) {
        ledger.leave(pending)
        entryOwed = false
        await ledger.releaseUnlessHeld(options.connectionId, auth.userId, request.log)
        if (!draining) throw pipelinedBehindStream()
        reply.header('retry-after', retryAfterS)
        throw new errors.Unavailable('the gateway is shutting down')
      }
      reply.hijack()
      const socket = reply.raw.socket
      if (socket === null) return
      const endsConnection = http10 || /\bclose\b/i.test(request.headers.connection ?? '')
      const head = headOf(reply, http10, endsConnection)
      // Events are written straight to the socket: Node's response object would
      // re-frame every write for every recipient.
      socket.setNoDelay(true)
      if (endsConnection) notReusable.add(socket)
      releaseHttpState(reply.raw, socket)
      // Nothing waits behind it (checked above, and its parser is gone); if it
      // waited itself, its response never finishes to say so, and the count
      // would refuse every stream of the connection once it is handed back.
      requestsWaiting.delete(socket)
      try {
        // Every field named, in one order: spreading the options into a bigger
        // literal built a slow-mode object per open (≈ 10 µs in a profile).
        const opened = streams.open({
          connectionId: options.connectionId,
          admissionSeq: admission.seq,
          issuedBefore: admission.issuedBefore,
          userId: auth.userId,
          kind: options.kind,
          topics: options.topics,
          channels: options.channels,
          sink: http10 ? new UnchunkedSink(socket, head.length) : socket,
          tokenExpiresAt: auth.expiresAt,
          allowedTopics: auth.topics,
          remoteAddress: clientAddress(request.ip),
          requestId: request.id,
          cursor: cursorOf(request),
          windowChannels: options.windowChannels,
          extraTopics: options.extraTopics,
          closeAfter: options.closeAfter,
          prelude: options.prelude,
          head,
          connectedExtra: options.connectedExtra
        })
        // open() puts the stream in the registry before its first await.
        opening--
        counted = false
        const connection = ledger.ownStream(options.connectionId, admission.seq)
        ledger.leave(pending)
        if (connection !== undefined) {
          entryOwed = false
          ledger.heldByStream(options.connectionId)
        }
        // Evicted meanwhile by an admission after its own.
        if (pending.evictedFor !== null && pending.evictedAt > admission.seq && connection !== undefined) {
          streams.close(connection, 'evicted', 'evicted', { reason: pending.evictedFor })
        }
        await opened
      } catch (error) {
        // Redis not answering in time is expected under its trouble: one line, no stack.
        const unavailable = error instanceof StoreUnavailableError
        if (unavailable) request.log.warn({ connectionId: options.connectionId, reason: error.reason }, 'stream failed to open: Redis did not answer')
        else request.log.error({ err: error, connectionId: options.connectionId }, 'stream failed to open')
        const connection = ledger.ownStream(options.connectionId, admission.seq)
        if (connection !== undefined && connection.closeUnwritten()) {
          // Nothing was written: the client gets a refusal it can act on, not an empty reply.
          const headers = reply.getHeaders() as Record<string, string | number | string[]>
          if (unavailable) {
            refuseOnSocket(socket, 503, 'GW_UNAVAILABLE', error.message, { ...headers, 'retry-after': retryAfterS })
          } else {
            refuseOnSocket(socket, 500, 'GW_INTERNAL', 'Internal Server Error', headers)
          }
          socket.destroySoon()
        } else if (connection !== undefined) {
          connection.close('error')
        } else if (!handedBack.has(socket)) {
          // Unless its stream ended and it went back to serving requests.
          socket.destroy()
        }
      }
    } finally {
      if (counted) opening--
      ledger.leave(pending)
      // Admitted but never registered (the client went, the open failed, or
      // a stream admitted after it holds the id), or refused after a stream
      // of the id here left the entry to it: the last of them gives it back.
      const leftToThis = ledger.leftTo(options.connectionId)
      if (entryOwed) void ledger.releaseUnlessHeld(options.connectionId, auth.userId, request.log)
      else if (leftToThis !== undefined) void ledger.releaseUnlessHeld(options.connectionId, leftToThis, request.log)
    }
  })

  // Streams must end before the server closes, or close() waits on them
  // forever. Until they have (or half of RETRY_MS has passed, if sooner: see
  // stopTakingConnectionsBeforeReconnects), the listener stays open and
  // answers 503 (the server is closing): /ready says so to probes, and a
  // publish on a kept-alive connection is refused in words, not reset. A
  // client that does not read its last frames gets the same grace as a
  // request in flight.
  app.addHook('preClose', async () => {
    await streams.drain(closeGraceMs(config))
  })
  app.addHook('onClose', async () => {
    streams.stop()
  })
}, { name: 'streams', dependencies: ['config', 'registry', 'bus', 'auth', 'metrics'] })
