/**
 * A server under test as a child process: the gateway (`node dist/src/server.js`),
 * the baseline (`node dist/bench/baseline-server.js`) or nginx + Nchan, pinned
 * to a CPU with taskset when it can be, its file limit raised to the hard
 * limit, its logs sent to a file (so reading them costs the load client nothing).
 */
import { spawn, type ChildProcess } from 'node:child_process'
import { closeSync, mkdirSync, openSync, readdirSync, readFileSync, readlinkSync, statSync, writeFileSync } from 'node:fs'
import { createServer } from 'node:net'
import { dirname, join } from 'node:path'
import { sleep } from './clock'
import type { Endpoint } from './client-protocol'
import { httpRequest, parsePrometheus } from './http'
import { findNchan, nchanConfig, stubStatusSubscribers, workerConnectionsFor } from './nchan'
import { childPids, cpuSeconds, fdCount, fileLimit, hasTaskset, rssKb } from './proc'

export type TargetKind = 'gateway' | 'baseline' | 'nchan'

/** Every target, in the order a run measures them. */
export const TARGET_KINDS: readonly TargetKind[] = ['baseline', 'gateway', 'nchan']

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
  /** nginx + Nchan only: the most connections a run holds at once (its streams plus a reserve); worker_connections follow from it. */
  maxConnections?: number
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

/**
 * Whether one of `pids` holds a socket listening on TCP `port` (any address,
 * IPv4 or IPv6), read from /proc; null where /proc cannot tell. `freePort`
 * only finds a port free for a moment: on a busy machine another process may
 * listen on it before the server does, and its /health would pass for the server's.
 */
export function listenerOwnedBy (pids: number[], port: number): boolean | null {
  try {
    const portHex = port.toString(16).toUpperCase().padStart(4, '0')
    const listening = new Set<string>()
    let tables = 0
    for (const table of ['/proc/net/tcp', '/proc/net/tcp6']) {
      let text = ''
      try { text = readFileSync(table, 'utf8') } catch { continue }
      tables++
      for (const line of text.split('\n').slice(1)) {
        const fields = line.trim().split(/\s+/)
        // local_address is ADDR:PORT, st 0A is LISTEN, the tenth field the inode.
        if (fields[1]?.endsWith(`:${portHex}`) === true && fields[3] === '0A') listening.add(`socket:[${fields[9]}]`)
      }
    }
    if (tables === 0) return null
    if (listening.size === 0) return false
    for (const pid of pids) {
      let fds: string[]
      try {
        fds = readdirSync(`/proc/${pid}/fd`)
      } catch (error) {
        // A process that has exited holds no socket; one whose descriptors cannot be read cannot tell.
        if ((error as NodeJS.ErrnoException).code === 'ENOENT') continue
        return null
      }
      for (const fd of fds) {
        let target = ''
        try { target = readlinkSync(`/proc/${pid}/fd/${fd}`) } catch { continue }
        if (listening.has(target)) return true
      }
    }
    return false
  } catch {
    return null
  }
}

/** The server could not listen on its port: another process took it after `freePort` found it free. */
export class PortTakenError extends Error {}

export class ServerProcess {
  private child: ChildProcess | null = null
  private exitCode: number | string | null = null
  private readonly exited: Promise<void>
  private markExited: () => void = () => {}
  /** nginx's worker, where Nchan holds the streams: what memory and CPU are read from. */
  private workerPid = 0
  /** Where this start's lines begin in the log file. */
  private logStartsAt = 0

  constructor (readonly options: ServerOptions) {
    this.exited = new Promise((resolve) => { this.markExited = resolve })
  }

  get pid (): number {
    return this.child?.pid ?? 0
  }

  /** The process holding the streams: the server itself, or nginx's one worker. */
  get measuredPid (): number {
    return this.options.kind === 'nchan' ? this.workerPid : this.pid
  }

  get endpoint (): Endpoint {
    return { host: this.options.host, port: this.options.port, publishBody: this.options.kind === 'nchan' ? 'data' : 'envelope' }
  }

  /** What a stream's first bytes hold once the server has it open end to end. */
  get readyMarker (): string {
    // Nchan's EventSource subscriber greets with a comment; it has no `connected` event.
    return this.options.kind === 'nchan' ? ': hi\n' : 'event: connected\n'
  }

  get url (): string {
    return `http://${this.options.host}:${this.options.port}`
  }

  get running (): boolean {
    return this.child !== null && this.exitCode === null
  }

  async start (readyTimeoutMs = 20_000): Promise<void> {
    const { kind, cpu, env, logFile } = this.options
    const command = kind === 'nchan' ? this.nginxCommand() : this.nodeCommand()
    // taskset pins nginx's master and, through it, the worker it forks.
    if (cpu !== null && hasTaskset()) command.unshift('taskset', '-c', cpu)
    const log = openSync(logFile, 'a')
    this.logStartsAt = statSync(logFile).size
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
      if (!this.running) {
        const tail = this.logTail()
        const Failure = /EADDRINUSE|Address already in use/.test(tail) ? PortTakenError : Error
        throw new Failure(`${this.options.label} exited (${String(this.exitCode)}) while starting:\n${tail}`)
      }
      let ready = false
      try {
        ready = (await httpRequest(`${this.url}/health`, { timeoutMs: 1000 })).status === 200
      } catch {
        // not listening yet
      }
      if (ready) {
        // Answered, but maybe by whoever took the port first: then this server cannot bind it.
        if (listenerOwnedBy([this.pid, ...childPids(this.pid)], this.options.port) === false) {
          await this.stop()
          throw new PortTakenError(`${this.options.label}: port ${this.options.port} is held by another process`)
        }
        if (kind === 'nchan') await this.findWorkerOrStop()
        return
      }
      await sleep(100)
    }
    await this.stop()
    throw new Error(`${this.options.label} did not answer /health within ${readyTimeoutMs} ms:\n${this.logTail()}`)
  }

  /** nginx's one worker; without it, memory and CPU would be read from nowhere and print as blanks. */
  private async findWorkerOrStop (): Promise<void> {
    const workers = childPids(this.pid)
    if (workers.length === 1) {
      this.workerPid = workers[0]
      return
    }
    await this.stop()
    throw new Error(`${this.options.label}: expected one nginx worker under pid ${this.pid}, found ${workers.length}`)
  }

  private nodeCommand (): string[] {
    const { kind, cpuProfDir } = this.options
    const script = kind === 'gateway' ? join(ROOT, 'dist', 'src', 'server.js') : join(ROOT, 'dist', 'bench', 'baseline-server.js')
    const nodeArgs = ['--expose-gc', '-r', join(__dirname, 'gc-on-signal.js')]
    // The gateway runs with the Node flags `npm start` gives it; the baseline with Node's defaults.
    if (kind === 'gateway') nodeArgs.push(...gatewayNodeFlags())
    if (cpuProfDir !== undefined) nodeArgs.push('--cpu-prof', `--cpu-prof-dir=${cpuProfDir}`, `--cpu-prof-name=${this.options.label}.${Date.now()}.cpuprofile`)
    return [process.execPath, ...nodeArgs, script]
  }

  /** nginx in the foreground with a config of its own, beside the run's logs. */
  private nginxCommand (): string[] {
    const install = findNchan()
    if (install === null) throw new Error('nginx with Nchan\'s module is not installed (Debian: apt-get install nginx libnginx-mod-nchan)')
    const dir = join(dirname(this.options.logFile), `${this.options.label}.nginx`)
    mkdirSync(dir, { recursive: true })
    const config = join(dir, 'nginx.conf')
    // nginx allocates every connection slot up front, so the worker's memory
    // follows this number: sized to the run, not to the machine's file limit.
    const hard = fileLimit()?.hard ?? 1024
    writeFileSync(config, nchanConfig({
      module: install.module,
      host: this.options.host,
      port: this.options.port,
      dir,
      errorLog: this.options.logFile,
      connections: Math.min(hard, workerConnectionsFor(this.options.maxConnections ?? 1024))
    }))
    return [install.nginx, '-p', dir, '-c', config, '-e', this.options.logFile]
  }

  /** The end of what this start wrote to the log (a retry appends to the same file: an earlier attempt's EADDRINUSE is not this one's). */
  logTail (bytes = 3000): string {
    try {
      const log = readFileSync(this.options.logFile)
      return log.subarray(Math.max(this.logStartsAt, log.length - bytes)).toString('utf8')
    } catch {
      return '(no log)'
    }
  }

  /**
   * Asks the server for a full garbage collection (see gc-on-signal.ts) and
   * gives it time to finish; false when there is none to ask for.
   */
  async collectGarbage (waitMs = 500): Promise<boolean> {
    // nginx has no garbage collector, and SIGUSR2 would tell it to upgrade its binary.
    if (!this.running || this.options.kind === 'nchan') return false
    this.child?.kill('SIGUSR2')
    await sleep(waitMs)
    return true
  }

  /** Memory, CPU time and descriptors from /proc; the stream count from the server itself. */
  async snapshot (adminToken: string): Promise<ServerSnapshot> {
    const pid = this.measuredPid
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
      } else if (this.options.kind === 'nchan') {
        const answer = await httpRequest(`${this.url}/stats`, { timeoutMs: 10_000 })
        base.connections = stubStatusSubscribers(answer.body)
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
    const timer = setTimeout(() => {
      child.kill('SIGKILL')
      // A killed nginx master leaves its worker running, holding the port and the pinned CPU.
      this.killWorker()
    }, graceMs)
    await this.exited
    clearTimeout(timer)
    this.killWorker()
  }

  private killWorker (): void {
    if (this.workerPid === 0) return
    try {
      process.kill(this.workerPid, 'SIGKILL')
    } catch {
      // already gone, as after a clean shutdown
    }
    this.workerPid = 0
  }
}

/** The `--` flags between `node` and the script in package.json's start script. */
export function gatewayNodeFlags (): string[] {
  const pkg = JSON.parse(readFileSync(join(ROOT, 'package.json'), 'utf8')) as { scripts?: Record<string, string> }
  return (pkg.scripts?.start ?? '').split(/\s+/).filter((word) => word.startsWith('--'))
}
