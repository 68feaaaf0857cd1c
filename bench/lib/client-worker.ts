/**
 * One load-client thread: raw TCP sockets, a hand-written `GET`, the minimal
 * parser of ./sse-reader. No HTTP client library sits between the socket and
 * the count, so the client costs little more than the kernel's receive path.
 */
import { connect, type Socket } from 'node:net'
import { monitorEventLoopDelay, performance, type EventLoopUtilization } from 'node:perf_hooks'
import { parentPort, workerData } from 'node:worker_threads'
import { clockWith } from './clock'
import type { ChurnResult, Command, OpenResult, Reply, Report, StreamPlan, WorkerInit } from './client-protocol'
import { Histogram } from './histogram'
import { StreamReader, type ReaderTotals } from './sse-reader'

const init = workerData as WorkerInit
const now = clockWith(init.clockOffsetUs)
const port = parentPort
if (port === null) throw new Error('client-worker must run in a worker thread')

interface Conn {
  index: number
  socket: Socket
  reader: StreamReader
  startUs: number
  /** The client decided to close it (not the server). */
  leaving: boolean
  done: boolean
  /** Churn: when the client closes it. */
  closeAtMs: number
}

const totals: ReaderTotals = { events: 0, firstRxUs: 0, lastRxUs: 0, outOfOrder: 0, gaps: 0, latency: new Histogram() }
const live = new Set<Conn>()
const READ_BUFFER = Buffer.allocUnsafe(256 * 1024)
let closedByServer = 0
let eluStart: EventLoopUtilization = performance.eventLoopUtilization()
const loopDelay = monitorEventLoopDelay({ resolution: 1 })
loopDelay.enable()

function send (reply: Reply): void {
  port?.postMessage(reply)
}

function countError (errors: Record<string, number>, key: string): void {
  errors[key] = (errors[key] ?? 0) + 1
}

interface Opener {
  /** Opens connection `index`; `settled` runs once, when it is open end to end or has failed. */
  open (index: number, settled: (conn: Conn | null) => void): void
  errors: Record<string, number>
  handshake: Histogram
}

function opener (plan: StreamPlan): Opener {
  const readyMarker = Buffer.from(plan.readyMarker)
  const errors: Record<string, number> = {}
  const handshake = new Histogram()
  const open = (index: number, settled: (conn: Conn | null) => void): void => {
    const endpoint = plan.endpoints[index % plan.endpoints.length]
    const token = plan.tokens[index % plan.tokens.length]
    const localAddress = plan.localAddresses.length > 0 ? plan.localAddresses[index % plan.localAddresses.length] : undefined
    // Reads land in one buffer shared by every socket of this thread (no Buffer per read).
    const socket = connect({
      host: endpoint.host,
      port: endpoint.port,
      localAddress,
      onread: { buffer: READ_BUFFER, callback: (length: number, buffer: Uint8Array) => { onRead(buffer, length); return true } }
    })
    const conn: Conn = { index, socket, reader: new StreamReader(totals, readyMarker), startUs: now(), leaving: false, done: false, closeAtMs: 0 }
    let pending = true
    const settle = (ok: boolean, reason?: string): void => {
      if (!pending) return
      pending = false
      clearTimeout(timer)
      if (ok) {
        handshake.record(now() - conn.startUs)
        live.add(conn)
        settled(conn)
      } else {
        countError(errors, reason ?? 'unknown')
        conn.done = true
        socket.destroy()
        settled(null)
      }
    }
    const timer = setTimeout(() => settle(false, 'timeout'), plan.handshakeTimeoutMs)
    socket.on('connect', () => {
      socket.write(`GET ${plan.pathPrefix}${token} HTTP/1.1\r\nHost: ${endpoint.host}:${endpoint.port}\r\nAccept: text/event-stream\r\nCache-Control: no-cache\r\n\r\n`)
    })
    const onRead = (buffer: Uint8Array, length: number): void => {
      const reader = conn.reader
      reader.feed(Buffer.from(buffer.buffer, buffer.byteOffset, length), now())
      if (pending) {
        if (reader.status !== 0 && reader.status !== 200) settle(false, `http_${reader.status}`)
        else if (reader.connected) settle(true)
      }
    }
    socket.on('error', (error: NodeJS.ErrnoException) => {
      if (pending) settle(false, error.code ?? 'error')
    })
    socket.on('close', () => {
      if (pending) {
        settle(false, 'closed_before_open')
        return
      }
      if (conn.done) return
      conn.done = true
      live.delete(conn)
      if (!conn.leaving) closedByServer++
    })
  }
  return { open, errors, handshake }
}

function closeConn (conn: Conn, rst: boolean): void {
  if (conn.done) return
  conn.leaving = true
  conn.done = true
  live.delete(conn)
  // RST leaves no TIME_WAIT behind on either side (no port exhaustion across runs).
  if (rst) conn.socket.resetAndDestroy()
  else conn.socket.destroy()
}

async function openMany (plan: StreamPlan, first: number, count: number, inFlight: number): Promise<OpenResult> {
  const { open, errors, handshake } = opener(plan)
  const startUs = now()
  let next = first
  const end = first + count
  let pending = 0
  let established = 0
  let failed = 0
  await new Promise<void>((resolve) => {
    const launch = (): void => {
      while (pending < inFlight && next < end) {
        pending++
        open(next++, (conn) => {
          pending--
          if (conn === null) failed++
          else established++
          if (next >= end && pending === 0) resolve()
          else launch()
        })
      }
    }
    if (count === 0) resolve()
    else launch()
  })
  return { established, failed, errors, startUs, endUs: now(), handshake: handshake.toJSON() }
}

function report (expected: number): Report {
  let exact = 0
  let over = 0
  let under = 0
  let minEvents = Number.POSITIVE_INFINITY
  let maxEvents = 0
  for (const conn of live) {
    const events = conn.reader.events
    if (events === expected) exact++
    else if (events > expected) over++
    else under++
    if (events < minEvents) minEvents = events
    if (events > maxEvents) maxEvents = events
  }
  return {
    connections: live.size + closedByServer,
    live: live.size,
    events: totals.events,
    firstRxUs: totals.firstRxUs,
    lastRxUs: totals.lastRxUs,
    outOfOrder: totals.outOfOrder,
    gaps: totals.gaps,
    exact,
    over,
    under: under + closedByServer,
    minEvents: live.size === 0 ? 0 : minEvents,
    maxEvents,
    closedByServer,
    latency: totals.latency.toJSON(),
    elu: performance.eventLoopUtilization(eluStart).utilization,
    lagP99Us: loopDelay.count === 0 ? 0 : loopDelay.percentile(99) / 1000,
    lagMaxUs: loopDelay.count === 0 ? 0 : loopDelay.max / 1000
  }
}

function resetCounts (): void {
  totals.events = 0
  totals.firstRxUs = 0
  totals.lastRxUs = 0
  totals.outOfOrder = 0
  totals.gaps = 0
  totals.latency.reset()
  closedByServer = 0
  for (const conn of live) conn.reader.resetCounts()
  eluStart = performance.eventLoopUtilization()
  loopDelay.reset()
}

/**
 * Keeps `target` streams open for `durationMs`, each living a random time in
 * [lifeMinMs, lifeMaxMs] before the client closes it (every `rstEvery`-th with
 * a reset, the others with FIN) and opens a replacement.
 */
async function churn (command: Extract<Command, { type: 'churn' }>): Promise<ChurnResult> {
  const { open, errors } = opener(command.plan)
  const stopAt = Date.now() + command.durationMs
  let next = command.first
  let pending = 0
  let opened = 0
  let failed = 0
  let closedByClient = 0
  let maxLive = 0
  const serverClosedBefore = closedByServer
  const life = (): number => command.lifeMinMs + Math.random() * (command.lifeMaxMs - command.lifeMinMs)
  const launch = (): void => {
    while (Date.now() < stopAt && pending < command.inFlight && live.size + pending < command.target) {
      pending++
      open(next++, (conn) => {
        pending--
        if (conn === null) {
          failed++
          return
        }
        opened++
        conn.closeAtMs = Date.now() + life()
        if (live.size > maxLive) maxLive = live.size
      })
    }
  }
  await new Promise<void>((resolve) => {
    const tick = setInterval(() => {
      const time = Date.now()
      if (time >= stopAt) {
        clearInterval(tick)
        resolve()
        return
      }
      for (const conn of [...live]) {
        if (conn.closeAtMs !== 0 && conn.closeAtMs <= time) {
          closedByClient++
          closeConn(conn, command.rstEvery > 0 && closedByClient % command.rstEvery === 0)
        }
      }
      launch()
    }, 50)
    launch()
  })
  // Let handshakes still in flight settle (bounded by their timeout).
  const settleBy = Date.now() + command.plan.handshakeTimeoutMs + 1000
  while (pending > 0 && Date.now() < settleBy) await new Promise((resolve) => setTimeout(resolve, 20))
  return {
    opened,
    failed,
    closedByClient,
    closedByServer: closedByServer - serverClosedBefore,
    errors,
    events: totals.events,
    outOfOrder: totals.outOfOrder,
    gaps: totals.gaps,
    latency: totals.latency.toJSON(),
    maxLive,
    elu: performance.eventLoopUtilization(eluStart).utilization
  }
}

async function handle (command: Command): Promise<Reply> {
  switch (command.type) {
    case 'open':
      return { type: 'opened', id: command.id, result: await openMany(command.plan, command.first, command.count, command.inFlight) }
    case 'reset':
      resetCounts()
      return { type: 'reset', id: command.id }
    case 'progress':
      return { type: 'progress', id: command.id, progress: { events: totals.events, lastRxUs: totals.lastRxUs, live: live.size } }
    case 'report':
      return { type: 'report', id: command.id, report: report(command.expected) }
    case 'churn':
      return { type: 'churned', id: command.id, result: await churn(command) }
    case 'close': {
      const all = [...live]
      for (const conn of all) closeConn(conn, command.rst)
      return { type: 'closed', id: command.id, closed: all.length }
    }
  }
}

port.on('message', (command: Command) => {
  handle(command).then(send, (error: unknown) => {
    send({ type: 'failed', id: command.id, message: error instanceof Error ? error.message : String(error) })
  })
})
