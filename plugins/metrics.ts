import { monitorEventLoopDelay, type IntervalHistogram } from 'node:perf_hooks'
import fp from 'fastify-plugin'
import { collectDefaultMetrics, Counter, Gauge, Registry as PromRegistry } from 'prom-client'
import type { StreamConnection } from '../src/core/connection'
import { MemoryBus } from '../src/core/memory-bus'

/** What the gateway counts; each method is cheap enough for hot paths. */
export interface GatewayMetrics {
  readonly registry: PromRegistry
  authFailure (reason: string): void
  published (targetKind: string, count: number): void
  /** A Redis ingress message dropped (its reason is logged: free text would make one series per message). */
  ingressRejected (source: string): void
  /** A durable entry handed over from a holder that had published it: not published again. */
  ingressRepeated (): void
  ingressDropped (source: string): void
  streamOpened (connection: StreamConnection): void
  streamClosed (connection: StreamConnection, reason: string): void
  replayed (count: number): void
  reset (reason: string): void
  cursorsMoved (count: number): void
}

declare module 'fastify' {
  interface FastifyInstance {
    metrics: GatewayMetrics
  }
}

export default fp(async (app) => {
  // One registry per app: several gateways may live in one process (tests, benchmarks).
  const registry = new PromRegistry()
  // Not `instance`: Prometheus sets that label to the scrape target itself
  // and would rename ours to exported_instance. This one matches the
  // `instance` of /v1/connections, and changes when the process restarts.
  registry.setDefaultLabels({ gateway_instance: app.registry.instanceId })
  collectDefaultMetrics({ register: registry, prefix: 'sse_gateway_' })
  const eventLoopDelay = replaceEventLoopLagSummary(registry, 'sse_gateway_')
  app.addHook('onClose', async () => {
    eventLoopDelay.disable()
  })

  let deliveredByClosed = 0
  const gauge = <T extends string>(name: string, help: string, collect: (this: Gauge<T>) => void): Gauge<T> =>
    new Gauge<T>({ name, help, registers: [registry], collect })

  gauge('sse_connections', 'Streams open on this instance now', function () {
    this.set(app.registry.size)
  })
  gauge('sse_users', 'Users with a stream open on this instance now', function () {
    this.set(app.registry.userCount)
  })
  gauge('sse_redis_up', '1 when the event store answers (always 1 in embedded mode)', function () {
    this.set(app.bus.isAnswering() ? 1 : 0)
  })
  const bus = app.bus
  if (bus instanceof MemoryBus) {
    gauge('sse_history_bytes', 'Embedded mode: the memory the replay history takes, estimated, with the table of marks it reserves (HISTORY_MAX_BYTES caps it)', function () {
      this.set(bus.historyBytes())
    })
  }
  // Summed at scrape time so delivery itself counts nothing beyond each stream's own tally.
  new Counter({
    name: 'sse_events_delivered_total',
    help: 'Events written to streams (live and replayed)',
    registers: [registry],
    collect () {
      let live = 0
      for (const connection of app.registry.all()) live += connection.eventsSent
      this.reset()
      this.inc(deliveredByClosed + live)
    }
  })
  const opened = new Counter({ name: 'sse_connections_opened_total', help: 'Streams opened', registers: [registry] })
  const closed = new Counter<'reason'>({ name: 'sse_connections_closed_total', help: 'Streams closed, by reason', labelNames: ['reason'], registers: [registry] })
  const slow = new Counter({ name: 'sse_slow_consumer_drops_total', help: 'Streams closed because their unsent bytes passed MAX_BUFFERED_BYTES', registers: [registry] })
  const published = new Counter<'target'>({ name: 'sse_events_published_total', help: 'Events accepted, by target kind', labelNames: ['target'], registers: [registry] })
  const replayed = new Counter({ name: 'sse_events_replayed_total', help: 'Events sent from history to reconnecting streams', registers: [registry] })
  const resets = new Counter<'reason'>({ name: 'sse_replay_resets_total', help: 'Streams sent reset (a cursor that history cannot serve, at open or after a catch-up), by reason', labelNames: ['reason'], registers: [registry] })
  const authFailures = new Counter<'reason'>({ name: 'sse_auth_failures_total', help: 'Rejected authentications, by reason', labelNames: ['reason'], registers: [registry] })
  const ingressRejects = new Counter<'source'>({ name: 'sse_ingress_rejected_total', help: 'Redis ingress messages dropped as invalid', labelNames: ['source'], registers: [registry] })
  const ingressDrops = new Counter<'source'>({ name: 'sse_ingress_dropped_total', help: 'Pub/sub ingress messages dropped unhandled: more were waiting to be published than the bound', labelNames: ['source'], registers: [registry] })
  const cursorsMoved = new Counter({ name: 'sse_cursors_moved_total', help: 'Quiet streams sent an id line alone, which keeps their clients\' cursors inside the history window', registers: [registry] })
  const ingressRepeats = new Counter({ name: 'sse_ingress_repeats_total', help: 'Durable ingress entries handled again after a holder change, found already published and skipped', registers: [registry] })

  app.decorate('metrics', {
    registry,
    authFailure: (reason) => authFailures.inc({ reason }),
    published: (targetKind, count) => published.inc({ target: targetKind }, count),
    ingressRejected: (source) => ingressRejects.inc({ source }),
    ingressRepeated: () => ingressRepeats.inc(),
    ingressDropped: (source) => ingressDrops.inc({ source }),
    streamOpened: () => opened.inc(),
    streamClosed: (connection, reason) => {
      deliveredByClosed += connection.eventsSent
      closed.inc({ reason })
      if (reason === 'slow') slow.inc()
    },
    replayed: (count) => replayed.inc(count),
    reset: (reason) => resets.inc({ reason }),
    cursorsMoved: (count) => cursorsMoved.inc(count)
  } satisfies GatewayMetrics)
}, { name: 'metrics', dependencies: ['registry', 'bus'] })

const LAG_RESOLUTION_MS = 10

/**
 * The lag in a recorded interval (ns): Node's delay histogram records the
 * whole time between two ticks of its sampling timer, the timer's own
 * period included, so an idle loop read 10 ms and an alert on a few
 * milliseconds of lag always fired.
 */
export function lagOfInterval (recordedNs: number, resolutionMs: number): number {
  return Math.max(0, recordedNs - resolutionMs * 1e6)
}

/**
 * prom-client's lag summary (min, max, mean, stddev, percentiles) reads a
 * delay histogram it resets at every scrape: a scrape within its 10 ms
 * resolution of the last one (two Prometheus servers, a person with curl)
 * found it empty and reported a mean of NaN and a min of 9.2e9 s, which an
 * alert on the lag reads as an outage or as nothing. These gauges, of the
 * same names, keep the last values until a scrape finds new samples.
 * Returns the histogram they read, to be disabled with the app.
 */
function replaceEventLoopLagSummary (registry: PromRegistry, prefix: string): IntervalHistogram {
  const histogram = monitorEventLoopDelay({ resolution: LAG_RESOLUTION_MS })
  histogram.enable()
  const lag = (recorded: number): number => lagOfInterval(recorded, LAG_RESOLUTION_MS)
  const readings: Array<[string, string, () => number]> = [
    ['min', 'The minimum recorded event loop delay.', () => lag(histogram.min)],
    ['max', 'The maximum recorded event loop delay.', () => lag(histogram.max)],
    ['mean', 'The mean of the recorded event loop delays.', () => lag(histogram.mean)],
    ['stddev', 'The standard deviation of the recorded event loop delays.', () => histogram.stddev],
    ['p50', 'The 50th percentile of the recorded event loop delays.', () => lag(histogram.percentile(50))],
    ['p90', 'The 90th percentile of the recorded event loop delays.', () => lag(histogram.percentile(90))],
    ['p99', 'The 99th percentile of the recorded event loop delays.', () => lag(histogram.percentile(99))]
  ]
  const gauges: Gauge[] = []
  for (const [name, help] of readings) {
    const fullName = `${prefix}nodejs_eventloop_lag_${name}_seconds`
    registry.removeSingleMetric(fullName)
    gauges.push(new Gauge({
      name: fullName,
      help: `${help} Since the last scrape that found a sample.`,
      registers: [registry],
      // The first gauge's collect runs first in a scrape, and sets them all.
      collect: gauges.length > 0
        ? undefined
        : () => {
            if (histogram.count === 0) return
            readings.forEach(([, , read], index) => gauges[index].set(read() / 1e9))
            histogram.reset()
          }
    }))
  }
  return histogram
}
