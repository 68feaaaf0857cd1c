/**
 * The real nginx (Debian's package) in front of test gateways, running
 * deploy/nginx.conf with only its marked lines substituted: the two upstream
 * `server gateway-x:3000 max_fails=0 resolve;` lines and `listen 80;` always, and for the tests
 * that ask, `worker_processes auto;`, `worker_shutdown_timeout 30s;` and the
 * commented-out HTTPS listener (uncommented on a free port, with a self-signed
 * certificate made by openssl where its `ssl_certificate*` lines point).
 * Everything else (every SSE directive) is the committed file, so a test
 * through it proves that file.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process'
import { closeSync, constants, existsSync, openSync } from 'node:fs'
import { Socket } from 'node:net'
import { chmod, mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import type { Test } from 'tap'
import { dirname, join, resolve } from 'node:path'
import { TEST_SECRET, type TestLike } from './gateway'
import { freePort, listensOn, listensToo, spawnServer, type ServerProcess } from './process'
import { REDIS_URL } from './redis'

/** deploy/nginx.conf of this checkout (the compiled helper lives in dist/test/helpers). */
export const NGINX_CONF = join(__dirname, '..', '..', '..', 'deploy', 'nginx.conf')

export const UPSTREAM_LINES = ['server gateway-a:3000 max_fails=0 resolve;', 'server gateway-b:3000 max_fails=0 resolve;'] as const
export const LISTEN_LINE = 'listen 80;'
export const WORKER_PROCESSES_LINE = 'worker_processes auto;'
export const SHUTDOWN_TIMEOUT_LINE = 'worker_shutdown_timeout 30s;'
export const PROXY_HTTP_VERSION_LINE = 'proxy_http_version 1.1;'

/**
 * The commented-out HTTPS listener, found by the start of each line: the
 * `listen 443` line's parameters (`ssl http2`) and the certificate paths are
 * whatever the file says, so a test through it proves them.
 */
export const TLS_LINE_PATTERNS = [/^# listen 443(\s[^;]*)?;$/, /^# ssl_certificate\s+\S+;$/, /^# ssl_certificate_key\s+\S+;$/] as const

/** `name` on PATH, or where Debian puts it (/usr/sbin is not on every PATH). */
function findBinary (name: string): string | null {
  for (const dir of [...(process.env.PATH ?? '').split(':').filter((entry) => entry !== ''), '/usr/sbin', '/usr/local/sbin', '/sbin']) {
    const candidate = join(dir, name)
    if (existsSync(candidate)) return candidate
  }
  return null
}

/** The nginx binary. */
export function nginxBinary (): string | null {
  return findBinary('nginx')
}

/** The openssl binary (makes the test certificate). */
export function opensslBinary (): string | null {
  return findBinary('openssl')
}

/**
 * Whether nginx is installed, and openssl too with `tls` (the HTTPS listener's
 * certificate). In CI a missing one fails the test; elsewhere the test is skipped.
 */
export async function haveNginx (t: Test, options: { tls?: boolean } = {}): Promise<boolean> {
  const missing = [nginxBinary() === null ? 'nginx' : null, options.tls === true && opensslBinary() === null ? 'openssl' : null].filter((name) => name !== null)
  if (missing.length === 0) return true
  if (process.env.CI === 'true') t.fail(`${missing.join(' and ')} not installed (.ci/run must install ${missing.length > 1 ? 'them' : 'it'})`)
  else t.plan(0, `skipped: ${missing.join(' and ')} not installed`)
  return false
}

/** The HTTPS listener's lines of `source`, trimmed as the file has them (each must occur exactly once). */
export function tlsLines (source: string): string[] {
  const lines = source.split('\n').map((line) => line.trim())
  return TLS_LINE_PATTERNS.map((pattern) => {
    const hits = lines.filter((line) => pattern.test(line))
    if (hits.length !== 1) throw new Error(`deploy/nginx.conf must hold one commented-out line matching ${String(pattern)} (found ${hits.length})`)
    return hits[0]
  })
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
  /** Replaces `proxy_http_version 1.1;` with nginx's default, 1.0 (what a config that leaves it out gets). */
  upstreamHttp10?: boolean
  /** Starts nginx under this soft limit of open files (the hard one is left as it is). */
  softFileLimit?: number
  /**
   * Uncomments the HTTPS listener, on 127.0.0.1 and a free port, and puts a
   * fresh self-signed certificate (for 127.0.0.1 and localhost) where its
   * `ssl_certificate*` lines point.
   */
  tls?: boolean
  probePath?: string
  timeoutMs?: number
}

/**
 * The committed config pointed at `upstreams` (host:port, one per marked
 * upstream line), listening on 127.0.0.1:`port`, and with the other marked
 * lines `options` asks for substituted (the HTTPS listener on `tlsPort`).
 */
export function nginxVariant (source: string, upstreams: readonly [string, string], port: number, options: NginxOptions = {}, tlsPort?: number): string {
  let text = source
  UPSTREAM_LINES.forEach((line, index) => {
    // The address, and `resolve`, which an address has no use for (and
    // Debian's nginx, 1.22, does not know): the other parameters are part of what is tested.
    text = substituteLine(text, line, line.replace(/gateway-[ab]:3000/, upstreams[index]).replace(' resolve;', ';'))
  })
  text = substituteLine(text, LISTEN_LINE, `listen 127.0.0.1:${port};`)
  if (options.workerProcesses !== undefined) text = substituteLine(text, WORKER_PROCESSES_LINE, `worker_processes ${options.workerProcesses};`)
  if (options.shutdownTimeout !== undefined) text = substituteLine(text, SHUTDOWN_TIMEOUT_LINE, `worker_shutdown_timeout ${options.shutdownTimeout};`)
  if (options.upstreamHttp10 === true) text = substituteLine(text, PROXY_HTTP_VERSION_LINE, 'proxy_http_version 1.0;')
  if (options.tls === true) {
    if (tlsPort === undefined) throw new Error('the HTTPS listener needs a port')
    const [listen, ...certificates] = tlsLines(source)
    text = substituteLine(text, listen, listen.replace(/^# listen 443/, `listen 127.0.0.1:${tlsPort}`))
    for (const line of certificates) text = substituteLine(text, line, line.slice(2))
  }
  return text
}

/** The files the HTTPS listener's `ssl_certificate` and `ssl_certificate_key` lines name, relative to the config's directory as nginx reads them. */
function certificatePaths (source: string, configDir: string): { certificate: string, key: string } {
  const [, certificate, key] = tlsLines(source).map((line) => /\s(\S+);$/.exec(line)?.[1] ?? '')
  return { certificate: resolve(configDir, certificate), key: resolve(configDir, key) }
}

/** A self-signed certificate (EC P-256, one day) for 127.0.0.1 and localhost, written where nginx will read it. */
async function makeCertificate (paths: { certificate: string, key: string }): Promise<string> {
  const binary = opensslBinary()
  if (binary === null) throw new Error('openssl is not installed (.ci/run installs Debian\'s openssl)')
  await mkdir(dirname(paths.certificate), { recursive: true })
  await mkdir(dirname(paths.key), { recursive: true })
  const made = spawnSync(binary, [
    'req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes', '-days', '1',
    '-subj', '/CN=127.0.0.1', '-addext', 'subjectAltName=IP:127.0.0.1,DNS:localhost',
    '-keyout', paths.key, '-out', paths.certificate
  ], { timeout: 15_000 })
  if (made.status !== 0) throw new Error(`openssl could not make the test certificate: ${made.stderr.toString()}`)
  return await readFile(paths.certificate, 'utf8')
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
  /** With `tls`: the HTTPS listener (`https://127.0.0.1:<port>`) and its self-signed certificate (PEM). */
  https: { url: string, port: number, certificate: string } | null
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

  const configPath = join(dir, 'nginx.conf')
  // Inside the prefix directory, so the teardown above removes it (key included).
  const certificate = options.tls === true ? await makeCertificate(certificatePaths(source, dir)) : null

  for (let attempt = 1; ; attempt++) {
    const port = await freePort()
    let tlsPort: number | undefined
    while (certificate !== null && (tlsPort === undefined || tlsPort === port)) tlsPort = await freePort()
    const config = nginxVariant(source, upstreams, port, options, tlsPort)
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
        // nginx's own answer: another test's nginx may hold a port handed out twice.
        if (response.status === 200 && await listensOn(process_.pid, port)) {
          const https = certificate !== null && tlsPort !== undefined ? { url: `https://127.0.0.1:${tlsPort}`, port: tlsPort, certificate } : null
          return { url, port, dir, config, https, stdout: () => stdout, stderr: () => stderr, child: process_ }
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

export interface StackGateway extends ServerProcess {
  /** The internal listener (publish, admin), never reached through nginx. */
  internalUrl: string
}

/** A gateway process of a cluster behind nginx, as docker-compose.yml runs it: Redis mode, an internal port, nginx trusted. */
export async function startGatewayProcess (t: TestLike, prefix: string, env: Record<string, string> = {}): Promise<StackGateway> {
  for (let attempt = 1; ; attempt++) {
    const internalPort = await freePort()
    const server = await spawnGatewayProcess(t, prefix, internalPort, env)
    // The internal listener is bound after the public one answers: a port
    // taken meanwhile by another test ends the process there.
    if (await listensToo(server, internalPort)) return Object.assign(server, { internalUrl: `http://127.0.0.1:${internalPort}` })
    await server.exited
    if (attempt < 3 && server.stderr().includes('EADDRINUSE')) continue
    throw new Error(`the gateway exited before listening on its internal port; stderr: ${server.stderr()}`)
  }
}

async function spawnGatewayProcess (t: TestLike, prefix: string, internalPort: number, env: Record<string, string>): Promise<ServerProcess> {
  return await spawnServer(t, {
    JWT_SECRET: TEST_SECRET,
    HOST: '127.0.0.1',
    REDIS_URL,
    REDIS_PREFIX: prefix,
    INSTANCE_TTL_MS: '3000',
    INTERNAL_PORT: String(internalPort),
    // nginx runs on this machine: its address is loopback.
    TRUST_PROXY: '127.0.0.1',
    LOG_LEVEL: 'info',
    ...env
  })
}
