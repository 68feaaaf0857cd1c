import Redis from 'ioredis'
import { redisOptions, type Log } from './client'

/** The channel on which every sentinel announces a completed failover: `<name> <old ip> <old port> <new ip> <new port>`. */
const SWITCH_CHANNEL = '+switch-master'

export interface MasterAddress { host: string, port: number }

/**
 * Listens to every sentinel for the switch of one master group. Sentinel
 * demotes the old master, which closes its clients, only when it next reads
 * its INFO (up to 10 s after the switch); until then a client left on it
 * publishes events to a server about to drop them. Hearing the switch, the
 * engine moves its connections at once.
 *
 * Unlike ioredis's failoverDetector, a switch of another group the same
 * sentinels watch moves nothing, and a moving connection finds the new
 * master through ioredis's usual reconnect (asking the sentinels in turn),
 * so a sentinel that hangs holds up no more than a reconnect.
 */
export class SentinelSwitchWatch {
  private readonly clients: Redis[]

  constructor (
    sentinels: Array<{ host: string, port: number }>,
    password: string | null,
    private readonly masterName: string,
    private readonly onSwitch: (master: MasterAddress) => void,
    private readonly log: Log
  ) {
    this.clients = sentinels.map(({ host, port }) => {
      const client = new Redis({
        ...redisOptions(),
        host,
        port,
        ...(password !== null ? { password } : {}),
        connectionName: 'sse-gateway-sentinel',
        lazyConnect: false
      })
      // Nothing depends on one sentinel: it is heard again once it answers.
      client.on('error', () => {})
      client.on('ready', () => {
        client.subscribe(SWITCH_CHANNEL).catch((error: unknown) => {
          this.log.warn({ sentinel: `${host}:${port}`, reason: error instanceof Error ? error.message : String(error) }, 'not listening to a sentinel for failovers')
        })
      })
      client.on('message', (channel: string, message: string) => { if (channel === SWITCH_CHANNEL) this.heard(message) })
      return client
    })
  }

  private heard (message: string): void {
    const [name, , , host, port] = message.split(' ')
    if (name !== this.masterName || host === undefined || port === undefined) return
    this.onSwitch({ host, port: Number(port) })
  }

  close (): void {
    for (const client of this.clients) client.disconnect()
  }
}

/**
 * Moves `client` to the new master if it is connected elsewhere: it
 * reconnects, which asks the sentinels for the master. One already
 * reconnecting is left to it, so the same switch heard from every sentinel
 * moves a connection once.
 */
export function moveToMaster (client: Redis, master: MasterAddress): boolean {
  if (client.status !== 'ready') return false
  const socket = client.stream
  if (socket.remotePort === master.port && socket.remoteAddress?.replace(/^::ffff:/, '') === master.host) return false
  client.disconnect(true)
  return true
}
