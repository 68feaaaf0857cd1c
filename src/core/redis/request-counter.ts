import type { RequestCounter, RequestCount } from '../state'
import type { ScriptedRedis } from './client'

/** Rate-limit counters in Redis (`<prefix>rl:<key>`), so a limit holds across every instance. */
export class RedisRequestCounter implements RequestCounter {
  constructor (private readonly commands: ScriptedRedis, private readonly prefix: string) {}

  async count (key: string, windowMs: number): Promise<RequestCount> {
    const [current, ttl] = await this.commands.run('COUNT_REQUEST', [`${this.prefix}rl:${key}`, windowMs]) as [number, number]
    return { current, ttl }
  }
}
