// First: stop signals are held from here on, while the rest loads.
import { takeStopSignals } from './early-signals'
import { StopSequence } from './stop-sequence'
import type { FastifyInstance } from 'fastify'
import pino from 'pino'
import { buildApp, listenInternal } from './app'
import { ConfigError, loadConfig, stopByMs, type Config } from './config'

async function main (): Promise<void> {
  let config: Config
  try {
    config = loadConfig()
  } catch (error) {
    if (error instanceof ConfigError) {
      process.stderr.write(`${error.message}\n`)
      process.exit(1)
    }
    throw error
  }

  // Opening process.stdout makes Node set a pipe or socket there non-blocking:
  // a write to a reader that stopped reading then waits on a timer, not in a
  // thread-pool thread that process.exit() would wait for without end.
  void process.stdout
  // Lines go out in 4 KB batches, or at most 250 ms late when traffic is
  // light: a burst of stream opens costs one write per batch, not per line.
  // Past 16 MB unwritten (a reader that stopped reading) lines are dropped
  // rather than kept in memory without end.
  const logStream = pino.destination({ dest: 1, sync: false, minLength: 4096, periodicFlush: 250, maxLength: 16 * 1024 * 1024 })
  /**
   * Exits once the lines still buffered are written, or at `deadline` with
   * them unwritten: pino's own flush at exit writes synchronously, and to a
   * reader that stopped reading it would block the exit for good.
   */
  const exitAfterLogs = (code: number, deadline: number): void => {
    setTimeout(() => {
      logStream.destroy()
      process.exit(code)
    }, Math.max(0, deadline - Date.now()))
    logStream.flush(() => process.exit(code))
  }
  // Handled from the start. During start-up there is nothing to drain: a
  // stop signal ends a wait for Redis, and what the start had set up (its
  // instance record, the ingress lease) is closed before the exit.
  let app: FastifyInstance | null = null
  const startup = new AbortController()
  let exitBy = Number.POSITIVE_INFINITY
  const stops = new StopSequence()
  const shutdown = (signal: string): void => {
    const step = stops.next()
    if (step === 'ignore') return
    if (step === 'give up') {
      if (app === null) {
        // Before the app exists there is no logger; stderr is where start-up failures go.
        process.stderr.write(`second stop signal (${signal}) while starting: exiting at once\n`)
        process.exit(1)
      }
      app.log.warn({ signal }, 'second stop signal: exiting without finishing the drain')
      exitAfterLogs(1, Math.min(exitBy, Date.now() + 500))
      return
    }
    if (app === null) {
      startup.abort()
      setTimeout(() => process.exit(0), config.shutdownTimeoutMs).unref()
      return
    }
    const running = app
    running.log.info({ signal, streams: running.registry.size }, 'draining')
    // The last lines get a share of the time, within SHUTDOWN_TIMEOUT_MS.
    exitBy = Date.now() + config.shutdownTimeoutMs
    const drainBy = Date.now() + stopByMs(config)
    const deadline = setTimeout(() => {
      stops.drainOver()
      running.log.warn('drain timed out; exiting')
      exitAfterLogs(0, exitBy)
    }, drainBy - Date.now())
    deadline.unref()
    running.close().then(() => {
      stops.drainOver()
      running.log.info('stopped')
      exitAfterLogs(0, exitBy)
    }, (error: unknown) => {
      stops.drainOver()
      running.log.error({ err: error }, 'error while stopping')
      exitAfterLogs(1, exitBy)
    })
  }
  takeStopSignals(shutdown)

  try {
    app = await buildApp(config, { logStream, startupSignal: startup.signal })
  } catch (error) {
    if (!startup.signal.aborted) throw error
    logStream.flushSync()
    process.exit(0)
  }
  if (startup.signal.aborted) {
    // Stopped once the build was past its last wait.
    await app.close()
    process.exit(0)
  }
  // A listen error names neither variable (getaddrinfo ENOTFOUND x, EADDRINUSE).
  const naming = (variables: string) => (error: unknown): never => {
    throw new Error(`cannot listen on ${variables}: ${error instanceof Error ? error.message : String(error)}`)
  }
  try {
    await app.listen({ port: config.port, host: config.host }).catch(naming(`HOST=${config.host} PORT=${config.port}`))
    if (config.internalPort !== null) {
      const server = await listenInternal(app, config.internalPort, config.host).catch(naming(`HOST=${config.host} INTERNAL_PORT=${config.internalPort}`))
      app.log.info({ address: server.address() }, 'internal listener (publish, admin, metrics)')
    }
  } catch (error) {
    // A port taken: what the start set up in Redis (the instance record, the
    // ingress lease) is given back before the exit.
    await app.close().catch((closeError: unknown) => {
      app.log.warn({ err: closeError }, 'could not close what the failed start set up')
    })
    throw error
  }
  app.log.info({ mode: app.bus.mode, instance: app.registry.instanceId }, 'gateway ready')
}

main().catch((error: unknown) => {
  process.stderr.write(`gateway failed to start: ${error instanceof Error ? error.message : String(error)}\n`)
  process.exit(1)
})
