import fp from 'fastify-plugin'
import { NonFiniteNumberError, parseJsonFinite } from '../src/core/json'
import { FanoutTooLargeError, isPathId, isPlainObject, validateEventAndData, validatePublishBody, validateSkipHistory, type PublishRequest } from '../src/core/publish'
import type { LeaseFence, PublishItem, PublishOnce } from '../src/core/bus'

/**
 * Redis ingress: `PUBLISH <prefix>publish <json>` takes the body of
 * POST /v1/publish; `PUBLISH stream:<connectionId> {"event","data"}` is what
 * backends written for a per-connection channel already send; `XADD
 * <prefix>ingress * payload <json>` is the durable form of the first. A bad
 * message is counted and logged without its data.
 */
export default fp(async (app) => {
  const { ingress, durableIngress, config, publisher } = app
  if (ingress === null || durableIngress === null) return

  const dropped = { published: Promise.resolve() }
  const reject = (source: string, reason: string): typeof dropped => {
    app.metrics.ingressRejected(source)
    app.log.warn({ source, reason }, 'ingress message dropped')
    return dropped
  }

  // Resolves once the message is handed to Redis (see IngressHandler), with
  // its publication; with `once`, a message published before (by a holder
  // that died before acknowledging it) is not published again. A pub/sub
  // message comes with its lease `fence`; a durable entry needs none, as
  // its key is published once whoever holds it.
  const handle = async (source: { kind: 'publish' | 'durable' } | { kind: 'stream', connectionId: string }, payload: string, guard: { fence: LeaseFence } | { once: PublishOnce }): Promise<{ published: Promise<void> }> => {
    const kind = source.kind
    if (Buffer.byteLength(payload) > config.maxBodyBytes) return reject(kind, 'too large')
    let body: unknown
    try {
      body = parseJsonFinite(payload)
    } catch (error) {
      return reject(kind, error instanceof NonFiniteNumberError ? error.message : 'not JSON')
    }
    let requests: PublishRequest[]
    if (source.kind !== 'stream') {
      const validation = validatePublishBody(body, config.maxEventBytes)
      if (!validation.ok) return reject(kind, validation.message)
      requests = validation.value.items
    } else {
      // The id comes from the channel name: held to the POST's rule for `to.connection`.
      if (!isPathId(source.connectionId)) return reject(kind, 'connection id is not valid')
      if (!isPlainObject(body)) return reject(kind, 'not an object')
      const content = validateEventAndData(body, config.maxEventBytes)
      if (!content.ok) return reject(kind, content.message)
      const transient = validateSkipHistory(body)
      if (!transient.ok) return reject(kind, transient.message)
      requests = [{ target: { kind: 'connection', id: source.connectionId }, event: content.value.event, text: content.value.text, ...transient.value }]
    }
    let items: PublishItem[]
    try {
      items = await publisher.itemsOf(requests)
    } catch (error) {
      if (error instanceof FanoutTooLargeError) return reject(kind, 'fan-out too large (MAX_PUBLISH_CHANNELS)')
      throw error
    }
    const publishing = 'fence' in guard
      ? publisher.publishItems(items, guard.fence).then(() => true)
      : publisher.publishItemsOnce(items, guard.once).then((outcome) => outcome.kind === 'published')
    const published = publishing.then((fresh) => {
      if (fresh) {
        for (const request of requests) app.metrics.published(request.target.kind, 1)
      } else {
        // Normal after a holder dies between publishing and acknowledging;
        // frequent ones point at holders that keep losing the lease.
        app.metrics.ingressRepeated()
        app.log.info({ source: kind, entry: 'once' in guard ? guard.once.key : undefined }, 'ingress entry already published: skipped')
      }
    })
    return { published }
  }
  ingress.onMessage(async (source, payload, fence) => payload === null ? reject(source.kind, 'not UTF-8') : await handle(source, payload, { fence }))
  ingress.onOverflow((source) => app.metrics.ingressDropped(source))
  durableIngress.onDropped(() => app.metrics.ingressRejected('durable'))
  durableIngress.onMessage(async (payload, onceKey) => {
    if (payload === null) {
      reject('durable', 'no payload field')
      return
    }
    // One entry always holds the same payload: the fingerprint never differs.
    const once: PublishOnce = { key: onceKey, fingerprint: 'durable', windowS: config.idempotencyWindowS }
    await (await handle({ kind: 'durable' }, payload, { once })).published
  })
}, { name: 'ingress', dependencies: ['bus', 'streams', 'metrics'] })
