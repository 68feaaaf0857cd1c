import { renderBody } from './framing'

export const JOB_STATUSES = ['queued', 'active', 'completed', 'failed'] as const
export type JobStatus = typeof JOB_STATUSES[number]

export interface JobUpdate {
  userId: string
  status: JobStatus
  progress?: number
  result?: unknown
  error?: string
  meta?: unknown
}

export interface JobState {
  jobId: string
  userId: string
  status: JobStatus
  progress: number
  result?: unknown
  error?: string
  meta?: unknown
  createdAt: string
  updatedAt: string
  /** Id of the `job_update` event that produced this state. */
  eventId: string
}

export type JobTransition =
  | { ok: true, state: Omit<JobState, 'eventId'>, stateJson: string, body: string }
  | JobRefusal

/**
 * Why an update is refused: a conflict with the job's state (409), a state
 * too large to send (413), or updates racing it that it lost every time (503).
 */
export interface JobRefusal { ok: false, message: string, tooLarge?: true, busy?: true }

/**
 * How deep a job's `result` and `meta` may nest. A job's state is encoded
 * again and again (each update, `initial_status`, GET), deeper in the stack
 * than where the update was checked: what encoded once there could overflow
 * the stack later. Far past any real result.
 */
export const MAX_JOB_NESTING = 512

/** Whether `value` nests arrays or objects more than `max` levels deep; walks it without recursion. */
export function nestsDeeperThan (value: unknown, max: number): boolean {
  const pending: Array<[unknown, number]> = [[value, 0]]
  while (pending.length > 0) {
    const [item, depth] = pending.pop() as [unknown, number]
    if (typeof item !== 'object' || item === null) continue
    if (depth >= max) return true
    for (const child of Array.isArray(item) ? item : Object.values(item)) {
      if (typeof child === 'object' && child !== null) pending.push([child, depth + 1])
    }
  }
  return false
}

export function isTerminal (status: JobStatus): boolean {
  return status === 'completed' || status === 'failed'
}

export const UNFINISHED_JOB_KEPT_S = 30 * 86400

/**
 * How long a job's state is kept after this update: JOB_TTL_S once it has
 * finished. Until then, longer: a job may wait in a queue, or run, for more
 * than JOB_TTL_S without an update, and one whose state was forgotten meanwhile
 * would end its owner's job stream with a 404. Still bounded, for the jobs
 * whose worker died and will never finish them.
 */
export function jobKeptS (status: JobStatus, jobTtlS: number): number {
  return isTerminal(status) ? jobTtlS : Math.max(jobTtlS, UNFINISHED_JOB_KEPT_S)
}

/**
 * The next state of a job and the `job_update` event that announces it, or
 * why the update is refused. The state is sent whole as `initial_status`, and
 * it keeps `result` and `meta` from earlier updates: each update may be under
 * `maxEventBytes` while their sum is not, so the state itself is bounded.
 */
export function transitionJob (jobId: string, previous: JobState | null, update: JobUpdate, now: Date, maxEventBytes: number): JobTransition {
  if (previous !== null) {
    if (previous.userId !== update.userId) return { ok: false, message: `job ${jobId} belongs to another user` }
    if (isTerminal(previous.status)) return { ok: false, message: `job ${jobId} has already ${previous.status}` }
  }
  const updatedAt = now.toISOString()
  const progress = update.progress ?? (update.status === 'completed' ? 100 : previous?.progress ?? 0)
  const state: Omit<JobState, 'eventId'> = {
    jobId,
    userId: update.userId,
    status: update.status,
    progress,
    createdAt: previous?.createdAt ?? updatedAt,
    updatedAt
  }
  if (update.result !== undefined) state.result = update.result
  else if (previous?.result !== undefined) state.result = previous.result
  if (update.error !== undefined) state.error = update.error
  if (update.meta !== undefined) state.meta = update.meta
  else if (previous?.meta !== undefined) state.meta = previous.meta
  const stateJson = JSON.stringify(state)
  const stateBytes = Buffer.byteLength(stateJson)
  // An update that does not grow the state passes: a job stored over the
  // bound (before it, or under a larger MAX_EVENT_BYTES) can still finish.
  // The previous state is measured only then, not on every update.
  if (stateBytes > maxEventBytes && (previous === null || stateBytes > Buffer.byteLength(JSON.stringify(publicJob(previous))))) {
    return { ok: false, tooLarge: true, message: `job ${jobId}'s state would be ${stateBytes} bytes with this update, more than the ${maxEventBytes} allowed` }
  }
  // jobId then status lead, always: isTerminalUpdateOf reads them from the frame.
  const event: Record<string, unknown> = { jobId, status: state.status, progress }
  if (update.result !== undefined) event.result = update.result
  if (update.error !== undefined) event.error = update.error
  event.updatedAt = updatedAt
  return { ok: true, state, stateJson, body: renderBody('job_update', JSON.stringify(event)) }
}

/**
 * Whether a frame sent to job `jobId`'s stream is its terminal job_update:
 * the stream ends after it. Matches the bytes transitionJob writes, so a
 * delivery is not parsed.
 */
export function isTerminalUpdateOf (jobId: string): (frame: Buffer) => boolean {
  const markers = JOB_STATUSES.filter(isTerminal).map((status) => Buffer.from(`data: {"jobId":${JSON.stringify(jobId)},"status":"${status}"`))
  return (frame) => markers.some((marker) => frame.includes(marker))
}

/** What `initial_status` and `GET /v1/jobs/:id` show of a stored job. */
export function publicJob (state: JobState): Omit<JobState, 'eventId'> {
  const { eventId: _eventId, ...rest } = state
  return rest
}
