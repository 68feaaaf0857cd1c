/**
 * A TCP proxy between a gateway and Redis that a test can fault: hold back
 * Redis's replies (the commands still reach Redis and run), hold back the
 * subscriptions a client sends, and cut connections, as a network blip does.
 * A connection is known by the name it gives itself (CLIENT SETNAME), so one
 * of a gateway's connections can fail while the other stays up.
 */
import { createServer, connect, type Server, type Socket } from 'node:net'
import { startGateway, type Gateway, type GatewayOptions, type TestLike } from './gateway'
import { REDIS_URL } from './redis'
import type { Test } from 'tap'

/** `CLIENT SETNAME <name>` as RESP. */
const SETNAME = /\$7\r\nsetname\r\n\$\d+\r\n([^\r]*)\r\n/i
/** A SUBSCRIBE or PSUBSCRIBE command as RESP. */
const SUBSCRIBE = /\$(?:9\r\nsubscribe|10\r\npsubscribe)\r\n/i

interface Pipe {
  client: Socket
  upstream: Socket
  /** The name it gave itself, once it has. */
  name: string | null
  /** Replies kept back from the client. */
  replies: Buffer[]
  /** What the client sent from its first held SUBSCRIBE on, kept back from Redis; null while it passes. */
  requests: Buffer[] | null
}

export class FaultyProxy {
  private readonly pipes = new Set<Pipe>()
  private holding = false
  private readonly holdingNames = new Set<string>()
  private holdingSubscribes = false

  private constructor (private readonly server: Server, readonly port: number) {}

  static async start (t: Pick<Test, 'teardown'>, targetPort: number): Promise<FaultyProxy> {
    let proxy: FaultyProxy | null = null
    const server = createServer((client) => proxy?.accept(client, targetPort))
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
    const address = server.address()
    if (address === null || typeof address === 'string') throw new Error('the proxy has no TCP address')
    proxy = new FaultyProxy(server, address.port)
    const started = proxy
    t.teardown(async () => await started.close())
    return proxy
  }

  get url (): string {
    return `redis://127.0.0.1:${this.port}`
  }

  /** Connections whose subscriptions are held back (see `holdSubscribes`). */
  get heldSubscribers (): number {
    let count = 0
    for (const pipe of this.pipes) if (pipe.requests !== null) count++
    return count
  }

  /**
   * Replies are kept back from now on (still read from Redis, so its commands
   * complete): on every connection, or on those named `name`, including ones
   * opened later.
   */
  holdReplies (name?: string): void {
    if (name === undefined) this.holding = true
    else this.holdingNames.add(name)
  }

  /** The replies kept back go out, in order, and replies pass again (on every connection, or on those named `name`). */
  releaseReplies (name?: string): void {
    if (name === undefined) {
      this.holding = false
      this.holdingNames.clear()
    } else {
      this.holdingNames.delete(name)
    }
    for (const pipe of this.pipes) {
      if (this.holds(pipe)) continue
      const replies = pipe.replies
      pipe.replies = []
      for (const chunk of replies) pipe.client.write(chunk)
    }
  }

  /**
   * From now on a SUBSCRIBE or PSUBSCRIBE, and whatever its connection sends
   * after it, is kept back from Redis until `releaseSubscribes()`: the
   * subscriber is connected, but its subscriptions are not in place.
   */
  holdSubscribes (): void {
    this.holdingSubscribes = true
  }

  /** What was kept back reaches Redis, in order, and subscriptions pass again. */
  releaseSubscribes (): void {
    this.holdingSubscribes = false
    for (const pipe of this.pipes) {
      const requests = pipe.requests
      pipe.requests = null
      for (const chunk of requests ?? []) pipe.upstream.write(chunk)
    }
  }

  /**
   * Destroys every connection through the proxy, or those named `name`; new
   * ones are accepted and pass freely (as far as what is cut goes: a cut of
   * one name leaves the other faults in place).
   */
  cut (name?: string): void {
    if (name === undefined) {
      this.holding = false
      this.holdingNames.clear()
      this.holdingSubscribes = false
    } else {
      this.holdingNames.delete(name)
    }
    for (const pipe of [...this.pipes]) {
      if (name !== undefined && pipe.name !== name) continue
      pipe.client.destroy()
      pipe.upstream.destroy()
      this.pipes.delete(pipe)
    }
  }

  /**
   * Redis out of reach (for every connection, or for those named `name`):
   * they are cut, and the ones the gateway opens again hear nothing back
   * (they never become ready) until `restore()`.
   */
  cutOff (name?: string): void {
    this.cut(name)
    this.holdReplies(name)
  }

  /** Redis reachable again: the silent connections are cut, and the next ones pass. */
  restore (name?: string): void {
    this.cut(name)
  }

  async close (): Promise<void> {
    this.cut()
    await new Promise<void>((resolve) => this.server.close(() => resolve()))
  }

  private holds (pipe: Pipe): boolean {
    return this.holding || (pipe.name !== null && this.holdingNames.has(pipe.name))
  }

  private accept (client: Socket, targetPort: number): void {
    const upstream = connect(targetPort, '127.0.0.1')
    const pipe: Pipe = { client, upstream, name: null, replies: [], requests: null }
    this.pipes.add(pipe)
    const end = (): void => {
      this.pipes.delete(pipe)
      client.destroy()
      upstream.destroy()
    }
    client.on('data', (chunk: Buffer) => {
      if (pipe.name === null) pipe.name = SETNAME.exec(chunk.toString('latin1'))?.[1] ?? null
      if (pipe.requests === null && this.holdingSubscribes && SUBSCRIBE.test(chunk.toString('latin1'))) pipe.requests = []
      if (pipe.requests !== null) {
        pipe.requests.push(chunk)
        return
      }
      upstream.write(chunk)
    })
    upstream.on('data', (chunk: Buffer) => {
      if (this.holds(pipe)) pipe.replies.push(chunk)
      else client.write(chunk)
    })
    for (const socket of [client, upstream]) {
      socket.on('error', end)
      socket.on('close', end)
    }
  }
}

/**
 * Two gateways of one cluster (`env` names its REDIS_PREFIX): `viaProxy`
 * reaches Redis (`redisUrl`, without a password) through a fault proxy
 * (started with `options`), `direct` straight.
 */
export async function proxiedCluster (t: TestLike & Pick<Test, 'teardown'>, env: Record<string, string>, options: GatewayOptions = {}, redisUrl = REDIS_URL): Promise<{ proxy: FaultyProxy, viaProxy: Gateway, direct: Gateway }> {
  const proxy = await FaultyProxy.start(t, Number(new URL(redisUrl).port || 6379))
  const viaProxy = await startGateway(t, { ...env, REDIS_URL: proxy.url }, options)
  const direct = await startGateway(t, { ...env, REDIS_URL: redisUrl })
  return { proxy, viaProxy, direct }
}
