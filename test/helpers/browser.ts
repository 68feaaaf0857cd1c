/**
 * Debian's Chromium driven by playwright-core (no browser download), pages
 * that open native EventSources and report what they receive to the test,
 * tiny origins of the test's own for cross-origin pages, and a gateway process
 * started on a port of the test's choosing (to restart it on the same one).
 */
import { spawn, type ChildProcess } from 'node:child_process'
import { existsSync } from 'node:fs'
import { mkdtemp, rm } from 'node:fs/promises'
import { createServer, type Server } from 'node:http'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import type { Test } from 'tap'
import { chromium, type BrowserContext, type Page } from 'playwright-core'
import type { TestLike } from './gateway'
import { Waiters, within } from './wait'
import { listensOn, SERVER_JS, type Exit } from './process'

export const CHROMIUM = '/usr/bin/chromium'

export const CHROMIUM_ARGS = [
  '--headless',
  '--no-sandbox',
  '--disable-gpu',
  '--disable-background-networking',
  '--disable-quic',
  '--no-first-run',
  '--disable-component-update',
  '--disable-sync'
]

/** Chromium tests run where Debian's chromium is installed; in CI its absence is a failure. */
export function needChromium (t: Test): boolean {
  if (existsSync(CHROMIUM)) return true
  if (process.env.CI === 'true') t.fail(`${CHROMIUM} is missing (.ci/run must install Debian's chromium)`)
  else t.plan(0, `skipped: ${CHROMIUM} is not installed`)
  return false
}

export interface Browser {
  context: BrowserContext
  /** A new tab whose uncaught errors and console errors are collected in `problems`. */
  newPage: () => Promise<Page>
  problems: string[]
}

/**
 * Headless Chromium with a fresh profile, closed (and the profile removed) in
 * teardown. `extraArgs` go after CHROMIUM_ARGS (e.g. `--ignore-certificate-errors`
 * for a test's self-signed certificate).
 */
export async function launchBrowser (t: TestLike, extraArgs: string[] = []): Promise<Browser> {
  const profile = await mkdtemp(join(tmpdir(), 'sse-chromium-'))
  let context: BrowserContext | null = null
  t.teardown(async () => {
    if (context !== null) await context.close().catch(() => {})
    await rm(profile, { recursive: true, force: true })
  })
  context = await chromium.launchPersistentContext(profile, {
    executablePath: CHROMIUM,
    headless: true,
    args: [...CHROMIUM_ARGS, ...extraArgs],
    timeout: 30_000
  })
  const opened = context
  opened.setDefaultTimeout(10_000)
  const problems: string[] = []
  return {
    context: opened,
    problems,
    newPage: async () => {
      const page = await opened.newPage()
      page.on('pageerror', (error) => problems.push(`pageerror on ${page.url()}: ${error.message}`))
      page.on('console', (message) => {
        if (message.type() === 'error') problems.push(`console error on ${page.url()}: ${message.text()}`)
      })
      return page
    }
  }
}

/** What a page's EventSource reported: a dispatched event, `open`, or `error` with the readyState after it. */
export interface PageRecord {
  kind: 'event' | 'open' | 'error'
  type?: string
  data?: string
  lastEventId?: string
  /** 0 connecting (it will retry), 1 open, 2 closed (it gave up). */
  readyState?: number
}

/** Records from the page, with bounded waits (the page calls an exposed function). */
export class PageRecorder {
  readonly records: PageRecord[] = []
  private readonly waiters = new Waiters()

  push (record: PageRecord): void {
    this.records.push(record)
    this.waiters.wake()
  }

  events (type?: string): PageRecord[] {
    return this.records.filter((record) => record.kind === 'event' && (type === undefined || record.type === type))
  }

  /** Resolves once `check` holds; rejects after `timeoutMs`, naming `what` and the last records. */
  async until (check: () => boolean, what: string, timeoutMs = 10_000): Promise<void> {
    await this.waiters.until(check, { timeoutMs, what, describe: () => `the page recorded: ${this.describe()}` })
  }


  /** Waits until the page has dispatched `count` events of `type`; returns them. */
  async waitEvents (type: string, count: number, timeoutMs = 10_000): Promise<PageRecord[]> {
    await this.until(() => this.events(type).length >= count, `${count} "${type}" event(s)`, timeoutMs)
    return this.events(type)
  }

  describe (): string {
    return this.records.slice(-8).map((record) => record.kind === 'event'
      ? `${record.type ?? '?'}#${record.lastEventId === '' ? '-' : record.lastEventId ?? '-'}`
      : `${record.kind}(${record.readyState ?? '-'})`).join(', ') || 'nothing'
  }
}

let bindingCount = 0

export interface EventSourceOptions {
  /** Event names the page listens for (a browser dispatches only those, and `message`). */
  names: string[]
  withCredentials?: boolean
}

/**
 * Opens a native EventSource in `page` (after the page has loaded) and reports
 * each event, `open` and `error` to the returned recorder. `url` may be
 * relative to the page.
 */
export async function pageEventSource (page: Page, url: string, options: EventSourceOptions): Promise<PageRecorder> {
  const recorder = new PageRecorder()
  const binding = `__sseRecord${++bindingCount}`
  await page.exposeFunction(binding, (record: PageRecord) => recorder.push(record))
  const setup = {
    url,
    names: options.names,
    withCredentials: options.withCredentials === true,
    binding
  }
  // Runs in the page (a string: this project compiles without DOM types).
  await page.evaluate(`(() => {
    const setup = ${JSON.stringify(setup)};
    const report = window[setup.binding];
    const source = new EventSource(setup.url, { withCredentials: setup.withCredentials });
    (window.__sources ??= []).push(source);
    source.addEventListener('open', () => { report({ kind: 'open', readyState: source.readyState }) });
    source.addEventListener('error', () => { report({ kind: 'error', readyState: source.readyState }) });
    for (const name of setup.names) {
      source.addEventListener(name, (event) => { report({ kind: 'event', type: event.type, data: event.data, lastEventId: event.lastEventId }) });
    }
  })()`)
  return recorder
}


/** An origin of the test's own serving one blank HTML page at `/`; closed in teardown. */
export async function startOrigin (t: TestLike, title = 'test origin'): Promise<string> {
  const server: Server = createServer((_request, response) => {
    response.writeHead(200, { 'content-type': 'text/html; charset=utf-8', 'cache-control': 'no-store' })
    response.end(`<!doctype html><html><head><meta charset="utf-8"><title>${title}</title></head><body><p>${title}</p></body></html>`)
  })
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject)
    server.listen(0, '127.0.0.1', () => resolve())
  })
  t.teardown(async () => {
    server.closeAllConnections()
    await new Promise<void>((resolve) => server.close(() => resolve()))
  })
  const address = server.address()
  if (address === null || typeof address === 'string') throw new Error('the origin server has no TCP address')
  return `http://127.0.0.1:${address.port}`
}

export interface PortProcess {
  child: ChildProcess
  url: string
  stdout: () => string
  stderr: () => string
  waitExit: (timeoutMs: number) => Promise<Exit>
}

/**
 * The compiled server on exactly `port` (so it can be restarted where browsers
 * expect it); resolves once /health answers 200. SIGKILLed in teardown if still running.
 */
export async function startServerOnPort (t: TestLike, env: Record<string, string>, port: number, timeoutMs = 20_000): Promise<PortProcess> {
  const child = spawn(process.execPath, [SERVER_JS], {
    env: { PATH: process.env.PATH ?? '/usr/bin:/bin', ...env, PORT: String(port) },
    stdio: ['ignore', 'pipe', 'pipe']
  })
  let stdout = ''
  let stderr = ''
  child.stdout?.setEncoding('utf8').on('data', (chunk: string) => { stdout += chunk })
  child.stderr?.setEncoding('utf8').on('data', (chunk: string) => { stderr += chunk })
  const exited = new Promise<Exit>((resolve) => child.once('exit', (code, signal) => resolve({ code, signal })))
  t.teardown(async () => {
    if (child.exitCode === null && child.signalCode === null) {
      child.kill('SIGKILL')
      await exited
    }
  })
  const waitExit = async (limitMs: number): Promise<Exit> => await within(exited, limitMs, `the server on port ${port} to exit; stderr: ${stderr}`)
  const url = `http://127.0.0.1:${port}`
  const deadline = Date.now() + timeoutMs
  for (;;) {
    if (child.exitCode !== null || child.signalCode !== null) throw new Error(`the server on port ${port} exited before answering; stderr: ${stderr}`)
    try {
      const response = await fetch(`${url}/health`, { signal: AbortSignal.timeout(2000) })
      await response.arrayBuffer()
      // Its own answer: another test's server may hold the port (handed out twice, or taken while this one restarted).
      if (response.status === 200 && await listensOn(child.pid, port)) return { child, url, stdout: () => stdout, stderr: () => stderr, waitExit }
    } catch {
      // Not listening yet.
    }
    if (Date.now() > deadline) throw new Error(`the server on port ${port} did not answer /health within ${timeoutMs} ms; stderr: ${stderr}`)
    await new Promise<void>((resolve) => setTimeout(resolve, 50))
  }
}
