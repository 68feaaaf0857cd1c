import { lookup } from 'node:dns/promises'
import { isIP } from 'node:net'
import Redis from 'ioredis'
import { reasonOf, redisOptions, type Log } from './client'

/** The channel on which every sentinel announces a completed failover: `<name> <old ip> <old port> <new ip> <new port>`. */
const SWITCH_CHANNEL = '+switch-master'
/**
 * How long after a switch a connection that came back elsewhere is moved
 * again. ioredis asks the sentinels in turn, and one that has not heard of
 * the switch yet names the old master; past this, a sentinel that still
 * does is cut off from the others, and the master it names is left to them.
 */
const FOLLOW_SWITCH_MS = 30_000
/**
 * Moves of one connection after one switch: enough to ask each of a few
 * sentinels in turn, few enough that a master no sentinel names (a switch
 * undone at once by another) costs no more than a handful of reconnects.
 */
const MOVES_PER_SWITCH = 5

interface AnnouncedMaster {
  /** As announced, for the log. */
  address: string
  /** The host's addresses: a sentinel may announce a hostname (announce-hostnames). */
  hosts: string[]
  port: number
  at: number
  /** Moves left to each connection after this switch. */
  movesLeft: Map<Redis, number>
}

/**
 * Moves the engine's connections to a new master as soon as a sentinel
 * announces the switch of the gateway's master group. Sentinel demotes the
 * old master, which closes its clients, only some 8-10 s after the switch;
 * until then a connection left on it would publish events to a server about
 * to drop them.
 *
 * Unlike ioredis's failoverDetector, a switch of another group the same
 * sentinels watch moves nothing, and a connection moves by ioredis's usual
 * reconnect (asking the sentinels in turn for the master), so a sentinel
 * that hangs holds up no more than a reconnect. One that reconnects to
 * another master than the announced one, from a sentinel that has not
 * heard of the switch, is moved again.
 */
export class SentinelSwitchWatch {
  private readonly sentinelClients: Redis[]
  private announced: AnnouncedMaster | null = null
  private readonly checkOnConnect: Array<{ client: Redis, listener: () => void }>
  /** The sockets a move closed. */
  private readonly moved = new WeakSet<object>()
  /** Announcements are acted on in the order they were heard, a host name's lookup and all. */
  private hearing: Promise<void> = Promise.resolve()

  constructor (
    sentinels: Array<{ host: string, port: number }>,
    password: string | null,
    private readonly masterName: string,
    private readonly connections: Redis[],
    private readonly log: Log
  ) {
    this.sentinelClients = sentinels.map(({ host, port }) => this.listenTo(`${host}:${port}`, new Redis({
      ...redisOptions(),
      host,
      port,
      ...(password !== null ? { password } : {}),
      connectionName: 'sse-gateway-sentinel',
      lazyConnect: false
    })))
    // At 'connect', while ioredis is still checking the server and takes no
    // command: a connection on the wrong master is closed before any can be
    // sent on it. At 'ready' it would be late: the status turns ready a
    // tick before the event.
    this.checkOnConnect = connections.map((client) => {
      const listener = (): void => this.followSwitch(client)
      client.on('connect', listener)
      return { client, listener }
    })
  }

  private listenTo (sentinel: string, client: Redis): Redis {
    // Said once per kind of failure (a refused password, say), not at every
    // reconnect; said again if it fails anew after it worked.
    let lastError: string | null = null
    client.on('error', (error: Error) => {
      if (error.message === lastError) return
      lastError = error.message
      this.log.warn({ sentinel, reason: error.message }, 'not listening to a sentinel for failovers')
    })
    client.on('ready', () => {
      lastError = null
      client.subscribe(SWITCH_CHANNEL).catch((error: unknown) => {
        this.log.warn({ sentinel, reason: reasonOf(error) }, 'not listening to a sentinel for failovers')
      })
    })
    client.on('message', (channel: string, message: string) => {
      if (channel !== SWITCH_CHANNEL) return
      this.hearing = this.hearing.then(async () => await this.heard(message)).catch((error: unknown) => {
        this.log.warn({ reason: reasonOf(error) }, 'a sentinel\'s failover announcement not acted on')
      })
    })
    return client
  }

  private async heard (message: string): Promise<void> {
    const [name, , , host, port] = message.split(' ')
    if (name !== this.masterName || host === undefined || port === undefined) return
    const address = `${host}:${port}`
    // Every sentinel announces the switch: the first starts its moves and its time.
    if (this.announced?.address !== address || Date.now() - this.announced.at > FOLLOW_SWITCH_MS) {
      const hosts = isIP(host) !== 0 ? [host] : await lookup(host, { all: true }).then((found) => found.map((entry) => entry.address), () => [host])
      this.announced = { address, hosts, port: Number(port), at: Date.now(), movesLeft: new Map(this.connections.map((client) => [client, MOVES_PER_SWITCH])) }
    }
    const moved = this.connections.filter((client) => this.move(client)).length
    if (moved > 0) this.log.info({ master: this.announced.address, connections: moved }, 'a sentinel announced a new master: moving to it')
  }

  private followSwitch (client: Redis): void {
    if (this.announced === null || Date.now() - this.announced.at > FOLLOW_SWITCH_MS) return
    if (this.move(client)) this.log.info({ master: this.announced.address }, 'a connection came back to another master than the one announced: moving it again')
  }

  /**
   * Reconnects `client` if it is connected elsewhere than the announced
   * master. One still looking for a server is left to it, so the same switch
   * heard from every sentinel moves a connection once.
   */
  private move (client: Redis): boolean {
    const master = this.announced
    if (master === null || (client.status !== 'ready' && client.status !== 'connect')) return false
    const socket = client.stream
    // Closed by a move already: ioredis says ready until the socket has closed.
    if (this.moved.has(socket)) return false
    const address = socket.remoteAddress?.replace(/^::ffff:/, '')
    if (socket.remotePort === master.port && address !== undefined && master.hosts.includes(address)) return false
    const left = master.movesLeft.get(client) ?? 0
    if (left === 0) return false
    master.movesLeft.set(client, left - 1)
    this.moved.add(socket)
    client.disconnect(true)
    return true
  }

  close (): void {
    for (const { client, listener } of this.checkOnConnect) client.off('connect', listener)
    for (const client of this.sentinelClients) client.disconnect()
  }
}
