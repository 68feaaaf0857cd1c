import { LogController, type FastifyReply, type FastifyRequest } from 'fastify'
import { stdSerializers } from 'pino'

/**
 * One line per request, written when it completes, with the request's method,
 * redacted URL and client address. Fastify's default adds an "incoming request"
 * line before it; at thousands of stream opens a second that doubles the log
 * volume for nothing, since a stream logs "stream opened" and "stream closed"
 * (hijacked replies never complete in Fastify's sense) and every other request
 * is short.
 */
export class GatewayLogController extends LogController {
  override incomingRequest (): void {}

  override requestCompleted (error: Error | null | undefined, request: FastifyRequest, reply: FastifyReply): void {
    if (error !== null && error !== undefined) {
      reply.log.error({ req: request, res: reply, err: error, responseTime: reply.elapsedTime }, 'request errored')
    } else {
      logCompleted(request, reply)
    }
  }
}

/** A request's one line, with why it was refused (noteRefusal) if it was. */
export function logCompleted (request: FastifyRequest, reply: FastifyReply): void {
  const refusal = refusals.get(reply)
  reply.log.info({ req: request, res: reply, responseTime: reply.elapsedTime, code: refusal?.code, reason: refusal?.reason }, 'request completed')
}

// Why a request was refused, for its one line: kept only until it completes.
const refusals = new WeakMap<FastifyReply, { code: string | undefined, reason: string }>()

/** Records why `reply` refuses its request (a 4xx, a 503), for the line written when it completes. */
export function noteRefusal (reply: FastifyReply, code: string | undefined, reason: string): void {
  refusals.set(reply, { code, reason })
}

/**
 * An error as a log line may show it. Node's refusal of a malformed request
 * carries the raw request bytes (rawPacket), headers and query string
 * included; Fastify logs it at trace. An ioredis error carries the command it
 * failed (command), whose arguments are event data, job results and user ids.
 */
export function errForLog (error: Error): ReturnType<typeof stdSerializers.err> {
  const { rawPacket: _rawPacket, command: _command, ...rest } = stdSerializers.err(error) as ReturnType<typeof stdSerializers.err> & { rawPacket?: unknown, command?: unknown }
  return rest
}

const TOKEN_PARAMETERS = new Set(['token', 'access_token'])
// Every JWT starts with the base64url of '{"': what a token is, wherever it
// sits in the URL (a stray '?' or ';' puts one inside another value).
// A pattern like /eyJ[\w-]*\.[\w-]*\./ takes time quadratic in a run of
// 'eyJeyJ…' without dots, which anyone could send: runs of the characters a
// JWT is made of are checked in one pass instead.
const JWT_CHARACTER_RUNS = /[\w.-]+/g

/**
 * Whether a run of [\w.-] holds a JWT: 'eyJ' (the base64url of `{"`)
 * followed by two dots, or, where a signer started its header with
 * whitespace (`eyAi`, `Cns`…, which verifiers accept), two parts that decode
 * to JSON objects, the first with a quoted name in it, then a third part. A
 * part may start the run, follow a dot, or follow a `-` or `_` glued to it.
 */
function runHoldsJwt (run: string): boolean {
  const start = run.indexOf('eyJ')
  if (start !== -1) {
    const firstDot = run.indexOf('.', start + 3)
    if (firstDot !== -1 && run.indexOf('.', firstDot + 1) !== -1) return true
  }
  return runHoldsDecodableJwt(run)
}

/** A header and a payload that decode to JSON objects, then a third part: a JWT for certain, not only its look. */
function runHoldsDecodableJwt (run: string): boolean {
  for (let dot = run.indexOf('.'); dot !== -1; dot = run.indexOf('.', dot + 1)) {
    const secondDot = run.indexOf('.', dot + 1)
    if (secondDot === -1) return false
    if (!decodesTo(run.slice(dot + 1, secondDot), OBJECT)) continue
    // The header ends at this dot and starts at the run's start, after the previous dot, or after a - or _ in between.
    const partStart = run.lastIndexOf('.', dot - 1) + 1
    for (let from = partStart; from < dot; from++) {
      if ((from === partStart || run[from - 1] === '-' || run[from - 1] === '_') && decodesTo(run.slice(from, dot), HEADER)) return true
    }
  }
  return false
}

const OBJECT = /^\s*\{/
const HEADER = /^\s*\{\s*"/

/** Whether `part`, at least 4 characters of base64url, decodes to text `pattern` finds at its start. */
function decodesTo (part: string, pattern: RegExp): boolean {
  // Its first 48 bytes see past any whitespace a header would hold.
  return part.length >= 4 && pattern.test(Buffer.from(part.slice(0, 64), 'base64url').toString('latin1'))
}

function holdsJwt (text: string): boolean {
  for (const [run] of text.matchAll(JWT_CHARACTER_RUNS)) if (runHoldsJwt(run)) return true
  return false
}

/**
 * Whether `text` holds a JWT whose header and payload decode: not only
 * `eyJ` and two dots, which redaction is content with, but which an email
 * address (`mickeyJ.r.smith@…`) may have.
 */
export function holdsDecodableJwt (text: string): boolean {
  for (const [run] of text.matchAll(JWT_CHARACTER_RUNS)) if (runHoldsDecodableJwt(run)) return true
  return false
}

/** The text with every run of JWT characters that holds a JWT replaced. */
export function withoutJwts (text: string): string {
  return text.replace(JWT_CHARACTER_RUNS, (run) => runHoldsJwt(run) ? '[redacted]' : run)
}

const ESCAPE_RUNS = /(?:%[0-9A-Fa-f]{2})+/g

/**
 * Decoded as far as it can be: one malformed escape (`%ZZ`, a lone UTF-8
 * byte) must not leave the rest encoded, where a token with its dots as
 * `%2E` would pass the check unseen.
 */
function leniently (text: string): string {
  try {
    return decodeURIComponent(text)
  } catch {
    return text.replace(ESCAPE_RUNS, (run) => {
      try {
        return decodeURIComponent(run)
      } catch {
        return run.replace(/%2E/gi, '.')
      }
    })
  }
}

function decodedComponent (text: string): string {
  return leniently(text.replace(/\+/g, ' ')).trim()
}

/**
 * A URL fit for logs: the value of every query parameter that is named
 * `token` or `access_token` or that holds a JWT is replaced. Names are
 * compared decoded, as the query parser decodes them (`%74oken` is `token`).
 */
export function redactUrl (url: string): string {
  const start = url.indexOf('?')
  const rawPath = start === -1 ? url : url.slice(0, start)
  // Checked decoded: '%2E' for a dot or '%65yJ' must not carry a token past.
  // A path without one is logged as sent.
  const decodedPath = leniently(rawPath)
  const redactedPath = withoutJwts(decodedPath)
  const path = redactedPath === decodedPath ? rawPath : redactedPath
  if (start === -1) return path
  const pairs = url.slice(start + 1).split('&')
  for (let index = 0; index < pairs.length; index++) {
    const pair = pairs[index]
    const equals = pair.indexOf('=')
    const name = decodedComponent(equals === -1 ? pair : pair.slice(0, equals))
    if (holdsJwt(name)) {
      // A token sent as the name (`?<jwt>=1`): the name goes too.
      pairs[index] = '[redacted]'
    } else if (equals !== -1 && (TOKEN_PARAMETERS.has(name.toLowerCase()) || holdsJwt(decodedComponent(pair.slice(equals + 1))))) {
      pairs[index] = `${pair.slice(0, equals)}=[redacted]`
    }
  }
  return `${path}?${pairs.join('&')}`
}

// A client's X-Request-Id is logged with every line of its request: taken
// only when it looks like an id, never when it could be a token.
const REQUEST_ID = /^[\w.:-]{1,128}$/
let requestCount = 0

export function requestIdOf (request: { headers: Record<string, string | string[] | undefined> }): string {
  const given = request.headers['x-request-id']
  if (typeof given === 'string' && REQUEST_ID.test(given) && !holdsJwt(given)) return given
  requestCount = (requestCount + 1) % Number.MAX_SAFE_INTEGER
  return `req-${requestCount.toString(36)}`
}
