import { StoreUnavailableError, type RequestCounter, type RequestCount } from '../state'
import type { ScriptedRedis } from './client'

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
    let timer: NodeJS.Timeout | undefined
    const late = new Promise<never>((_resolve, reject) => {
      timer = setTimeout(() => reject(new StoreUnavailableError(new Error(`Redis did not count within ${COUNT_WAIT_MS} ms`))), COUNT_WAIT_MS)
    })
    try {
      const [current, ttl] = await Promise.race([this.commands.run('COUNT_REQUEST', [`${this.prefix}rl:${key}`, windowMs]), late]) as [number, number]
      return { current, ttl }
    } finally {
      clearTimeout(timer)
    }
  }
}
