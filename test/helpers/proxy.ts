/**
 * A TCP proxy between a gateway and Redis that a test can fault: hold back
 * Redis's replies (the commands still reach Redis and run) and cut every
 * connection, as a network blip does.
 */
import { createServer, connect, type Server, type Socket } from 'node:net'
import type { Test } from 'tap'

export class FaultyProxy {
  private readonly pairs = new Set<[Socket, Socket]>()
  private holding = false
  private readonly held = new Map<Socket, Buffer[]>()

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

  /** Replies are kept back from now on (still read from Redis, so its commands complete). */
  holdReplies (): void {
    this.holding = true
  }

  /** Destroys every connection through the proxy; new ones are accepted and pass freely. */
  cut (): void {
    this.holding = false
    this.held.clear()
    for (const [client, upstream] of this.pairs) {
      client.destroy()
      upstream.destroy()
    }
    this.pairs.clear()
  }

  /**
   * Redis out of reach: every connection cut, and the ones the gateway opens
   * again hear nothing back (they never become ready) until `restore()`.
   */
  cutOff (): void {
    this.cut()
    this.holdReplies()
  }

  /** Redis reachable again: the silent connections are cut, and the next ones pass. */
  restore (): void {
    this.cut()
  }

  async close (): Promise<void> {
    this.cut()
    await new Promise<void>((resolve) => this.server.close(() => resolve()))
  }

  private accept (client: Socket, targetPort: number): void {
    const upstream = connect(targetPort, '127.0.0.1')
    const pair: [Socket, Socket] = [client, upstream]
    this.pairs.add(pair)
    const end = (): void => {
      this.pairs.delete(pair)
      client.destroy()
      upstream.destroy()
    }
    client.on('data', (chunk: Buffer) => upstream.write(chunk))
    upstream.on('data', (chunk: Buffer) => {
      if (!this.holding) {
        client.write(chunk)
        return
      }
      const kept = this.held.get(client) ?? []
      kept.push(chunk)
      this.held.set(client, kept)
    })
    for (const socket of pair) {
      socket.on('error', end)
      socket.on('close', end)
    }
  }
}
