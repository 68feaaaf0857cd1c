/** The main thread's handle on the load-client workers: splits work, merges results. */
import { join } from 'node:path'
import { Worker } from 'node:worker_threads'
import type { ChurnResult, Command, OpenResult, Progress, Reply, Report, StreamPlan, WorkerInit } from './client-protocol'
import { Histogram } from './histogram'

type Pending = { resolve: (reply: Reply) => void, reject: (error: Error) => void }
/** A command as the pool sends it: the pool adds the request id. */
type Request = Command extends infer C ? C extends { id: number } ? Omit<C, 'id'> : never : never

export interface OpenSummary {
  requested: number
  established: number
  failed: number
  errors: Record<string, number>
  /** First connect to last stream open, over all workers. */
  elapsedMs: number
  handshake: Histogram
}

export interface ReportSummary extends Omit<Report, 'latency' | 'elu' | 'minEvents' | 'lagP99Us' | 'lagMaxUs'> {
  minEvents: number
  latency: Histogram
  elu: number[]
  /** Worst worker's event-loop delay p99 and max, µs. */
  lagP99Us: number
  lagMaxUs: number
}

export interface ChurnSummary extends Omit<ChurnResult, 'latency' | 'elu' | 'maxLive'> {
  maxLive: number
  latency: Histogram
  elu: number[]
}

function mergeErrors (into: Record<string, number>, from: Record<string, number>): void {
  for (const [key, n] of Object.entries(from)) into[key] = (into[key] ?? 0) + n
}

class ClientWorker {
  private readonly worker: Worker
  private readonly pending = new Map<number, Pending>()
  private nextId = 1
  private exited = false

  constructor (init: WorkerInit) {
    this.worker = new Worker(join(__dirname, 'client-worker.js'), { workerData: init })
    this.worker.on('message', (reply: Reply) => {
      const waiter = this.pending.get(reply.id)
      if (waiter === undefined) return
      this.pending.delete(reply.id)
      if (reply.type === 'failed') waiter.reject(new Error(`client worker ${init.workerIndex}: ${reply.message}`))
      else waiter.resolve(reply)
    })
    const failAll = (error: Error): void => {
      this.exited = true
      for (const waiter of this.pending.values()) waiter.reject(error)
      this.pending.clear()
    }
    this.worker.on('error', failAll)
    this.worker.on('exit', (code) => failAll(new Error(`client worker ${init.workerIndex} exited with code ${code}`)))
  }

  request (command: Request): Promise<Reply> {
    if (this.exited) return Promise.reject(new Error('client worker has exited'))
    const id = this.nextId++
    return new Promise<Reply>((resolve, reject) => {
      this.pending.set(id, { resolve, reject })
      this.worker.postMessage({ ...command, id })
    })
  }

  async stop (): Promise<void> {
    this.exited = true
    await this.worker.terminate()
  }
}

function expect<T extends Reply['type']> (reply: Reply, type: T): Extract<Reply, { type: T }> {
  if (reply.type !== type) throw new Error(`client worker answered ${reply.type}, expected ${type}`)
  return reply as Extract<Reply, { type: T }>
}

/** Splits `total` into `parts` near-equal shares. */
function shares (total: number, parts: number): number[] {
  return Array.from({ length: parts }, (_, index) => Math.floor(total / parts) + (index < total % parts ? 1 : 0))
}

export class ClientPool {
  private constructor (private readonly workers: ClientWorker[]) {}

  static start (count: number, clockOffsetUs: number): ClientPool {
    return new ClientPool(Array.from({ length: count }, (_, workerIndex) => new ClientWorker({ workerIndex, clockOffsetUs })))
  }

  get size (): number {
    return this.workers.length
  }

  /** Opens `count` streams with at most `inFlight` handshakes in flight in total. */
  async open (plan: StreamPlan, count: number, inFlight: number, firstIndex = 0): Promise<OpenSummary> {
    const counts = shares(count, this.workers.length)
    const flights = shares(Math.max(inFlight, this.workers.length), this.workers.length)
    let first = firstIndex
    const replies = await Promise.all(this.workers.map((worker, index) => {
      const command: Request = { type: 'open', plan, first, count: counts[index], inFlight: flights[index] }
      first += counts[index]
      return worker.request(command)
    }))
    const results: OpenResult[] = replies.map((reply) => expect(reply, 'opened').result)
    const handshake = new Histogram()
    const errors: Record<string, number> = {}
    let start = Number.POSITIVE_INFINITY
    let end = 0
    for (const result of results) {
      handshake.merge(Histogram.from(result.handshake))
      mergeErrors(errors, result.errors)
      start = Math.min(start, result.startUs)
      end = Math.max(end, result.endUs)
    }
    return {
      requested: count,
      established: results.reduce((sum, result) => sum + result.established, 0),
      failed: results.reduce((sum, result) => sum + result.failed, 0),
      errors,
      elapsedMs: count === 0 ? 0 : (end - start) / 1000,
      handshake
    }
  }

  async reset (): Promise<void> {
    await Promise.all(this.workers.map(async (worker) => expect(await worker.request({ type: 'reset' }), 'reset')))
  }

  async progress (): Promise<Progress> {
    const all = await Promise.all(this.workers.map(async (worker) => expect(await worker.request({ type: 'progress' }), 'progress').progress))
    return {
      events: all.reduce((sum, item) => sum + item.events, 0),
      lastRxUs: Math.max(...all.map((item) => item.lastRxUs)),
      live: all.reduce((sum, item) => sum + item.live, 0)
    }
  }

  async report (expected: number): Promise<ReportSummary> {
    const all = await Promise.all(this.workers.map(async (worker) => expect(await worker.request({ type: 'report', expected }), 'report').report))
    const latency = new Histogram()
    for (const report of all) latency.merge(Histogram.from(report.latency))
    const sum = (key: 'connections' | 'live' | 'events' | 'outOfOrder' | 'gaps' | 'exact' | 'over' | 'under' | 'closedByServer'): number =>
      all.reduce((total, report) => total + report[key], 0)
    const firsts = all.map((report) => report.firstRxUs).filter((value) => value > 0)
    const withLive = all.filter((report) => report.live > 0)
    return {
      connections: sum('connections'),
      live: sum('live'),
      events: sum('events'),
      firstRxUs: firsts.length === 0 ? 0 : Math.min(...firsts),
      lastRxUs: Math.max(...all.map((report) => report.lastRxUs)),
      outOfOrder: sum('outOfOrder'),
      gaps: sum('gaps'),
      exact: sum('exact'),
      over: sum('over'),
      under: sum('under'),
      closedByServer: sum('closedByServer'),
      minEvents: withLive.length === 0 ? 0 : Math.min(...withLive.map((report) => report.minEvents)),
      maxEvents: Math.max(...all.map((report) => report.maxEvents)),
      latency,
      elu: all.map((report) => report.elu),
      lagP99Us: Math.max(...all.map((report) => report.lagP99Us)),
      lagMaxUs: Math.max(...all.map((report) => report.lagMaxUs))
    }
  }

  /** Churn on every worker at once; `target` is the total number of streams kept open. */
  async churn (plan: StreamPlan, options: { target: number, inFlight: number, durationMs: number, lifeMinMs: number, lifeMaxMs: number, rstEvery: number }): Promise<ChurnSummary> {
    const targets = shares(options.target, this.workers.length)
    const flights = shares(Math.max(options.inFlight, this.workers.length), this.workers.length)
    // Index ranges far apart, so each worker's connections use distinct tokens in turn.
    const stride = Math.ceil(Number.MAX_SAFE_INTEGER / 4 / this.workers.length)
    const replies = await Promise.all(this.workers.map((worker, index) => worker.request({
      type: 'churn',
      plan,
      first: index * stride,
      target: targets[index],
      inFlight: flights[index],
      durationMs: options.durationMs,
      lifeMinMs: options.lifeMinMs,
      lifeMaxMs: options.lifeMaxMs,
      rstEvery: options.rstEvery
    })))
    const results = replies.map((reply) => expect(reply, 'churned').result)
    const latency = new Histogram()
    const errors: Record<string, number> = {}
    for (const result of results) {
      latency.merge(Histogram.from(result.latency))
      mergeErrors(errors, result.errors)
    }
    const sum = (key: 'opened' | 'failed' | 'closedByClient' | 'closedByServer' | 'events' | 'outOfOrder' | 'gaps' | 'maxLive'): number =>
      results.reduce((total, result) => total + result[key], 0)
    return {
      opened: sum('opened'),
      failed: sum('failed'),
      closedByClient: sum('closedByClient'),
      closedByServer: sum('closedByServer'),
      errors,
      events: sum('events'),
      outOfOrder: sum('outOfOrder'),
      gaps: sum('gaps'),
      maxLive: sum('maxLive'),
      latency,
      elu: results.map((result) => result.elu)
    }
  }

  async closeAll (rst: boolean): Promise<number> {
    const replies = await Promise.all(this.workers.map((worker) => worker.request({ type: 'close', rst })))
    return replies.reduce((sum, reply) => sum + expect(reply, 'closed').closed, 0)
  }

  async stop (): Promise<void> {
    await Promise.all(this.workers.map((worker) => worker.stop()))
  }
}
