/**
 * The bench sizes nginx's worker_connections for nginx + Nchan: too few slots
 * and nginx closes streams that are still opening, which the bench would count
 * as the peer's failed opens. Checked against the real nginx, with a control
 * that shows the check can see the failure.
 */
import t, { type Test } from 'tap'
import { spawn } from 'node:child_process'
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { connect } from 'node:net'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { findNchan, nchanConfig, workerConnectionsFor } from '../bench/lib/nchan'
import { freePort, listensOn } from './helpers/process'
import { within } from './helpers/wait'

const STREAMS = 400
const IN_FLIGHT = 32

t.test('worker_connections keeps clear of the sixteenth nginx holds in reserve', async (t) => {
  for (const inUse of [1, 16, 400, 10_200, 19_200]) {
    const slots = workerConnectionsFor(inUse)
    // nginx drains waiting connections once free slots are at or below slots/16.
    t.ok(slots - inUse - 1 > Math.floor(slots / 16), `${inUse} in use: ${slots} slots leave more than the reserve free`)
    t.ok(slots < inUse * 1.1 + 32, `${inUse} in use: ${slots} slots, not far beyond what is needed`)
  }
})

interface Opened {
  established: number
  closedByServer: number
}

/** Opens `count` Nchan EventSource streams, `IN_FLIGHT` at a time, and keeps them until `release`. */
async function openStreams (t: Test, port: number, count: number): Promise<Opened> {
  const sockets: Array<ReturnType<typeof connect>> = []
  t.teardown(() => { for (const socket of sockets) socket.destroy() })
  let established = 0
  let closedByServer = 0
  let next = 0
  const openOne = async (): Promise<void> => {
    await new Promise<void>((resolve) => {
      const socket = connect({ host: '127.0.0.1', port })
      sockets.push(socket)
      let received = ''
      let settled = false
      const settle = (ok: boolean): void => {
        if (settled) return
        settled = true
        if (ok) established++
        else closedByServer++
        resolve()
      }
      socket.on('connect', () => socket.write(`GET /v1/stream?topics=sizing HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n`))
      // Nchan's EventSource subscriber sends ": hi" once the stream is open.
      socket.on('data', (chunk) => {
        received += chunk.toString('latin1')
        if (received.includes(': hi\n')) settle(true)
      })
      socket.on('close', () => settle(false))
      socket.on('error', () => settle(false))
    })
  }
  const worker = async (): Promise<void> => {
    while (next < count) {
      next++
      await openOne()
    }
  }
  await Promise.all(Array.from({ length: IN_FLIGHT }, worker))
  return { established, closedByServer }
}

async function startNginx (t: Test, slots: number): Promise<{ port: number, errorLog: string }> {
  const install = findNchan()
  if (install === null) throw new Error('no nginx with Nchan')
  const dir = mkdtempSync(join(tmpdir(), 'bench-nchan-test-'))
  const port = await freePort()
  const errorLog = join(dir, 'error.log')
  const config = join(dir, 'nginx.conf')
  writeFileSync(config, nchanConfig({ module: install.module, host: '127.0.0.1', port, dir, errorLog, connections: slots }))
  const nginx = spawn(install.nginx, ['-p', dir, '-c', config, '-e', errorLog], { stdio: 'ignore', detached: true })
  const exited = new Promise<void>((resolve) => nginx.once('exit', () => resolve()))
  t.teardown(async () => {
    if (nginx.exitCode === null && nginx.pid !== undefined) {
      // The group: the master and its worker.
      try { process.kill(-nginx.pid, 'SIGTERM') } catch {}
      await within(exited, 10_000, 'nginx to stop').catch(() => {
        try { process.kill(-(nginx.pid as number), 'SIGKILL') } catch {}
      })
    }
    rmSync(dir, { recursive: true, force: true })
  })
  const deadline = Date.now() + 10_000
  // Bounded, and over once nginx is gone: a poll left running would keep the test process alive.
  while (nginx.exitCode === null && nginx.signalCode === null && Date.now() < deadline) {
    try {
      const response = await fetch(`http://127.0.0.1:${port}/health`, { signal: AbortSignal.timeout(2000) })
      // nginx's own answer: another test's server may hold a port handed out twice.
      if (response.ok && await listensOn(nginx.pid, port)) return { port, errorLog }
    } catch {}
    await new Promise((resolve) => setTimeout(resolve, 50))
  }
  const log = existsSync(errorLog) ? readFileSync(errorLog, 'utf8').slice(-2000) : ''
  throw new Error(`nginx did not answer /health (exit ${String(nginx.exitCode)}); its error log: ${log}`)
}

t.test('against the real nginx + Nchan', async (t) => {
  if (findNchan() === null) {
    if (process.env.CI === 'true') t.fail('nginx with Nchan\'s module is not installed (CI must provide it)')
    else t.plan(0, 'skipped: nginx with Nchan\'s module is not installed')
    return
  }

  t.test(`${STREAMS} streams opening at once all stay open with the bench's sizing`, async (t) => {
    const { port, errorLog } = await startNginx(t, workerConnectionsFor(STREAMS))
    const opened = await within(openStreams(t, port, STREAMS), 30_000, 'the streams to open')
    t.same(opened, { established: STREAMS, closedByServer: 0 })
    t.notMatch(readFileSync(errorLog, 'utf8'), /worker_connections are not enough/)
  })

  t.test(`control: with only ${STREAMS + 8} slots nginx closes some of them`, async (t) => {
    const { port, errorLog } = await startNginx(t, STREAMS + 8)
    const opened = await within(openStreams(t, port, STREAMS), 30_000, 'the streams to open')
    t.ok(opened.closedByServer > 0, `nginx closed ${opened.closedByServer} opening streams`)
    t.match(readFileSync(errorLog, 'utf8'), /worker_connections are not enough, reusing connections/)
  })
})
