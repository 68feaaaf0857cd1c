/**
 * The bench's publisher: POST /v1/publish over one keep-alive connection per
 * server (node:http Agent), one request at a time, each event carrying
 * `{"t": <send time, µs>, "seq": <n>}` for the client to check.
 */
import { Agent, request } from 'node:http'
import type { Clock } from './clock'
import type { Endpoint } from './client-protocol'
import { Histogram } from './histogram'

export interface PublishSummary {
  sent: number
  accepted: number
  statuses: Record<string, number>
  errors: Record<string, number>
  elapsedMs: number
  /** Request sent → answer received, µs. */
  rtt: Histogram
}

export class Publisher {
  private readonly agent = new Agent({ keepAlive: true, maxSockets: 1 })
  private seq = 0
  private turn = 0
  readonly rtt = new Histogram()
  private readonly statuses: Record<string, number> = {}
  private readonly errors: Record<string, number> = {}
  private sent = 0
  private accepted = 0

  constructor (
    private readonly endpoints: Endpoint[],
    private readonly token: string,
    private readonly topic: string,
    private readonly clock: Clock
  ) {}

  /** The last `seq` published. */
  get lastSeq (): number {
    return this.seq
  }

  /** Publishes one event to the next server in turn; resolves when it is answered. */
  publishOne (): Promise<void> {
    const endpoint = this.endpoints[this.turn++ % this.endpoints.length]
    const seq = ++this.seq
    const sentAt = this.clock()
    const data = `{"t":${sentAt},"seq":${seq}}`
    // Nchan publishes a request's body as is and takes the channel from the query; the gateway reads both from its envelope.
    const bare = endpoint.publishBody === 'data'
    const body = bare ? data : `{"to":{"topic":"${this.topic}"},"event":"bench","data":${data}}`
    this.sent++
    return new Promise<void>((resolve) => {
      const req = request({
        host: endpoint.host,
        port: endpoint.port,
        method: 'POST',
        path: bare ? `/v1/publish?topic=${encodeURIComponent(this.topic)}` : '/v1/publish',
        agent: this.agent,
        headers: {
          'content-type': 'application/json',
          'content-length': Buffer.byteLength(body),
          authorization: `Bearer ${this.token}`,
          // Nchan names the event from this header, so both servers send `event: bench`.
          ...(bare ? { 'x-eventsource-event': 'bench' } : {})
        }
      }, (res) => {
        res.resume()
        res.on('end', () => {
          this.rtt.record(this.clock() - sentAt)
          const status = String(res.statusCode)
          this.statuses[status] = (this.statuses[status] ?? 0) + 1
          // The gateway answers 202; Nchan 201 once a subscriber got the message, 202 when it had none.
          if (res.statusCode === 202 || res.statusCode === 201) this.accepted++
          resolve()
        })
      })
      req.setTimeout(30_000, () => req.destroy(new Error('timeout')))
      req.on('error', (error: NodeJS.ErrnoException) => {
        const code = error.code ?? error.message
        this.errors[code] = (this.errors[code] ?? 0) + 1
        resolve()
      })
      req.end(body)
    })
  }

  /** `count` events back to back (each sent when the previous is answered), bounded by `deadlineMs`. */
  async burst (count: number, deadlineMs: number): Promise<PublishSummary> {
    const start = Date.now()
    for (let index = 0; index < count && Date.now() < deadlineMs; index++) await this.publishOne()
    return this.summary(Date.now() - start)
  }

  /**
   * `ratePerS` events per second for `durationMs`, on a fixed schedule: a
   * late answer makes the next event leave at once, never skips one.
   */
  async paced (ratePerS: number, durationMs: number, shouldStop: () => boolean = () => false): Promise<PublishSummary> {
    const stopAt = Date.now() + durationMs + 5000
    return await this.onSchedule(ratePerS, Math.floor(durationMs * ratePerS / 1000), () => !shouldStop() && Date.now() <= stopAt)
  }

  /** `count` events at `ratePerS`, scheduled as `paced` does, bounded by `deadlineMs`. */
  async pacedBurst (count: number, ratePerS: number, deadlineMs: number): Promise<PublishSummary> {
    return await this.onSchedule(ratePerS, count, () => Date.now() < deadlineMs)
  }

  private async onSchedule (ratePerS: number, count: number, mayGoOn: () => boolean): Promise<PublishSummary> {
    const start = Date.now()
    const interval = 1000 / ratePerS
    for (let index = 0; index < count && mayGoOn(); index++) {
      const wait = start + index * interval - Date.now()
      if (wait > 1) await new Promise((resolve) => setTimeout(resolve, wait))
      if (!mayGoOn()) break
      await this.publishOne()
    }
    return this.summary(Date.now() - start)
  }

  summary (elapsedMs: number): PublishSummary {
    return { sent: this.sent, accepted: this.accepted, statuses: { ...this.statuses }, errors: { ...this.errors }, elapsedMs, rtt: this.rtt }
  }

  close (): void {
    this.agent.destroy()
  }
}
