import { LogController, type FastifyReply, type FastifyRequest } from 'fastify'

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
      const refusal = refusals.get(reply)
      reply.log.info({ req: request, res: reply, responseTime: reply.elapsedTime, code: refusal?.code, reason: refusal?.reason }, 'request completed')
    }
  }
}

// Why a request was refused, for its one line: kept only until it completes.
const refusals = new WeakMap<FastifyReply, { code: string | undefined, reason: string }>()

/** Records why `reply` refuses its request (a 4xx, a 503), for the line written when it completes. */
export function noteRefusal (reply: FastifyReply, code: string | undefined, reason: string): void {
  refusals.set(reply, { code, reason })
}
