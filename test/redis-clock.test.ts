/**
 * Instances judge each other's heartbeats by Redis's clock alone: a gateway
 * whose own clock runs far behind (a host whose clock drifted) still counts
 * as live, its streams count for presence and limits, and it is not reaped.
 */
import { join } from 'node:path'
import { setTimeout as delay } from 'node:timers/promises'
import t from 'tap'
import { adminToken, openConnected, openStream, request, spawnServer, startGateway, TEST_SECRET, userToken } from './helpers'
import { presence } from './helpers/channels'
import { needRedis, REDIS_URL, uniquePrefix } from './helpers/redis'

const INSTANCE_TTL_MS = 3000
/** Far past INSTANCE_TTL_MS: by its own clock, the instance's every beat is long dead. */
const CLOCK_SKEW_MS = -10 * INSTANCE_TTL_MS
const SKEW_PRELOAD = join(__dirname, 'helpers', 'clock-skew.js')

t.test('an instance whose clock runs 30 s behind still counts as live: its streams count for presence and the per-user limit, and it is not reaped', async (t) => {
  if (!(await needRedis(t))) return
  const env = { REDIS_URL, REDIS_PREFIX: uniquePrefix('clock'), INSTANCE_TTL_MS: String(INSTANCE_TTL_MS), MAX_CONNECTIONS_PER_USER: '1', CONNECTION_LIMIT_POLICY: 'reject' }
  // Started first, so the lease and its reaps are the skewed instance's own too, at first.
  const behind = await spawnServer(t, { ...env, JWT_SECRET: TEST_SECRET, HOST: '127.0.0.1', LOG_LEVEL: 'warn', NODE_OPTIONS: `--require ${SKEW_PRELOAD}`, CLOCK_SKEW_MS: String(CLOCK_SKEW_MS) })
  const onTime = await startGateway(t, env)
  const stats = async (): Promise<{ instances: number, connections: number }> => {
    const answer = await request<{ instances: number, connections: number }>(`${onTime.url}/v1/stats`, { token: adminToken() })
    t.equal(answer.status, 200)
    return answer.json
  }

  await openConnected(`${behind.url}/v1/stream?token=${userToken('u1')}`, { t })
  t.same(await presence(onTime, 'u1'), { userId: 'u1', online: true, connections: 1 }, 'the stream on the instance behind counts as online')
  t.match(await stats(), { instances: 2, connections: 1 }, 'both instances are live')
  const second = await openStream(`${onTime.url}/v1/stream?token=${userToken('u1')}`, { t })
  t.equal(second.status, 429, 'the stream on the instance behind counts against the limit')

  // Past several beats and reap checks of both instances.
  await delay(2 * INSTANCE_TTL_MS)
  t.same(await presence(onTime, 'u1'), { userId: 'u1', online: true, connections: 1 }, 'still online: not reaped')
  t.match(await stats(), { instances: 2, connections: 1 }, 'still both live')
})
