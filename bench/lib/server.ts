/**
 * A server under test as a child process: the gateway (`node dist/src/server.js`)
 * or the baseline (`node dist/bench/baseline-server.js`), pinned to a CPU with
 * taskset when it can be, its file limit raised to the hard limit, its logs
 * sent to a file (so reading them costs the load client nothing).
 */
import { spawn, type ChildProcess } from 'node:child_process'
import { closeSync, openSync, readFileSync, statSync } from 'node:fs'
import { createServer } from 'node:net'
import { join } from 'node:path'
import { sleep } from './clock'
import type { Endpoint } from './client-protocol'
import { httpRequest, parsePrometheus } from './http'
import { cpuSeconds, fdCount, hasTaskset, rssKb } from './proc'

export type TargetKind = 'gateway' | 'baseline'

/** The project's root, from dist/bench/lib. */
export const ROOT = join(__dirname, '..', '..', '..')

export interface ServerOptions {
  kind: TargetKind
  /** Shown in messages, e.g. `gateway#2`. */
  label: string
  host: string
  port: number
  /** CPU list for taskset (`0`), or null for no pinning. */
  cpu: string | null
  env: Record<string, string>
  logFile: string
  /** Write a V8 CPU profile into this directory at exit. */
  cpuProfDir?: string
}

export interface ServerSnapshot {
  rssKb: number | null
  cpuS: number | null
  fds: number | null
  /** Streams the server says it holds. */
  connections: number | null
  /** Gateway only: `connections` of GET /v1/stats (cluster-wide in Redis mode). */
  statsConnections: number | null
  /** The server's own count of libuv handles (gateway: from /metrics). */
  handles: number | null
  heapUsedBytes: number | null
}

/** A port free right now on 127.0.0.1. */
export function freePort (): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = createServer()
    server.unref()
    server.on('error', reject)
    server.listen(0, '127.0.0.1', () => {
      const address = server.address()
      const port = typeof address === 'object' && address !== null ? address.port : 0
      server.close(() => resolve(port))
    })
  })
}

export class ServerProcess {
  private child: ChildProcess | null = null
  private exitCode: number | string | null = null
  private readonly exited: Promise<void>
  private markExited: () => void = () => {}

  constructor (readonly options: ServerOptions) {
    this.exited = new Promise((resolve) => { this.markExited = resolve })
  }

  get pid (): number {
    return this.child?.pid ?? 0
  }

  get endpoint (): Endpoint {
    return { host: this.options.host, port: this.options.port }
  }

  get url (): string {
    return `http://${this.options.host}:${this.options.port}`
  }

  get running (): boolean {
    return this.child !== null && this.exitCode === null
  }

  async start (readyTimeoutMs = 20_000): Promise<void> {
    const { kind, cpu, env, logFile, cpuProfDir } = this.options
    const script = kind === 'gateway' ? join(ROOT, 'dist', 'src', 'server.js') : join(ROOT, 'dist', 'bench', 'baseline-server.js')
    const nodeArgs = ['--expose-gc', '-r', join(__dirname, 'gc-on-signal.js')]
    // The gateway runs with the Node flags `npm start` gives it; the baseline with Node's defaults.
    if (kind === 'gateway') nodeArgs.push(...gatewayNodeFlags())
    if (cpuProfDir !== undefined) nodeArgs.push('--cpu-prof', `--cpu-prof-dir=${cpuProfDir}`, `--cpu-prof-name=${this.options.label}.${Date.now()}.cpuprofile`)
    const command = [process.execPath, ...nodeArgs, script]
    if (cpu !== null && hasTaskset()) command.unshift('taskset', '-c', cpu)
    const log = openSync(logFile, 'a')
    // sh raises the soft file limit to the hard one, then becomes the server (same pid).
    const child = spawn('/bin/sh', ['-c', 'ulimit -n "$(ulimit -Hn)" 2>/dev/null; exec "$@"', 'sh', ...command], {
      cwd: ROOT,
      env: { PATH: process.env.PATH ?? '/usr/bin:/bin', HOME: process.env.HOME ?? '/tmp', ...env, PORT: String(this.options.port), HOST: this.options.host },
      stdio: ['ignore', log, log]
    })
    closeSync(log)
    this.child = child
    child.on('exit', (code, signal) => {
      this.exitCode = code ?? signal ?? 'unknown'
      this.markExited()
    })
    const deadline = Date.now() + readyTimeoutMs
    while (Date.now() < deadline) {
      if (!this.running) throw new Error(`${this.options.label} exited (${String(this.exitCode)}) while starting:\n${this.logTail()}`)
      try {
        const answer = await httpRequest(`${this.url}/health`, { timeoutMs: 1000 })
        if (answer.status === 200) return
      } catch {
        // not listening yet
      }
      await sleep(100)
    }
    await this.stop()
    throw new Error(`${this.options.label} did not answer /health within ${readyTimeoutMs} ms:\n${this.logTail()}`)
  }

  logTail (bytes = 3000): string {
    try {
      const size = statSync(this.options.logFile).size
      const text = readFileSync(this.options.logFile, 'utf8')
      return text.slice(Math.max(0, size - bytes))
    } catch {
      return '(no log)'
    }
  }

  /** Asks the server for a full garbage collection (see gc-on-signal.ts) and gives it time to finish. */
  async collectGarbage (waitMs = 500): Promise<void> {
    if (!this.running) return
    this.child?.kill('SIGUSR2')
    await sleep(waitMs)
  }

  /** Memory, CPU time and descriptors from /proc; the stream count from the server itself. */
  async snapshot (adminToken: string): Promise<ServerSnapshot> {
    const pid = this.pid
    const base: ServerSnapshot = { rssKb: rssKb(pid), cpuS: cpuSeconds(pid), fds: fdCount(pid), connections: null, statsConnections: null, handles: null, heapUsedBytes: null }
    try {
      if (this.options.kind === 'gateway') {
        const answer = await httpRequest(`${this.url}/metrics`, { timeoutMs: 10_000 })
        const metrics = parsePrometheus(answer.body)
        base.connections = metrics.get('sse_connections') ?? null
        base.handles = metrics.get('sse_gateway_nodejs_active_handles_total') ?? null
        base.heapUsedBytes = metrics.get('sse_gateway_nodejs_heap_size_used_bytes') ?? null
        // The registry as the admin API reports it (cluster-wide in Redis mode).
        const stats = await httpRequest(`${this.url}/v1/stats`, { headers: { authorization: `Bearer ${adminToken}` }, timeoutMs: 10_000 })
        if (stats.status === 200) {
          const parsed = JSON.parse(stats.body) as { connections?: unknown }
          if (typeof parsed.connections === 'number') base.statsConnections = parsed.connections
        }
      } else {
        const answer = await httpRequest(`${this.url}/stats`, { timeoutMs: 10_000 })
        const parsed = JSON.parse(answer.body) as { connections: number, handles: number, heapUsed: number }
        base.connections = parsed.connections
        base.handles = parsed.handles
        base.heapUsedBytes = parsed.heapUsed
      }
    } catch {
      // A server too busy to answer leaves these null; /proc figures stand.
    }
    return base
  }

  /** SIGTERM, then SIGKILL if it has not exited after `graceMs`. */
  async stop (graceMs = 15_000): Promise<void> {
    const child = this.child
    if (child === null || this.exitCode !== null) return
    child.kill('SIGTERM')
    const timer = setTimeout(() => child.kill('SIGKILL'), graceMs)
    await this.exited
    clearTimeout(timer)
  }
}

/** The `--` flags between `node` and the script in package.json's start script. */
export function gatewayNodeFlags (): string[] {
  const pkg = JSON.parse(readFileSync(join(ROOT, 'package.json'), 'utf8')) as { scripts?: Record<string, string> }
  return (pkg.scripts?.start ?? '').split(/\s+/).filter((word) => word.startsWith('--'))
}
