import Fastify, { type FastifyHttpOptions, type FastifyInstance, type FastifyReply, type FastifyRequest, type FastifyServerOptions } from 'fastify'
import cors from '@fastify/cors'
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http'
import { Server as NetServer, type Socket } from 'node:net'
import type { DestinationStream } from 'pino'
import { closeGraceMs, stopByMs, type Config } from './config'
import { StoreUnavailableError } from './core/state'
import { errors } from './errors'
import { responseInFlight } from './in-flight'
import { errForLog, GatewayLogController, logCompleted, noteRefusal, redactUrl, requestIdOf, withoutJwts } from './logging'
import configPlugin from '../plugins/config'
import authPlugin from '../plugins/auth'
import registryPlugin from '../plugins/registry'
import metricsPlugin from '../plugins/metrics'
import rateLimitPlugin from '../plugins/rate-limit'
import busPlugin from '../plugins/bus'
import streamsPlugin from '../plugins/streams'
import ingressPlugin from '../plugins/ingress'
import opsRoutes from '../routes/ops'
import streamRoutes from '../routes/stream'
import publishRoutes from '../routes/publish'
import jobRoutes from '../routes/jobs'
import subscriptionRoutes from '../routes/subscriptions'
import conversationRoutes from '../routes/conversations'
import connectionRoutes from '../routes/connections'
import presenceRoutes from '../routes/presence'
import statsRoutes from '../routes/stats'
import pageRoutes from '../routes/pages'
import { RouteMethods } from './route-methods'
import { within } from './core/within'
import { NonFiniteNumberError, parseJsonFinite, utf8OrNull } from './core/json'
import { httpReason, refuseOnSocket } from './raw-answer'
import { clientAddress } from './client-address'
import { ConnectionReserve } from './connection-reserve'
import { openFileLimit } from './open-files'
import { headerLines } from './headers'
import { RepeatedWarning } from './core/repeated-warning'

declare module 'fastify' {
  interface FastifyInstance {
    /** The internal listener's server when INTERNAL_PORT is set (listening once listenInternal ran). */
    internalServer: Server | null
  }
  interface FastifyContextConfig {
    /** Served only on the internal listener when INTERNAL_PORT is set. */
    internal?: boolean
  }
}

export interface BuildOptions {
  /** Where pino writes; tests capture it to prove what is and is not logged. */
  logStream?: DestinationStream
  instanceId?: string
  /** Aborting it ends a start-up still waiting for Redis (the build then rejects). */
  startupSignal?: AbortSignal
}

const internalSockets = new WeakSet<Socket>()
/** Routes that answer as usual while the streams drain: the process is alive, and /ready says it drains. */
const STILL_ANSWERED_WHILE_CLOSING = new Set<string | undefined>(['/health', '/ready', '/metrics'])

/**
 * How long a request may take to arrive whole, head and body (Fastify's
 * default is no limit): a body that stops coming would hold its connection
 * and up to MAX_BODY_BYTES for ever. At least Node's headersTimeout (60 s),
 * as Node requires. A stream's request has no body, so it ends with its head.
 */
const REQUEST_TIMEOUT_MS = 90_000

/**
 * Both listeners' Node options. Node would answer a missing Host with an
 * empty 400 and no log line; an onRequest hook refuses it in the contract's
 * shape instead. Node checks the request timeouts only every
 * connectionsCheckingInterval (30 s by default): 5 s keeps a late answer near
 * its deadline, for a check of the requests under way alone.
 */
const CONNECTIONS_CHECK_MS = 5000
const HTTP_SERVER_OPTIONS = { requireHostHeader: false, requestTimeout: REQUEST_TIMEOUT_MS, connectionsCheckingInterval: CONNECTIONS_CHECK_MS }


/**
 * The router's own refusals (a malformed escape, a path parameter over
 * maxParamLength), in the contract's error shape; Fastify's default echoes
 * the path, which may hold a token.
 */
function routerError (error: Error & { code?: string }, request: FastifyRequest, reply: FastifyReply, routeMethods: RouteMethods, internalPortSet: boolean): void {
  // The router finds a route before its parameter is measured: on the public
  // listener an internal route's 414 would tell that it exists. Its 404 instead.
  // (The router's refusals reach no 404 handler: answered here the same way.)
  if (error.code === 'FST_ERR_MAX_PARAM_LENGTH' && !routeMethods.serves(request.url.split('?')[0], internalHidden(request, internalPortSet), request.method)) {
    answerNotFound(request, reply)
    logCompleted(request, reply)
    return
  }
  const refusals: Record<string, [number, string]> = {
    FST_ERR_BAD_URL: [400, 'the URL is not valid'],
    FST_ERR_MAX_PARAM_LENGTH: [414, 'a path parameter is too long']
  }
  const refusal = error.code !== undefined ? refusals[error.code] : undefined
  if (refusal === undefined) {
    request.log.error({ req: request, err: error }, 'request failed')
    reply.code(500).send({ statusCode: 500, code: 'GW_INTERNAL', error: 'Internal Server Error', message: 'Internal Server Error' })
    return
  }
  const [statusCode, message] = refusal
  noteRefusal(reply, error.code, message)
  reply.code(statusCode).send({ statusCode, code: error.code, error: httpReason(statusCode), message })
  // These never reach a route, whose completion writes the request's line.
  logCompleted(request, reply)
}

/** Connections that have sent a whole request head (see timeFirstRequest). */
const requested = new WeakSet<Socket>()

/**
 * Node times a request head from its first byte (headersTimeout): a
 * connection that never sends one would stay open for ever, holding a file
 * descriptor. Until its first request it gets as long as a head, then is
 * closed without a word (a browser's preconnected socket, unused, must not
 * find an answer there). One whose first head has begun but not ended gets
 * Node's own 408 instead (its timer counts from the head's first byte, and
 * Node checks it every CONNECTIONS_CHECK_MS): this idle timer counts from the
 * last byte, and closing then took that answer away. Listening to the
 * server's 'timeout' keeps Node from destroying every socket whose timer
 * fires, so this does it for the others (kept-alive connections left idle).
 */
function timeFirstRequest (server: Server): void {
  server.on('connection', (socket: Socket) => { socket.setTimeout(server.headersTimeout) })
  server.on('timeout', (socket: Socket) => {
    // (The first request's timer still, not the one set here for Node's check.)
    if (socket.bytesRead > 0 && !requested.has(socket) && socket.timeout === server.headersTimeout) {
      socket.setTimeout(CONNECTIONS_CHECK_MS + 1000)
      return
    }
    socket.destroy()
  })
}

/** Sockets whose refusal is under way: a parser in error reports each later chunk again. */
const refusing = new WeakSet<Socket>()

/**
 * Requests Node's HTTP parser refuses (a malformed head, headers past its
 * limit, a head not received in time) never reach the router: they get the
 * contract's error shape too, and one log line without their bytes, which
 * may hold a token. The connection closes.
 */
function clientError (this: FastifyInstance, error: Error & { code?: string }, socket: Socket): void {
  if (error.code === 'ECONNRESET' || socket.destroyed || refusing.has(socket)) return
  refusing.add(socket)
  const [statusCode, code, message] = error.code === 'HPE_HEADER_OVERFLOW'
    ? [431, 'GW_TOO_LARGE', 'the request head is too large']
    : error.code === 'ERR_HTTP_REQUEST_TIMEOUT'
      ? [408, 'GW_TIMEOUT', 'the request was not received in time']
      : [400, 'GW_BAD_REQUEST', 'the request is not valid HTTP']
  this.log.info({ remoteAddress: socket.remoteAddress, res: { statusCode }, code, reason: error.code ?? error.message }, 'request refused by the HTTP parser')
  refuseAfterAnswersAhead(socket, statusCode, code, message)
}

/** How long a refused request's connection may wait for the answers ahead of it. */
const REFUSAL_WAIT_MS = 30_000

function destroySocket (this: Socket): void {
  this.destroy()
}

/**
 * Refuses the request that reached the socket last, once the answers to
 * those pipelined ahead of it are written (Node gives the connection to the
 * next queued one as each ends): a publish carried out must get its 202, not
 * lose it to the refusal, or its client would publish it again. Then the
 * connection closes, whatever the client does with its side (left half-open,
 * it held the server's close until the drain's deadline). A stream request
 * ahead refuses itself (plugins/streams.ts counts what follows it as a
 * request behind it), so its answer ends too.
 */
function refuseAfterAnswersAhead (socket: Socket, statusCode: number, code: string, message: string): void {
  socket.setTimeout(REFUSAL_WAIT_MS, destroySocket)
  const whenAnswered = (): void => {
    if (socket.destroyed) return
    // Even one whose bytes are all written (see responseInFlight). Not the
    // answer to the very request refused (its body timed out or broke after
    // a route answered early): refuseOnSocket writes nothing into it.
    const inFlight = responseInFlight(socket)
    if (inFlight !== null && inFlight.req?.complete === true) {
      inFlight.once('finish', whenAnswered)
      return
    }
    refuseOnSocket(socket, statusCode, code, message)
    socket.destroySoon()
  }
  whenAnswered()
}

/**
 * Requests Node answers itself unless told otherwise: an `Expect` other than
 * 100-continue got an empty 417 (a probe sending one found /health down),
 * which RFC 9110 lets a server ignore instead; CONNECT got its socket
 * destroyed without a byte. One is served as if it had no `Expect`, the
 * other refused in the contract's shape.
 */
function answerWhatNodeWouldRefuse (app: FastifyInstance, server: Server, maxBodyBytes: number): void {
  server.on('checkExpectation', (request: IncomingMessage, response: ServerResponse) => server.emit('request', request, response))
  // Node invites every body (100 Continue) as soon as the head is read. Here
  // a body is invited once the request has passed its checks (a token, a
  // rate limit, the drain: see inviteBodiesPastChecks): one refused gets its
  // answer while the client still waits to send it, as does one that says it
  // is too large. (Node closes a connection whose 100 was never sent once it
  // is answered.)
  server.on('checkContinue', (request: IncomingMessage, response: ServerResponse) => {
    if (Number(request.headers['content-length']) > maxBodyBytes) continueWithheld.add(request)
    else continueOwed.add(request)
    server.emit('request', request, response)
  })
  server.on('connect', (_request: IncomingMessage, socket: Socket) => {
    // Node took its own error handler and timeout off the socket before
    // handing it here: a client's reset would be an uncaught error (the
    // process ends), and an answer ahead that never comes would hold it.
    socket.on('error', destroySocket)
    app.log.info({ remoteAddress: socket.remoteAddress, res: { statusCode: 400 }, code: 'GW_BAD_REQUEST', reason: 'CONNECT' }, 'request refused by the HTTP parser')
    refuseAfterAnswersAhead(socket, 400, 'GW_BAD_REQUEST', 'the CONNECT method is not served')
  })
}

function loggerOptions (config: Config, stream?: DestinationStream): FastifyServerOptions['logger'] {
  return {
    level: config.logLevel,
    ...(stream !== undefined ? { stream } : {}),
    serializers: {
      // Only what helps an operator; never the headers, which carry tokens.
      req: (request: { method: string, url: string, ip?: string, socket?: { remoteAddress?: string } }) => ({
        method: request.method,
        url: redactUrl(request.url),
        remoteAddress: clientAddress(request.ip)
      }),
      err: errForLog
    },
    redact: ['req.headers.authorization', 'req.headers["x-auth-token"]', 'req.headers.cookie']
  }
}

export async function buildApp (config: Config, options: BuildOptions = {}): Promise<FastifyInstance> {
  const routeMethods = new RouteMethods()
  const app = Fastify(fastifyOptions(config, options.logStream, routeMethods))
  app.addHook('onRoute', (route) => routeMethods.add(route.url, route.method, route.config?.internal === true))
  answerErrors(app, routeMethods, config.internalPort !== null)
  const reserve = keepDescriptorReserve(app)
  checkEveryRequest(app, config.maxBodyBytes)
  answerShadowedPathsAsNotServed(app, routeMethods)
  parseEveryBodyAsJson(app)
  // After the preParsing check of the body's encoding: a refused one is not invited either.
  inviteBodiesPastChecks(app)
  await app.register(configPlugin, { config })
  if (config.corsOrigins !== null) await allowOrigins(app, config.corsOrigins, routeMethods, config.internalPort !== null)
  // After CORS, so that a page can read the 503 of a request refused while draining.
  const closingPhase: ClosingPhase = { listenersClosed: false }
  answerWhileClosing(app, closingPhase, config.internalPort !== null)
  if (config.trustProxy === null) warnOfUntrustedProxy(app)
  const internalServer = config.internalPort !== null ? internalListener(app, config.maxBodyBytes) : null
  if (internalServer !== null) reserve?.watch(internalServer, false)
  app.decorate('internalServer', internalServer)

  await app.register(registryPlugin, { instanceId: options.instanceId })
  await app.register(busPlugin, { startupSignal: options.startupSignal })
  await app.register(metricsPlugin)
  await app.register(authPlugin)
  await app.register(rateLimitPlugin)
  cutConnectionsAfterGrace(app, config, internalServer)
  stopTakingConnectionsBeforeReconnects(app, config, closingPhase)
  await app.register(streamsPlugin)

  await app.register(opsRoutes)
  await app.register(streamRoutes)
  await app.register(publishRoutes)
  await app.register(ingressPlugin)
  await app.register(jobRoutes)
  await app.register(subscriptionRoutes)
  await app.register(conversationRoutes)
  await app.register(connectionRoutes)
  await app.register(presenceRoutes)
  await app.register(statsRoutes)
  await app.register(pageRoutes, { adminInternal: config.internalPort !== null })
  answerKeptAliveBeforeClosing(app, config, internalServer, closingPhase)
  if (internalServer !== null) closeInternalListenerAfterDrain(app, internalServer)
  return app
}

function fastifyOptions (config: Config, logStream: DestinationStream | undefined, routeMethods: RouteMethods): FastifyHttpOptions<Server> {
  return {
    logger: loggerOptions(config, logStream),
    logController: new GatewayLogController(),
    bodyLimit: config.maxBodyBytes,
    // Also in HTTP_SERVER_OPTIONS, for the internal listener: Fastify sets
    // its own over the public server's (none by default).
    requestTimeout: REQUEST_TIMEOUT_MS,
    trustProxy: config.trustProxy ?? false,
    // Closing ends idle keep-alive connections and lets requests in flight be
    // answered (a publish its 202, an open its 503): destroying every socket
    // would leave a publisher not knowing whether its event went out. Streams
    // are not HTTP connections any more; the drain ends them.
    forceCloseConnections: 'idle',
    // Refused by the hook below instead: in the contract's shape, and with
    // /health still answering (the process is alive while it drains).
    return503OnClosing: false,
    requestIdHeader: false,
    genReqId: requestIdOf,
    // Room for the longest id a schema allows (a user id: 256 characters, up
    // to 9 each percent-encoded), so the schema, not the router, refuses.
    routerOptions: { maxParamLength: 2304 },
    frameworkErrors: (error, request, reply) => routerError(error, request, reply, routeMethods, config.internalPort !== null),
    clientErrorHandler: clientError,
    http: HTTP_SERVER_OPTIONS,
    ajv: { customOptions: { removeAdditional: false, coerceTypes: false, allErrors: false } },
    // Event data and job results pass through as the publisher wrote them, as
    // they do through Redis ingress: JSON.parse makes `__proto__` an own key,
    // and nothing here merges a body into another object, which is the only
    // way such a key could reach a prototype. Refusing it would drop a map
    // keyed by user names the day a user calls themself `__proto__`.
    onProtoPoisoning: 'ignore',
    onConstructorPoisoning: 'ignore',
    // Fastify gives up on a plugin after 10 s, but the bus's may wait for
    // Redis this long; its own deadline must come first, so that a start
    // given up on leaves nothing running.
    pluginTimeout: Math.max(10_000, config.redisStartupTimeoutMs + 10_000)
  }
}

function answerErrors (app: FastifyInstance, routeMethods: RouteMethods, internalPortSet: boolean): void {
  app.setErrorHandler((error: Error & { statusCode?: number, validation?: unknown, code?: string }, request, reply) => {
    const statusCode = error.statusCode !== undefined && error.statusCode >= 400 && error.statusCode < 600 ? error.statusCode : 500
    if (error.code === 'FST_ERR_CTP_BODY_TOO_LARGE') readRestOfRefusedBody(request.raw, reply)
    // Fastify closes the connection after any body it could not parse, for
    // a client that may send more of it. One read whole (not JSON) leaves the
    // connection sound, and requests pipelined behind it, which run whatever
    // this answer is, must get their answers: it goes on.
    else if (unparsableBodies.has(error) && request.raw.complete) reply.removeHeader('connection')
    if (statusCode === 503) {
      // Expected while Redis is away or the instance drains: one line, no stack,
      // for every reconnect attempt of every browser.
      noteRefusal(reply, error.code, error instanceof StoreUnavailableError ? error.reason : error.message)
      return reply.code(503).send({ statusCode, code: 'GW_UNAVAILABLE', error: 'Service Unavailable', message: withoutJwts(error.message) })
    }
    if (statusCode >= 500 && error.code !== 'GW_NOT_IMPLEMENTED') {
      request.log.error({ err: error }, 'request failed')
      return reply.code(statusCode).send({ statusCode, code: 'GW_INTERNAL', error: 'Internal Server Error', message: 'Internal Server Error' })
    }
    const code = gatewayCodeOf(error.code, statusCode)
    // A message may echo a path parameter or a query value, where a client may
    // have put its token; the answer can end up in a proxy's or a browser's
    // error report, so it is kept out of both.
    const message = withoutJwts(error.message)
    noteRefusal(reply, code, message)
    return reply.code(statusCode).send({
      statusCode,
      code,
      error: httpReason(statusCode),
      message
    })
  })

  app.setNotFoundHandler((request, reply) => {
    // A preflight from an origin CORS_ORIGINS does not allow: answered, but
    // with no CORS header, so the browser says the origin is not allowed
    // rather than that a route is missing.
    if (request.method === 'OPTIONS' && request.headers.origin !== undefined && request.headers['access-control-request-method'] !== undefined) {
      reply.code(204).send()
      return
    }
    const path = request.url.split('?')[0]
    const allowed = routeMethods.allowed(path, request.method, internalHidden(request, internalPortSet))
    if (allowed !== null) {
      reply.code(405).header('allow', allowed.join(', ')).send({
        statusCode: 405,
        code: 'GW_METHOD_NOT_ALLOWED',
        error: 'Method Not Allowed',
        message: `${request.method} is not allowed here: ${allowed.join(', ')}`
      })
      return
    }
    answerNotFound(request, reply)
  })
}

/** The 404 of a path no route (visible on this listener) serves. */
function answerNotFound (request: FastifyRequest, reply: FastifyReply): void {
  reply.code(404).send({
    statusCode: 404,
    code: 'GW_NOT_FOUND',
    error: 'Not Found',
    message: `Route ${request.method} ${redactUrl(request.url.split('?')[0])} not found`
  })
}

/**
 * Where the open-file limit is known, connections doing nothing give way
 * before they take the descriptors Redis and the health probe need.
 */
function keepDescriptorReserve (app: FastifyInstance): ConnectionReserve | null {
  const fileLimit = openFileLimit()
  if (fileLimit === null) return null
  const reclaimed = new RepeatedWarning(app.log, 'connections near the open-file limit: idle ones closed')
  const refused = new RepeatedWarning(app.log, 'connections near the open-file limit: new ones closed on arrival')
  const reserve = new ConnectionReserve(fileLimit, {
    reclaimed: (closed, connections) => reclaimed.warn({ openFileLimit: fileLimit, connections, closedBeforeFirstRequest: closed.beforeFirstRequest, closedBetweenRequests: closed.betweenRequests }),
    refused: (connections) => refused.warn({ openFileLimit: fileLimit, connections })
  })
  reserve.watch(app.server, true)
  // Every request Node parsed, on either listener: also those the router
  // refuses before any hook runs (a malformed escape), which would otherwise
  // leave their connection never marked idle again.
  app.server.on('request', (request: IncomingMessage, response: ServerResponse) => reserve.requested(request.socket, response))
  return reserve
}

function checkEveryRequest (app: FastifyInstance, maxBodyBytes: number): void {
  timeFirstRequest(app.server)
  answerWhatNodeWouldRefuse(app, app.server, maxBodyBytes)
  // RFC 9112 §3.2: an HTTP/1.1 request without Host is refused. HTTP/1.0 has none to send.
  app.addHook('onRequest', (request, _reply, done) => {
    // Its first request came (see timeFirstRequest); a stream may be quiet for longer.
    request.raw.socket.setTimeout(0)
    requested.add(request.raw.socket)
    // The request's framing is sound: the connection goes on, and requests
    // pipelined behind it, which run whatever this answer is, get theirs.
    if (request.headers.host === undefined && request.raw.httpVersion === '1.1') {
      done(new errors.BadRequest('the Host header is missing'))
    } else if (headerLines(request.raw.rawHeaders, 'host') > 1) {
      // RFC 9112 §3.2 again: Node keeps the first, a proxy before it may have read another.
      done(new errors.BadRequest('the Host header is given more than once'))
    } else {
      done()
    }
  })
}

function answerShadowedPathsAsNotServed (app: FastifyInstance, routeMethods: RouteMethods): void {
  // The router takes a path with a route of its own, asked with HEAD that
  // route does not take, for a parameter's value of a GET route's path (HEAD
  // /v1/jobs/stream for a job named "stream"): it gets that path's 405
  // before the other route's hooks ask for a token. (A PUT of a job named
  // "stream" is the job route's to refuse, saying why.)
  app.addHook('onRequest', (request, reply, done) => {
    if (request.method === 'HEAD' && routeMethods.shadowedByExact(request.url.split('?')[0], request.routeOptions.url)) {
      reply.callNotFound()
      return
    }
    done()
  })
}

function parseEveryBodyAsJson (app: FastifyInstance): void {
  // Every body this API takes is JSON, whatever the request calls it: fetch()
  // labels a string body text/plain, curl -d labels it a form. Turning those
  // away (415) or reading them as strings ("must be an object") fails a
  // publisher over a header; one parser for every label gives a body that
  // does not parse the same 400 under each. Cookies never authenticate a
  // POST, PUT or DELETE (plugins/auth.ts), so a form another site submits
  // still carries no credentials.
  app.removeAllContentTypeParsers()
  // A label Fastify cannot parse as a media type (`json`, an empty one) got
  // 415 before any parser ran: the label is read as what every body is.
  app.addHook('onRequest', (request, _reply, done) => {
    if (request.raw.headers['content-type'] !== undefined) request.raw.headers['content-type'] = 'application/json'
    done()
  })
  // A compressed body would be read as JSON and refused as malformed: say what is wrong (RFC 7694).
  app.addHook('preParsing', (request, reply, payload, done) => {
    const encoding = request.headers['content-encoding']?.trim().toLowerCase()
    // GET and HEAD bodies are never read (a stream opens whatever it carries).
    const transfer = request.headers['transfer-encoding']
    const hasBody = request.method !== 'GET' && request.method !== 'HEAD' &&
      (transfer !== undefined || Number(request.headers['content-length'] ?? 0) > 0)
    if (!hasBody || request.is404) {
      done(null, payload)
      return
    }
    // Node's parser takes `gzip, chunked` for chunked and hands on the
    // compressed bytes: refused for the coding (RFC 9112 §6.1), not as JSON
    // that does not parse, nor read as JSON when it happens to be some.
    if (transfer !== undefined && transfer.trim().toLowerCase() !== 'chunked') {
      done(new errors.NotImplemented('Transfer-Encoding other than chunked is not supported: send the body uncompressed'), payload)
      return
    }
    if (encoding === undefined || encoding === '' || encoding === 'identity') {
      done(null, payload)
      return
    }
    reply.header('accept-encoding', 'identity')
    done(new errors.UnsupportedMediaType('Content-Encoding is not supported: send the body uncompressed'), payload)
  })
  app.addContentTypeParser('*', { parseAs: 'buffer' }, (request, body, done) => {
    // An unknown route answers 404 whatever its body.
    if (request.is404) {
      done(null, undefined)
      return
    }
    const text = utf8OrNull(body as Buffer)
    if (text === null) {
      const refusal = new errors.BadRequest('the body is not valid UTF-8')
      unparsableBodies.add(refusal)
      done(refusal, undefined)
      return
    }
    try {
      done(null, parseJsonFinite(text))
    } catch (error) {
      const refusal = new errors.BadRequest(error instanceof NonFiniteNumberError ? `the body holds ${error.message}` : 'the body is not valid JSON')
      unparsableBodies.add(refusal)
      done(refusal, undefined)
    }
  })
}

async function allowOrigins (app: FastifyInstance, origins: string[], routeMethods: RouteMethods, internalPortSet: boolean): Promise<void> {
  const allowedOrigins = new Set(origins)
  // Before CORS's own hook, which answers every OPTIONS as a preflight: one
  // without Origin or Access-Control-Request-Method got a text/plain 400,
  // and one for a path no route serves here got the allow headers.
  app.addHook('onRequest', (request, reply, done) => {
    if (request.method !== 'OPTIONS') {
      done()
      return
    }
    const headers = request.headers
    if (headers.origin === undefined || headers['access-control-request-method'] === undefined) {
      // Not a preflight: an OPTIONS request like any other method this API does not take (405, or 404).
      reply.callNotFound()
      return
    }
    if (!routeMethods.serves(request.url.split('?')[0], internalHidden(request, internalPortSet))) {
      // The not-found handler's answer to a preflight: 204 without CORS headers.
      reply.callNotFound()
      return
    }
    done()
  })
  await app.register(cors, {
    // "*" with credentials must echo the caller's origin, never send a
    // literal "*". Any other origin gets no CORS header at all: given the
    // list itself, @fastify/cors sent Access-Control-Allow-Credentials to
    // every origin, allowed or not.
    origin: allowedOrigins.has('*')
      ? true
      : (origin, done) => { done(null, origin !== undefined && allowedOrigins.has(origin) ? origin : false) },
    credentials: true,
    methods: ['GET', 'POST', 'PUT', 'DELETE', 'OPTIONS'],
    // Cache-Control and X-Requested-With: EventSource polyfills and fetch-based
    // SSE clients send them by default, and a preflight that left them out fails the stream.
    allowedHeaders: ['Authorization', 'X-Auth-Token', 'Content-Type', 'Last-Event-ID', 'Cache-Control', 'X-Requested-With', 'X-Request-Id', 'Idempotency-Key'],
    exposedHeaders: ['Idempotent-Replayed', 'Retry-After', 'X-Total-Count'],
    maxAge: 600
  })
}

function answerWhileClosing (app: FastifyInstance, phase: ClosingPhase, internalPortSet: boolean): void {
  // Answers given while closing end their connection: a keep-alive connection
  // left idle would hold the close until its timeout (72 s).
  let closing = false
  app.addHook('preClose', async () => {
    closing = true
  })
  app.addHook('onSend', (_request, reply, payload, done) => {
    if (closing) reply.header('connection', 'close')
    // Answers are per caller (job state, presence, listings, ids): no cache
    // on the way, nor the browser's, may keep one. Pages set their own.
    if (!reply.hasHeader('cache-control')) reply.header('cache-control', 'no-store')
    done(null, payload)
  })

  // While the streams drain, the listener stays open (for half of RETRY_MS at
  // most, see stopTakingConnectionsBeforeReconnects) so that clients are
  // told in words to go elsewhere (and a preflight is still answered, by
  // CORS's hook before this one). /ready says draining itself,
  // and /health and /metrics keep showing the process as it drains.
  // (routeOptions builds an object on every read: only while closing.)
  app.addHook('onRequest', (request, reply, done) => {
    if (!closing || STILL_ANSWERED_WHILE_CLOSING.has(request.routeOptions.url)) {
      done()
    } else if (request.routeOptions.config.internal === true && internalHidden(request, internalPortSet)) {
      // Not served on this listener: its 404 (internalListener's hook), as
      // before the close. A 503 would tell the route exists.
      done()
    } else if (phase.listenersClosed && request.routeOptions.config.opensStream === true) {
      // Once the listeners are closed, a stream reopened on a kept-alive
      // connection (see answerKeptAliveBeforeClosing) loses it: an
      // EventSource ends for good on a 503, but retries a dropped connection,
      // and its next connect finds the listener closed, as it would have.
      // Not before an answer pipelined ahead of it (a publish's) is written.
      const socket = request.raw.socket
      const ahead = responseInFlight(socket)
      if (ahead !== null && ahead !== reply.raw && !ahead.writableFinished) ahead.once('finish', () => socket.destroy())
      else socket.destroy()
    } else {
      done(new errors.Unavailable('the gateway is shutting down'))
    }
  })
}

/** Where a close stands, for the hooks that answer requests meanwhile. */
interface ClosingPhase {
  /** The public listener takes no connection any more: past the drain (answerKeptAliveBeforeClosing, the internal one too), or half of RETRY_MS into the stop (stopTakingConnectionsBeforeReconnects). */
  listenersClosed: boolean
}

function warnOfUntrustedProxy (app: FastifyInstance): void {
  // Behind a proxy that is not trusted, every client has the proxy's
  // address: one bucket of RATE_LIMIT_STREAMS_PER_MIN for everyone, and
  // browsers do not retry an EventSource refused with 429. Said once.
  let warned = false
  app.addHook('onRequest', (request, _reply, done) => {
    if (!warned && request.headers['x-forwarded-for'] !== undefined) {
      warned = true
      request.log.warn({ remoteAddress: request.ip }, 'requests carry X-Forwarded-For but TRUST_PROXY is unset: rate limits and logs see the proxy\'s address for every client')
    }
    done()
  })
}

/** Whether `request` came on the public listener while INTERNAL_PORT keeps the internal routes elsewhere. */
function internalHidden (request: FastifyRequest, internalPortSet: boolean): boolean {
  return internalPortSet && !internalSockets.has(request.raw.socket)
}

/** The listener of INTERNAL_PORT: the same app, whose publisher and admin routes answer only there. */
function internalListener (app: FastifyInstance, maxBodyBytes: number): Server {
  const server = createServer(HTTP_SERVER_OPTIONS, (request, response) => app.server.emit('request', request, response))
  server.on('clientError', clientError.bind(app))
  server.on('connection', (socket: Socket) => internalSockets.add(socket))
  timeFirstRequest(server)
  answerWhatNodeWouldRefuse(app, server, maxBodyBytes)
  // Publisher and admin routes do not exist on the public listener.
  app.addHook('onRequest', async (request, reply) => {
    if (request.routeOptions.config.internal === true && !internalSockets.has(request.raw.socket)) {
      reply.callNotFound()
      return reply
    }
  })
  return server
}

/**
 * Requests in flight get a while to be answered; one that never ends (a
 * client that sent half a request) must not hold the close, which would
 * then end by the deadline, without closing Redis: after the grace every
 * connection still open is cut. Armed before the drain's hook (hooks run
 * in the order they are added), which waits within the same grace.
 */
function cutConnectionsAfterGrace (app: FastifyInstance, config: Config, internalServer: Server | null): void {
  intoTheClose(app, closeGraceMs(config), () => {
    app.server.closeAllConnections()
    internalServer?.closeAllConnections()
  })
}

/** Runs `action` `delayMs` after the close begins (its preClose hook), unless the close has ended by then. */
function intoTheClose (app: FastifyInstance, delayMs: number, action: () => void): void {
  let timer: NodeJS.Timeout | null = null
  app.addHook('preClose', async () => {
    timer = setTimeout(action, delayMs).unref()
  })
  app.addHook('onClose', async () => {
    if (timer !== null) clearTimeout(timer)
  })
}

/** The listeners take no new connection; those open stay (their requests get 503 while closing). */
function stopTakingConnections (servers: Array<Server | null>, phase: ClosingPhase): void {
  phase.listenersClosed = true
  // net.Server's own close: Node's HTTP one would also end the idle connections at once.
  for (const server of servers) if (server?.listening === true) NetServer.prototype.close.call(server)
}

/**
 * A browser's EventSource ends for good on a 503 and retries a refused
 * connect. A client that stopped reading holds the drain, and with it the
 * listener's 503s, for up to the grace (5 s), while the streams it ended
 * reconnect RETRY_MS (3 s) after their `shutdown`: they met the 503 and
 * stopped until their page was reloaded. So the public listener stops
 * taking connections half of RETRY_MS into the close at the latest, and
 * such a reconnect is refused (behind a proxy, sent to another instance),
 * as after a drain. A drain without such a client ends well before. The
 * internal listener, which no browser reaches, still answers 503 until the drain ends.
 */
function stopTakingConnectionsBeforeReconnects (app: FastifyInstance, config: Config, phase: ClosingPhase): void {
  const beforeReconnectsMs = Math.min(closeGraceMs(config), Math.floor(config.retryMs / 2))
  intoTheClose(app, beforeReconnectsMs, () => stopTakingConnections([app.server], phase))
}

/**
 * Closing a listener ends its idle kept-alive connections, and a request
 * already on its way on one (a publisher sending back to back) meets a reset
 * instead of an answer: not knowing whether its event went out, a publisher
 * that retries only a 503 drops it. So after the drain the listeners first
 * stop taking connections (a refused connect is plainly not sent), and the
 * connections whose last request was a write (POST, PUT, DELETE) get a
 * while: each request on one is answered 503 with `Connection: close`
 * (answerWhileClosing), and the wait ends once none is left. A tenth of the
 * stop's time, at most a second: the lease hand-over and Redis's close come
 * after. Then the idle ones are ended, as Fastify does at close.
 */
function answerKeptAliveBeforeClosing (app: FastifyInstance, config: Config, internalServer: Server | null, phase: ClosingPhase): void {
  /** Open connections whose last request was a write. */
  const writers = new Set<Socket>()
  let allGone: (() => void) | null = null
  const forget = (socket: Socket): void => {
    if (!writers.delete(socket)) return
    if (writers.size === 0) allGone?.()
  }
  function forgetOnClose (this: Socket): void {
    forget(this)
  }
  // The internal listener hands its requests to this server (internalListener).
  app.server.on('request', (request: IncomingMessage) => {
    const socket = request.socket
    // Not kept for a read: a stream taking the connection over drops its close listeners.
    if (request.method === 'GET' || request.method === 'HEAD' || request.method === 'OPTIONS') {
      forget(socket)
      return
    }
    if (writers.has(socket)) return
    writers.add(socket)
    // Listened to again at each entry: a stream that held the connection
    // meanwhile (handed back after it) dropped the listener, and a closed
    // socket that stayed here would be held for ever, and hold every stop
    // for its full wait. Removed first, so that there is one at most.
    socket.removeListener('close', forgetOnClose)
    socket.once('close', forgetOnClose)
  })
  app.addHook('preClose', async () => {
    stopTakingConnections([app.server, internalServer], phase)
    if (writers.size === 0) return
    await within(new Promise<void>((resolve) => { allGone = resolve }), Math.min(1000, stopByMs(config) / 10), () => {})
    allGone = null
  })
}

/**
 * After the drain's preClose hook (hooks run in the order they are added),
 * so no stream opens while this waits, and before Redis closes (onClose):
 * requests in flight on this listener are answered first.
 */
function closeInternalListenerAfterDrain (app: FastifyInstance, server: Server): void {
  app.addHook('preClose', async () => {
    // Not listening any more (see answerKeptAliveBeforeClosing), but its idle
    // connections are ended here, and the callback waits for the others.
    await new Promise<void>((resolve) => server.close(() => resolve()))
  })
}

/** The refusals of bodies read whole that are not JSON (see the error handler). */
const unparsableBodies = new WeakSet<Error>()

/** Requests whose 100 Continue was not sent (their body is too large): the client may never send it. */
const continueWithheld = new WeakSet<IncomingMessage>()
/** Requests that asked for 100 Continue and get it once past their checks. */
const continueOwed = new WeakSet<IncomingMessage>()

/** preParsing comes after every onRequest hook: the request is to be carried out, and its body is wanted. */
function inviteBodiesPastChecks (app: FastifyInstance): void {
  app.addHook('preParsing', (request, reply, payload, done) => {
    if (continueOwed.delete(request.raw)) reply.raw.writeContinue()
    done(null, payload)
  })
}

/** How much of a refused body is read, and for how long, before the connection is cut. */
const REFUSED_BODY_MAX_BYTES = 64 * 1024 * 1024
const REFUSED_BODY_MAX_MS = 10_000

/**
 * Fastify closes the connection after a body too large, and the client, still
 * sending it, got a reset (EPIPE) instead of the 413, which it had no time to
 * read: a publisher saw a network error and retried. The rest of the body is
 * read and dropped instead, as nginx's lingering close does, within bounds
 * past which the connection is cut; the connection then serves the next
 * request. Not when its 100 Continue was withheld: the client may not send
 * the body at all, and what it sends next could be read as that body.
 */
function readRestOfRefusedBody (request: IncomingMessage, reply: FastifyReply): void {
  if (request.complete || continueWithheld.has(request)) return
  reply.removeHeader('connection')
  let left = REFUSED_BODY_MAX_BYTES
  const cut = (): void => { request.socket.destroy() }
  const timer = setTimeout(cut, REFUSED_BODY_MAX_MS)
  const count = (chunk: Buffer): void => {
    left -= chunk.length
    if (left < 0) cut()
  }
  const done = (): void => {
    clearTimeout(timer)
    request.removeListener('data', count)
  }
  request.on('data', count)
  request.once('end', done)
  request.once('close', done)
}

/** The gateway's codes for Fastify's own refusals of a request, by status. */
const GATEWAY_CODES: Record<number, string> = { 400: 'GW_BAD_REQUEST', 413: 'GW_TOO_LARGE' }

/**
 * Programs branch on the `GW_` codes, so Fastify's refusals (a body over
 * bodyLimit, a Content-Length that does not match it) get the one of their
 * status. A body failing a route's schema keeps FST_ERR_VALIDATION: its
 * message names the field, which a program may want to tell apart.
 */
function gatewayCodeOf (code: string | undefined, statusCode: number): string | undefined {
  if (code === undefined || !code.startsWith('FST_') || code === 'FST_ERR_VALIDATION') return code
  return GATEWAY_CODES[statusCode] ?? code
}

/**
 * Starts the second listener for publisher and admin routes (INTERNAL_PORT).
 * It hands requests to the same app, so both listeners share one set of
 * streams and one bus.
 */
export async function listenInternal (app: FastifyInstance, port: number, host: string): Promise<Server> {
  const server = app.internalServer
  if (server === null) throw new Error('INTERNAL_PORT is not configured')
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject)
    server.listen(port, host, () => {
      server.off('error', reject)
      resolve()
    })
  })
  return server
}
