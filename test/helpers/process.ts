/**
 * The compiled server (dist/src/server.js) as a child process, for what only a
 * real process shows: start-up errors, exit codes, signals.
 */
import { spawn, type ChildProcess } from 'node:child_process'
import { join } from 'node:path'
import { freePort, listenerOwnedBy } from '../../bench/lib/server'
import type { TestLike } from './gateway'

/** A port free right now on 127.0.0.1 (the bench's). */
export { freePort }

export const SERVER_JS = join(__dirname, '..', '..', 'src', 'server.js')

export interface Exit {
  code: number | null
  signal: NodeJS.Signals | null
}

export interface ServerProcess {
  child: ChildProcess
  port: number
  url: string
  stdout: () => string
  stderr: () => string
  /** Settles when the process has exited. */
  exited: Promise<Exit>
  /** The exit, or a rejection after `timeoutMs`. */
  waitExit: (timeoutMs: number) => Promise<Exit>
}

/** Only what the test passes: nothing of the test runner's environment leaks in. */
function childEnv (env: Record<string, string>): NodeJS.ProcessEnv {
  return { PATH: process.env.PATH ?? '/usr/bin:/bin', ...env }
}

export interface LaunchOptions {
  /**
   * stdout is a pipe nobody reads: once its buffer is full, every write to it
   * blocks or fails. The server runs through env(1) without NODE_OPTIONS: the
   * test runner puts its preload back into any node it sees spawned, and that
   * preload opens process.stdout, which a plain start does not.
   */
  unreadStdout?: boolean
  /** Node options before the server's script (`-r` a preload). */
  nodeArgs?: string[]
  /** A command that runs node (`prlimit --nofile=N:N`), with its arguments. */
  prefix?: string[]
  /**
   * Without the test runner's preload (through env(1), as for
   * `unreadStdout`): it handles stop signals itself, so a server without
   * handlers of its own would not die of one.
   */
  withoutRunnerPreload?: boolean
}

/** Starts the server with `env` and returns at once (PORT as given; `port` is where its URL points). */
export function launch (t: TestLike, env: Record<string, string>, port: number, options: LaunchOptions = {}): ServerProcess {
  const node = [process.execPath, ...(options.nodeArgs ?? []), SERVER_JS]
  const bare = options.unreadStdout === true || options.withoutRunnerPreload === true
  const [command, ...args] = [...(options.prefix ?? []), ...(bare ? ['env', '-u', 'NODE_OPTIONS'] : []), ...node]
  const child = spawn(command, args, { env: childEnv(env), stdio: ['ignore', 'pipe', 'pipe'] })
  let stdout = ''
  let stderr = ''
  if (options.unreadStdout !== true) child.stdout?.setEncoding('utf8').on('data', (chunk: string) => { stdout += chunk })
  child.stderr?.setEncoding('utf8').on('data', (chunk: string) => { stderr += chunk })
  const exited = new Promise<Exit>((resolve) => {
    child.once('exit', (code, signal) => resolve({ code, signal }))
  })
  t.teardown(async () => {
    if (child.exitCode === null && child.signalCode === null) {
      child.kill('SIGKILL')
      await exited
    }
  })
  const waitExit = async (timeoutMs: number): Promise<Exit> => {
    let timer: NodeJS.Timeout | undefined
    const timeout = new Promise<never>((_resolve, reject) => {
      timer = setTimeout(() => reject(new Error(`the server did not exit within ${timeoutMs} ms; stderr: ${stderr}`)), timeoutMs)
    })
    try {
      return await Promise.race([exited, timeout])
    } finally {
      clearTimeout(timer)
    }
  }
  return { child, port, url: `http://127.0.0.1:${port}`, stdout: () => stdout, stderr: () => stderr, exited, waitExit }
}

/** Runs the server with `env` and waits for it to exit (for configurations that must fail). */
export async function runServerToExit (t: TestLike, env: Record<string, string>, timeoutMs = 15_000): Promise<Exit & { stdout: string, stderr: string }> {
  const server = launch(t, env, 0)
  const exit = await server.waitExit(timeoutMs)
  return { ...exit, stdout: server.stdout(), stderr: server.stderr() }
}

/** Whether process `pid` holds the socket listening on TCP `port` (Linux's /proc). */
export async function listensOn (pid: number | undefined, port: number): Promise<boolean> {
  return pid !== undefined && listenerOwnedBy([pid], port) === true
}

/**
 * Resolves true once `server`'s process listens on `port` as well (a second
 * listener, bound after the one its /health answers on), false if it exits first.
 */
export async function listensToo (server: ServerProcess, port: number, timeoutMs = 10_000): Promise<boolean> {
  const deadline = Date.now() + timeoutMs
  while (server.child.exitCode === null && server.child.signalCode === null) {
    if (await listensOn(server.child.pid, port)) return true
    if (Date.now() > deadline) throw new Error(`the server did not listen on port ${port} within ${timeoutMs} ms; stderr: ${server.stderr()}`)
    await new Promise<void>((resolve) => setTimeout(resolve, 20))
  }
  return false
}

/**
 * Starts the server on a free port (PORT is set here; HOST stays the default
 * unless `env` sets it) and resolves once GET /health answers 200. A start
 * lost to a port taken in between is retried on another port.
 */
export async function spawnServer (t: TestLike, env: Record<string, string>, timeoutMs = 20_000, options: LaunchOptions = {}): Promise<ServerProcess> {
  for (let attempt = 1; ; attempt++) {
    const port = await freePort()
    const server = launch(t, { ...env, PORT: String(port) }, port, options)
    const deadline = Date.now() + timeoutMs
    let exit: Exit | null = null
    void server.exited.then((value) => { exit = value })
    while (exit === null) {
      try {
        const response = await fetch(`${server.url}/health`, { signal: AbortSignal.timeout(2000) })
        await response.arrayBuffer()
        // Another test's server may hold the port freePort gave out twice,
        // and answer before this one has failed to bind and exited.
        if (response.status === 200 && await listensOn(server.child.pid, port)) {
          // A server that dies of itself later shows up in a test only as refused
          // connections; its last words say why.
          void server.exited.then(({ code, signal }) => {
            if (code !== 0 && signal === null) console.error(`the server on port ${port} exited with ${code}; stderr: ${server.stderr()}`)
          })
          return server
        }
      } catch {
        // Not listening yet.
      }
      if (Date.now() > deadline) throw new Error(`the server did not answer /health within ${timeoutMs} ms; stderr: ${server.stderr()}`)
      await new Promise<void>((resolve) => setTimeout(resolve, 50))
    }
    if (attempt < 3 && server.stderr().includes('EADDRINUSE')) continue
    throw new Error(`the server exited (${JSON.stringify(exit)}) before answering; stderr: ${server.stderr()}`)
  }
}
