import { StoreUnavailableError, type RequestCounter, type RequestCount } from '../state'
import type { ScriptedRedis } from './client'
import { within } from '../within'

/**
 * How long a request waits for its count. A limit is there to protect the
 * gateway, not to add a frozen Redis's command timeout to every request it
 * covers (and to a stream open its refusal, which the bus makes at once).
 */
const COUNT_WAIT_MS = 250

/** Rate-limit counters in Redis (`<prefix>rl:<key>`), so a limit holds across every instance. */
export class RedisRequestCounter implements RequestCounter {
  constructor (private readonly commands: ScriptedRedis, private readonly prefix: string) {}

  async count (key: string, windowMs: number): Promise<RequestCount> {
    if (this.commands.redis.status !== 'ready' || !this.commands.isAnswering()) {
      throw new StoreUnavailableError(new Error('Redis is not answering'))
    }
    const counted = this.commands.run('COUNT_REQUEST', [`${this.prefix}rl:${key}`, windowMs]) as Promise<[number, number]>
    const [current, ttl] = await within(counted, COUNT_WAIT_MS, () => {
      throw new StoreUnavailableError(new Error(`Redis did not count within ${COUNT_WAIT_MS} ms`))
    })
    return { current, ttl }
  }
}
