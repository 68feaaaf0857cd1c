import Redis, { type RedisOptions } from 'ioredis'
import { StoreUnavailableError } from '../state'
import * as scripts from './scripts'

export { StoreUnavailableError }
// Here too, where the Redis engine's modules have always found it.
export { RepeatedWarning } from '../repeated-warning'

/** Every script scripts.ts exports, by its export's name. */
export type ScriptName = keyof typeof scripts

/** What the Redis engine logs through (the app's pino logger). */
export interface Log {
  info: (obj: object, msg: string) => void
  warn: (obj: object, msg: string) => void
  error: (obj: object, msg: string) => void
}

/** reasonOf's words for a command cut off by a lost connection. */
export const CUT_OFF = 'the connection to Redis was lost under the command'

/** What went wrong, in one line, for logs that must not carry a Redis error's command arguments. */
export function reasonOf (error: unknown): string {
  // ioredis's words for a command cut off by a lost connection, with resending off (see redisOptions).
  if (error instanceof Error && error.message.startsWith('Reached the max retries per request limit')) return CUT_OFF
  return error instanceof Error ? error.message : String(error)
}

export function redisOptions (): RedisOptions {
  return {
    // Fail fast while Redis is down instead of queueing commands without bound.
    enableOfflineQueue: false,
    // A command in flight when the connection drops may have run: sending it
    // again would publish an event twice (with two ids) or apply a job update
    // twice. With no retry it fails at once, and the caller answers 503.
    // (ioredis drops, without settling, the commands it does not resend, so
    // turning resending off alone would leave them hanging.)
    maxRetriesPerRequest: 0,
    autoResendUnfulfilledCommands: false,
    // The bus, the shared state and the ingress subscribe again on every
    // 'ready' themselves. ioredis's own resubscription leaves its promises
    // unhandled: a connection dropped again before Redis answered it made an
    // unhandled rejection, which ends a Node process.
    autoResubscribe: false,
    // Reconnect forever, backing off to 2 s between attempts.
    retryStrategy: (attempt) => Math.min(100 * attempt, 2000),
    lazyConnect: true,
    connectionName: 'sse-gateway'
  }
}

/**
 * ioredis's errors for a connection that went away under a command, which it
 * may raise while its status still says ready (the socket ended first).
 */
function isConnectionLoss (error: unknown): boolean {
  return error instanceof Error && (error.message === 'Connection is closed.' || error.message.startsWith("Stream isn't writeable"))
}

/** ioredis's error for a command unanswered within `commandTimeout`: it may still run once Redis answers again. */
function isTimeout (error: unknown): boolean {
  return error instanceof Error && error.message === 'Command timed out'
}

/**
 * A command's failure, as `run` and `call` raise it, that leaves unknown
 * whether it ran: unanswered in time (it may run when Redis wakes), or its
 * connection gone under it (sent, its reply lost). Not one refused before it
 * was sent (the socket not writable).
 */
export function mayHaveRun (error: unknown): boolean {
  if (!(error instanceof StoreUnavailableError)) return false
  const cause = error.cause
  if (!(cause instanceof Error)) return false
  return isTimeout(cause) || cause.message === 'Connection is closed.' || cause.message.startsWith('Reached the max retries per request limit')
}

/**
 * The codes by which Redis refuses work for its own condition (out of memory
 * under noeviction, a replica after a failover, a failing snapshot, loading
 * its data, a script running too long): like an unreachable Redis, it
 * passes, and a caller can try again. Not a fault of the request or of the gateway.
 */
export const STORE_CONDITION_CODES = ['OOM', 'READONLY', 'MISCONF', 'LOADING', 'BUSY', 'MASTERDOWN', 'NOREPLICAS', 'TRYAGAIN', 'CLUSTERDOWN']
// Redis 6 wraps an error raised inside a script: "ERR Error running script (…): @user_script:1: -OOM …".
const STORE_CONDITION = new RegExp(`(?:^|: -)(?:${STORE_CONDITION_CODES.join('|')})\\b`)

function isStoreCondition (error: unknown): boolean {
  return error instanceof Error && STORE_CONDITION.test(error.message)
}

/** A Redis connection with the gateway's scripts loaded as commands (EVALSHA, falling back to EVAL). */
export class ScriptedRedis {
  readonly redis: Redis
  /**
   * A command timed out and Redis has answered none since: a Redis frozen
   * with its connection up (SIGSTOP, a paused host) looks connected, and
   * this is what tells /ready, well before the subscriber's PINGs go unanswered.
   */
  private silent = false
  /** What runFirstOnConnect set: the script, and its arguments. */
  private first: { name: ScriptName, args: Array<string | number> } | null = null
  /**
   * The connection on which `first` last passed, and its run in flight, each
   * told by its socket: ioredis turns a connection 'ready' a tick before it
   * says so, and a command sent in between must not pass for one on the
   * connection before.
   */
  private firstRanOn: object | null = null
  private firstRunning: { on: object, done: Promise<void> } | null = null

  constructor (url: string, options: RedisOptions = redisOptions()) {
    this.redis = new Redis(url, options)
    for (const name of Object.keys(scripts) as ScriptName[]) {
      this.redis.defineCommand(`gw${name}`, { numberOfKeys: 0, lua: scripts[name] })
    }
  }

  /**
   * On every connection, `name` runs before any command of run() or call()
   * does: one that looks at what the server is (INIT: a Redis that restarted
   * from older data) before the connection publishes or reads there. Until
   * it passes, each command tries it again first and fails with it.
   */
  runFirstOnConnect (name: ScriptName, args: Array<string | number>): void {
    this.first = { name, args }
  }

  async run (name: ScriptName, args: Array<string | number>): Promise<unknown> {
    return await this.call(async () => await this.script(name, args))
  }

  private script (name: ScriptName, args: Array<string | number>): Promise<unknown> {
    // defineCommand adds methods ioredis cannot type; the name is one we defined above.
    const command = (this.redis as unknown as Record<string, (...a: Array<string | number>) => Promise<unknown>>)[`gw${name}`]
    return command.apply(this.redis, args)
  }

  private async runFirst (socket: object): Promise<void> {
    const first = this.first
    if (first === null) {
      this.firstRanOn = socket
      return
    }
    if (this.firstRunning?.on !== socket) {
      const done: Promise<void> = this.script(first.name, first.args).then(() => {
        if (this.redis.stream === socket) this.firstRanOn = socket
      }).finally(() => {
        if (this.firstRunning?.done === done) this.firstRunning = null
      })
      this.firstRunning = { on: socket, done }
    }
    await this.firstRunning.done
  }

  /** Whether Redis has answered since the last command that timed out. */
  isAnswering (): boolean {
    return !this.silent
  }

  translate (error: unknown): Error {
    if (isTimeout(error)) this.silent = true
    // An error reply (a script's refusal, OOM) is an answer too.
    else if (error instanceof Error && error.name === 'ReplyError') this.silent = false
    if (this.redis.status !== 'ready' || isConnectionLoss(error) || isTimeout(error) || isStoreCondition(error)) return new StoreUnavailableError(error)
    return error instanceof Error ? error : new Error(String(error))
  }

  async call<T> (work: (redis: Redis) => Promise<T>): Promise<T> {
    try {
      // Before any connection (lazyConnect) there is no socket: the command fails as it would.
      const socket: object | undefined = this.redis.stream
      if (socket !== undefined && this.firstRanOn !== socket) await this.runFirst(socket)
      const answer = await work(this.redis)
      this.silent = false
      return answer
    } catch (error) {
      throw this.translate(error)
    }
  }
}
