import type { FastifyPluginAsync } from 'fastify'
import { Type, type Static } from '@sinclair/typebox'
import { authOf, hasRole } from '../plugins/auth'
import { channel } from '../src/core/channels'
import { frameWithId, renderBody } from '../src/core/framing'
import { isTerminal, isTerminalUpdateOf, JOB_STATUSES, jobKeptS, MAX_JOB_NESTING, nestsDeeperThan, publicJob, type JobState } from '../src/core/jobs'
import { errorResponses, PathId, StreamQuery, UserId } from '../src/schemas/common'
import { errors } from '../src/errors'
import { cursorOf } from '../plugins/streams'
import { detachedCopy, newConnectionId } from '../src/core/ids'

const JobParams = Type.Object({ jobId: PathId })
const JobPut = Type.Object({
  userId: UserId,
  status: Type.Union(JOB_STATUSES.map((status) => Type.Literal(status))),
  progress: Type.Optional(Type.Number({ minimum: 0, maximum: 100 })),
  result: Type.Optional(Type.Unknown()),
  error: Type.Optional(Type.String({ maxLength: 4096 })),
  meta: Type.Optional(Type.Unknown())
}, { additionalProperties: false })

const jobRoutes: FastifyPluginAsync = async (app) => {
  const { config, state } = app

  app.put('/v1/jobs/:jobId', {
    config: { auth: 'publisher', internal: true },
    schema: { params: JobParams, body: JobPut, response: errorResponses }
  }, async (request, reply) => {
    // Kept as the job's key for JOB_TTL_S: not a view into a URL that may carry a token.
    const jobId = detachedCopy((request.params as Static<typeof JobParams>).jobId)
    if (jobId === 'stream') throw new errors.BadRequest('a job may not be named "stream"')
    const update = request.body as Static<typeof JobPut>
    if (nestsDeeperThan(update, MAX_JOB_NESTING + 1)) throw new errors.BadRequest(`the job update is nested too deeply: "result" and "meta" may nest at most ${MAX_JOB_NESTING} levels`)
    // Bounded in depth above, it encodes.
    const bytes = Buffer.byteLength(JSON.stringify(update))
    if (bytes > config.maxEventBytes) throw new errors.TooLarge(`the job update is ${bytes} bytes, more than the ${config.maxEventBytes} allowed`)
    const result = await state.putJob(jobId, update, jobKeptS(update.status, config.jobTtlS), config.maxEventBytes)
    if (!result.ok) {
      if (result.tooLarge === true) throw new errors.TooLarge(result.message)
      // Not 409: to a worker, that says the job ended or is another's, and it would stop.
      if (result.busy === true) {
        reply.header('retry-after', '1')
        throw new errors.Unavailable(result.message)
      }
      throw new errors.Conflict(result.message)
    }
    app.metrics.published('job', 1)
    return result.state
  })

  // Stream routes have no HEAD twin (see routes/stream.ts).
  app.get('/v1/jobs/stream', {
    exposeHeadRoute: false,
    config: { auth: 'user', opensStream: true },
    schema: { querystring: StreamQuery, response: errorResponses }
  }, async (request, reply) => {
    const { userId } = authOf(request)
    await app.openStream(request, reply, {
      connectionId: newConnectionId(),
      kind: 'jobs',
      topics: [],
      channels: [channel.userJobs(userId)]
    })
  })

  const visibleJob = async (jobId: string, userId: string, publisher: boolean): Promise<JobState> => {
    const job = await state.getJob(jobId)
    if (job === null || (job.userId !== userId && !publisher)) throw new errors.NotFound(`no job ${jobId}`)
    return job
  }

  app.get('/v1/jobs/:jobId', {
    config: { auth: 'user' },
    schema: { params: JobParams, response: errorResponses }
  }, async (request) => {
    const auth = authOf(request)
    const { jobId } = request.params as Static<typeof JobParams>
    const publisher = hasRole(auth, 'publisher')
    return publicJob(await visibleJob(jobId, auth.userId, publisher))
  })

  app.get('/v1/jobs/:jobId/stream', {
    exposeHeadRoute: false,
    config: { auth: 'user', opensStream: true },
    schema: { params: JobParams, querystring: StreamQuery, response: { 204: Type.Null(), ...errorResponses } }
  }, async (request, reply) => {
    const { userId } = authOf(request)
    const jobId = detachedCopy((request.params as Static<typeof JobParams>).jobId)
    const job = await visibleJob(jobId, userId, false)
    const cursor = cursorOf(request)
    // Browsers stop reconnecting on 204: the job has nothing more to say.
    if (isTerminal(job.status) && typeof cursor === 'number' && cursor >= Number(job.eventId)) {
      return await reply.code(204).send()
    }
    await app.openStream(request, reply, {
      connectionId: newConnectionId(),
      kind: 'job',
      topics: [],
      channels: [channel.job(jobId, job.userId)],
      connectedExtra: { jobId },
      closeAfter: isTerminalUpdateOf(jobId),
      // Read after joining the job's channel: any later update arrives live.
      prelude: async (connection) => {
        await app.streams.resetIfImpossible(connection, cursor)
        // The job may have expired meanwhile, and its id been taken by someone else.
        const latest = await state.getJob(jobId)
        const current = latest !== null && latest.userId === job.userId ? latest : job
        const id = Number(current.eventId)
        await connection.replay([{ id, frame: frameWithId(id, renderBody('initial_status', JSON.stringify(publicJob(current)))) }])
        if (isTerminal(current.status)) connection.close('completed')
      }
    })
  })
}

export default jobRoutes
