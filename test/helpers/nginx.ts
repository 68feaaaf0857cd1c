/**
 * The real nginx (Debian's package) in front of test gateways, running
 * deploy/nginx.conf with only its marked lines substituted: the two upstream
 * `server gateway-x:3000;` lines and `listen 80;` always, and for the tests
 * that ask, `worker_processes auto;` and `worker_shutdown_timeout 30s;`.
 * Everything else (every SSE directive) is the committed file, so a test
 * through it proves that file.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process'
import { closeSync, constants, existsSync, openSync } from 'node:fs'
import { Socket } from 'node:net'
import { chmod, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import type { TestLike } from './gateway'
import { freePort } from './process'

/** deploy/nginx.conf of this checkout (the compiled helper lives in dist/test/helpers). */
export const NGINX_CONF = join(__dirname, '..', '..', '..', 'deploy', 'nginx.conf')

export const UPSTREAM_LINES = ['server gateway-a:3000;', 'server gateway-b:3000;'] as const
export const LISTEN_LINE = 'listen 80;'
export const WORKER_PROCESSES_LINE = 'worker_processes auto;'
export const SHUTDOWN_TIMEOUT_LINE = 'worker_shutdown_timeout 30s;'

/** The nginx binary: on PATH, or where Debian puts it (/usr/sbin is not on every PATH). */
export function nginxBinary (): string | null {
  for (const dir of [...(process.env.PATH ?? '').split(':').filter((entry) => entry !== ''), '/usr/sbin', '/usr/local/sbin', '/sbin']) {
    const candidate = join(dir, 'nginx')
    if (existsSync(candidate)) return candidate
  }
  return null
}

/** Replaces `marked` (which must occur exactly once, as a whole line) by `replacement`. */
function substituteLine (text: string, marked: string, replacement: string): string {
  const lines = text.split('\n')
  const hits = lines.map((line, index) => line.trim() === marked ? index : -1).filter((index) => index !== -1)
  if (hits.length !== 1) throw new Error(`deploy/nginx.conf must hold the line "${marked}" exactly once (found ${hits.length})`)
  const index = hits[0]
  const indent = /^\s*/.exec(lines[index])?.[0] ?? ''
  lines[index] = `${indent}${replacement}`
  return lines.join('\n')
}

export interface NginxOptions {
  /** Replaces `worker_processes auto;`: a known count of workers. */
  workerProcesses?: number
  /** Replaces `worker_shutdown_timeout 30s;` (an nginx time, e.g. `1s`). */
  shutdownTimeout?: string
  /** Starts nginx under this soft limit of open files (the hard one is left as it is). */
  softFileLimit?: number
  probePath?: string
  timeoutMs?: number
}

/**
 * The committed config pointed at `upstreams` (host:port, one per marked
 * upstream line), listening on 127.0.0.1:`port`, and with the other marked
 * lines `options` asks for substituted.
 */
export function nginxVariant (source: string, upstreams: readonly [string, string], port: number, options: NginxOptions = {}): string {
  let text = source
  UPSTREAM_LINES.forEach((line, index) => {
    text = substituteLine(text, line, `server ${upstreams[index]};`)
  })
  text = substituteLine(text, LISTEN_LINE, `listen 127.0.0.1:${port};`)
  if (options.workerProcesses !== undefined) text = substituteLine(text, WORKER_PROCESSES_LINE, `worker_processes ${options.workerProcesses};`)
  if (options.shutdownTimeout !== undefined) text = substituteLine(text, SHUTDOWN_TIMEOUT_LINE, `worker_shutdown_timeout ${options.shutdownTimeout};`)
  return text
}

/** This process's hard limit of open files (what a child may raise its soft limit to). */
export function hardFileLimit (): number {
  const shown = spawnSync('/bin/sh', ['-c', 'ulimit -H -n']).stdout.toString().trim()
  return shown === 'unlimited' ? Infinity : Number(shown)
}

export interface Nginx {
  /** `http://127.0.0.1:<port>`, no trailing slash. */
  url: string
  port: number
  /** The prefix directory (config, pid file, temp dirs). */
  dir: string
  /** The generated config's text. */
  config: string
  /** nginx's stdout: the access log (the config logs to /dev/stdout). */
  stdout: () => string
  stderr: () => string
  child: ChildProcess
}

/**
 * Starts nginx in the foreground with the committed config pointed at
 * `upstreams`, waits until GET `probePath` (default /health) answers through
 * it, and stops it (then removes its prefix directory) in teardown.
 */
export async function startNginx (t: TestLike, upstreams: readonly [string, string], options: NginxOptions = {}): Promise<Nginx> {
  const { probePath = '/health', timeoutMs = 15_000 } = options
  const binary = nginxBinary()
  if (binary === null) throw new Error('nginx is not installed (.ci/run installs Debian\'s nginx)')
  const source = await readFile(NGINX_CONF, 'utf8')
  const dir = await mkdtemp(join(tmpdir(), 'sse-nginx-'))
  // Workers run as `nobody` when the master is root: they must reach the temp dirs.
  await chmod(dir, 0o755)
  let child: ChildProcess | null = null
  let exited: Promise<void> = Promise.resolve()
  t.teardown(async () => {
    if (child !== null && child.exitCode === null && child.signalCode === null) {
      const running = child
      // SIGTERM: fast shutdown of the master and its workers.
      running.kill('SIGTERM')
      const stopped = await Promise.race([exited.then(() => true), new Promise<boolean>((resolve) => setTimeout(() => resolve(false), 5000).unref())])
      if (!stopped && running.pid !== undefined) {
        // The master leads its own process group (detached): end it and its workers.
        try { process.kill(-running.pid, 'SIGKILL') } catch {}
        await exited
      }
    }
    await rm(dir, { recursive: true, force: true })
  })

  for (let attempt = 1; ; attempt++) {
    const port = await freePort()
    const config = nginxVariant(source, upstreams, port, options)
    const configPath = join(dir, 'nginx.conf')
    await writeFile(configPath, config)
    // The config logs to /dev/stdout, which nginx opens by path: that fails
    // (ENXIO) when stdout is a socket, as Node's 'pipe' stdio is. Give it a
    // real pipe (a FIFO), as a container runtime does.
    const fifo = join(dir, `stdout-${attempt}.fifo`)
    const made = spawnSync('mkfifo', [fifo])
    if (made.status !== 0) throw new Error(`mkfifo failed: ${made.stderr.toString()}`)
    const readFd = openSync(fifo, constants.O_RDONLY | constants.O_NONBLOCK)
    const writeFd = openSync(fifo, constants.O_WRONLY)
    // pid, error_log and temp paths come from the file (relative to -p); daemon from the command line, as the file asks.
    const args = ['-e', 'stderr', '-p', `${dir}/`, '-c', configPath, '-g', 'daemon off;']
    // The shell lowers its own soft limit and becomes nginx (exec): the child's pid stays nginx's.
    const command: [string, string[]] = options.softFileLimit === undefined
      ? [binary, args]
      : ['/bin/sh', ['-c', 'ulimit -S -n "$0" && exec "$@"', String(options.softFileLimit), binary, ...args]]
    const process_ = spawn(command[0], command[1], {
      stdio: ['ignore', writeFd, 'pipe'],
      detached: true
    })
    closeSync(writeFd)
    child = process_
    let stdout = ''
    let stderr = ''
    const reader = new Socket({ fd: readFd, readable: true, writable: false })
    reader.setEncoding('utf8').on('data', (chunk: string) => { stdout += chunk })
    reader.on('error', () => {})
    process_.stderr?.setEncoding('utf8').on('data', (chunk: string) => { stderr += chunk })
    process_.once('exit', () => { reader.destroy() })
    let gone = false
    exited = new Promise<void>((resolve) => process_.once('exit', () => { gone = true; resolve() }))
    const url = `http://127.0.0.1:${port}`
    const deadline = Date.now() + timeoutMs
    while (!gone) {
      try {
        const response = await fetch(`${url}${probePath}`, { signal: AbortSignal.timeout(2000) })
        await response.arrayBuffer()
        if (response.status === 200) {
          return { url, port, dir, config, stdout: () => stdout, stderr: () => stderr, child: process_ }
        }
      } catch {
        // Not listening yet, or no upstream answered yet.
      }
      if (Date.now() > deadline) throw new Error(`nginx did not answer ${probePath} with 200 within ${timeoutMs} ms; stderr: ${stderr}`)
      await new Promise<void>((resolve) => setTimeout(resolve, 50))
    }
    if (attempt < 3 && stderr.includes('Address already in use')) continue
    throw new Error(`nginx exited before answering (code ${String(process_.exitCode)}); stderr: ${stderr}`)
  }
}
