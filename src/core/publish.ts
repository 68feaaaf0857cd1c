import { channel } from './channels'
import type { EventBus, LeaseFence, OnceOutcome, PublishItem, PublishOnce } from './bus'
import { dataText, EVENT_NAME, renderBody, TOPIC_NAME } from './framing'
import type { SharedState } from './state'

export type Target =
  | { kind: 'user', id: string }
  | { kind: 'users', ids: string[] }
  | { kind: 'connection', id: string }
  | { kind: 'conversation', id: string }
  | { kind: 'topic', name: string }
  | { kind: 'broadcast' }

export interface PublishRequest {
  target: Target
  event: string
  /** `data` as written on the wire. */
  text: string
  /**
   * `skipHistory`: delivered live only (PublishItem.transient). Set only
   * when true, so that an idempotency fingerprint of any other request is
   * what it was before the field existed.
   */
  transient?: true
}

/** A refusal is `invalid`, or `tooLarge` when size is its only fault (the routes answer 400 and 413). */
export type Validation<T> = { ok: true, value: T } | { ok: false, fault: 'invalid' | 'tooLarge', message: string }

export const MAX_BATCH = 1000
/** Names the gateway itself sends; a publisher may not forge them. */
export const RESERVED_EVENTS = new Set(['connected', 'reset', 'auth-expired', 'evicted', 'shutdown', 'initial_status'])
/**
 * A browser's EventSource dispatches a message named `error` or `open` to its
 * onerror / onopen, the handlers of its own connection: a page would take
 * such an event for a dropped or reopened stream (and a broadcast of one would
 * make every tab that reconnects on error reconnect at once).
 */
export const BROWSER_EVENTS = new Set(['error', 'open'])
const ITEM_KEYS = new Set(['to', 'event', 'data', 'skipHistory'])
const TARGET_KEYS = ['user', 'users', 'connection', 'conversation', 'topic', 'broadcast'] as const

export const MAX_ID_CHARACTERS = 256
/**
 * Connection, conversation and job ids: what a path segment of their routes
 * takes (src/schemas/common.ts). An event for an id no route can name (a
 * stream opened with it, members set under it) would reach no one.
 */
export const PATH_ID_PATTERN = '^[A-Za-z0-9_.:@=+-]{1,128}$'
const PATH_ID = new RegExp(PATH_ID_PATTERN)
const PATH_ID_RULE = '1-128 characters among letters, digits and _ . : @ = + -'

export function isPathId (value: unknown): value is string {
  return typeof value === 'string' && PATH_ID.test(value)
}

/** What isEntityId asks of an id, as an answer names it. */
const ID_RULE = `a string of 1-${MAX_ID_CHARACTERS} characters of well-formed Unicode, without control characters`

/**
 * User, conversation and connection ids: 1–256 characters, no control
 * characters. Characters are code points, as the route schemas count them
 * (src/schemas/common.ts), so an id one route takes every other takes too.
 */
export function isEntityId (value: unknown): value is string {
  // eslint-disable-next-line no-control-regex
  return typeof value === 'string' && value.length > 0 && !tooManyCharacters(value) && !/[\u0000-\u001f\u007f-\u009f]/.test(value) && !hasLoneSurrogate(value)
}

/** Counted only where UTF-16 units could be astral pairs: ids are short and mostly ASCII. */
export function tooManyCharacters (value: string): boolean {
  if (value.length <= MAX_ID_CHARACTERS) return false
  if (value.length > 2 * MAX_ID_CHARACTERS) return true
  let characters = 0
  for (const _ of value) if (++characters > MAX_ID_CHARACTERS) return true
  return false
}

// A lone surrogate has no UTF-8 form: Redis channel names would turn it into
// U+FFFD, and the stream's channel would never match the published one.
const LONE_SURROGATE = /[\uD800-\uDBFF](?![\uDC00-\uDFFF])|(?<![\uD800-\uDBFF])[\uDC00-\uDFFF]/

export function hasLoneSurrogate (value: string): boolean {
  return LONE_SURROGATE.test(value)
}

/**
 * `data` as it goes on the wire, or null when it cannot be encoded: JSON
 * parses nesting thousands of levels deep, which JSON.stringify then
 * overflows the stack on.
 */
export function encodable (data: unknown): string | null {
  try {
    return dataText(data)
  } catch {
    return null
  }
}

/** A JSON object: not null, not an array. */
export function isPlainObject (value: unknown): value is Record<string, unknown> {
  return typeof value === 'object' && value !== null && !Array.isArray(value)
}

function bad (message: string): Validation<never> {
  return { ok: false, fault: 'invalid', message }
}

export function validateTarget (to: unknown): Validation<Target> {
  if (!isPlainObject(to)) return bad('"to" must be an object naming one target')
  const keys = Object.keys(to)
  const known = keys.filter((key) => (TARGET_KEYS as readonly string[]).includes(key))
  if (keys.length !== 1 || known.length !== 1) {
    return bad(`"to" must have exactly one of ${TARGET_KEYS.join(', ')}`)
  }
  const key = known[0] as typeof TARGET_KEYS[number]
  const value = to[key]
  switch (key) {
    case 'user':
      if (!isEntityId(value)) return bad(`"to.${key}" must be ${ID_RULE}`)
      return { ok: true, value: { kind: key, id: value } }
    case 'connection':
    case 'conversation':
      if (!isPathId(value)) return bad(`"to.${key}" must be ${PATH_ID_RULE}`)
      return { ok: true, value: { kind: key, id: value } }
    case 'users': {
      if (!Array.isArray(value) || value.length < 1 || value.length > 1000) return bad('"to.users" must be an array of 1 to 1000 user ids')
      if (!value.every(isEntityId)) return bad(`"to.users" must hold only ids, each ${ID_RULE}`)
      return { ok: true, value: { kind: 'users', ids: [...new Set(value)] } }
    }
    case 'topic':
      if (typeof value !== 'string' || !TOPIC_NAME.test(value)) return bad('"to.topic" must be 1-128 characters of A-Z a-z 0-9 _ . : / -')
      return { ok: true, value: { kind: 'topic', name: value } }
    case 'broadcast':
      if (value !== true) return bad('"to.broadcast" must be true')
      return { ok: true, value: { kind: 'broadcast' } }
  }
}

export function validateEventName (event: unknown): Validation<string> {
  if (event === undefined) return { ok: true, value: 'message' }
  if (typeof event !== 'string' || !EVENT_NAME.test(event)) {
    return bad('"event" must be 1-64 characters of A-Z a-z 0-9 _ . : -')
  }
  if (RESERVED_EVENTS.has(event)) return bad(`"event" ${event} is reserved for the gateway`)
  if (BROWSER_EVENTS.has(event)) return bad(`"event" ${event} is the name of EventSource's own ${event} event: browsers would fire on${event} with it`)
  return { ok: true, value: event }
}

/** An event's name and data, as every way of publishing takes them: the data encoded once, within `maxEventBytes`. */
export function validateEventAndData (raw: Record<string, unknown>, maxEventBytes: number): Validation<{ event: string, text: string }> {
  const event = validateEventName(raw.event)
  if (!event.ok) return event
  if (raw.data === undefined) return bad('"data" is required')
  const text = encodable(raw.data)
  if (text === null) return bad('"data" is nested too deeply to encode')
  const bytes = Buffer.byteLength(text)
  if (bytes > maxEventBytes) {
    return { ok: false, fault: 'tooLarge', message: `"data" is ${bytes} bytes, more than the ${maxEventBytes} allowed` }
  }
  return { ok: true, value: { event: event.value, text } }
}

export function validatePublishItem (raw: unknown, maxEventBytes: number): Validation<PublishRequest> {
  if (!isPlainObject(raw)) return bad('an event must be an object with "to" and "data"')
  for (const key of Object.keys(raw)) {
    if (!ITEM_KEYS.has(key)) return bad(`unknown field "${key.slice(0, 40)}"`)
  }
  const target = validateTarget(raw.to)
  if (!target.ok) return target
  const transient = validateSkipHistory(raw)
  if (!transient.ok) return transient
  const content = validateEventAndData(raw, maxEventBytes)
  if (!content.ok) return content
  return { ok: true, value: { target: target.value, event: content.value.event, text: content.value.text, ...transient.value } }
}

/** `skipHistory` of an event, as every way of publishing takes it: what the request then holds (PublishRequest.transient). */
export function validateSkipHistory (raw: Record<string, unknown>): Validation<{ transient?: true }> {
  if (raw.skipHistory === undefined || raw.skipHistory === false) return { ok: true, value: {} }
  if (raw.skipHistory === true) return { ok: true, value: { transient: true } }
  return bad('"skipHistory" must be true or false')
}

/** One event or an array of 1–1000, all-or-nothing; errors name the failing index. */
export function validatePublishBody (body: unknown, maxEventBytes: number): Validation<{ items: PublishRequest[], batch: boolean }> {
  if (!Array.isArray(body)) {
    const item = validatePublishItem(body, maxEventBytes)
    return item.ok ? { ok: true, value: { items: [item.value], batch: false } } : item
  }
  if (body.length < 1 || body.length > MAX_BATCH) return bad(`an array must hold 1 to ${MAX_BATCH} events, got ${body.length}`)
  const items: PublishRequest[] = []
  let tooLarge: Validation<never> | null = null
  for (let index = 0; index < body.length; index++) {
    const item = validatePublishItem(body[index], maxEventBytes)
    if (item.ok) {
      items.push(item.value)
      continue
    }
    const failure = { ok: false as const, fault: item.fault, message: `item ${index}: ${item.message}` }
    // An invalid item anywhere makes the batch invalid; too large only when size is the sole fault.
    if (item.fault === 'invalid') return failure
    tooLarge ??= failure
  }
  if (tooLarge !== null) return tooLarge
  return { ok: true, value: { items, batch: true } }
}

/** A publish would write to more channels than one may: its work (history, Redis) is refused, not done. */
export class FanoutTooLargeError extends Error {
  constructor (readonly channels: number, readonly limit: number) {
    super(`the events go to ${channels} channels in all (a user, a topic: 1 each; a conversation: 1 per member), more than the ${limit} one publish may (MAX_PUBLISH_CHANNELS)`)
  }
}

/** Resolves targets to channels and hands events to the bus, in order. */
export class Publisher {
  constructor (
    private readonly bus: EventBus,
    private readonly state: SharedState,
    private readonly maxChannels = Number.POSITIVE_INFINITY
  ) {}

  async publish (requests: PublishRequest[]): Promise<number[]> {
    return await this.publishItems(await this.itemsOf(requests))
  }

  /**
   * What `requests` publish, their targets resolved to channels (a
   * conversation reads its members). Each channel of each event costs a
   * history append, in Redis inside one script that holds every other
   * client up: past `maxChannels` in all, FanoutTooLargeError.
   */
  async itemsOf (requests: PublishRequest[]): Promise<PublishItem[]> {
    const items: PublishItem[] = []
    let channelCount = 0
    for (const request of requests) {
      const channels = await this.channelsOf(request.target)
      channelCount += channels.length
      if (channelCount > this.maxChannels) throw new FanoutTooLargeError(channelCount, this.maxChannels)
      const body = renderBody(request.event, request.text)
      items.push(request.transient === true ? { channels, body, transient: true } : { channels, body })
    }
    return items
  }

  /** `publishItems`, at most once per `once.key` within its window. */
  async publishItemsOnce (items: PublishItem[], once: PublishOnce): Promise<OnceOutcome> {
    return await this.bus.publishOnce(items, once)
  }

  /** What a `publishItemsOnce` with `once` answered within its window, or null when its key is unused. */
  async usedOnce (once: PublishOnce): Promise<OnceOutcome | null> {
    return await this.bus.usedOnce(once)
  }

  /** Hands `items` to the bus at once (their ids follow this call's order); resolves with the ids. See EventBus.publish for `fence`. */
  async publishItems (items: PublishItem[], fence?: LeaseFence): Promise<number[]> {
    return await this.bus.publish(items, fence)
  }

  /**
   * Publishes an event the gateway itself emits (presence, for example),
   * under the same bound as a publish: a user of huge conversations going
   * online and offline would otherwise write that many history entries each
   * time, with no role needed, pushing other users' replay history out.
   */
  async emit (channels: string[], event: string, data: unknown): Promise<number> {
    if (channels.length > this.maxChannels) throw new FanoutTooLargeError(channels.length, this.maxChannels)
    const [id] = await this.bus.publish([{ channels, body: renderBody(event, dataText(data)) }])
    return id
  }

  private async channelsOf (target: Target): Promise<string[]> {
    switch (target.kind) {
      case 'user': return [channel.user(target.id)]
      case 'users': return target.ids.map(channel.user)
      case 'connection': return [channel.connection(target.id)]
      case 'topic': return [channel.topic(target.name)]
      case 'broadcast': return [channel.broadcast]
      // Expanded to members now: membership changes apply at once, and replay
      // never shows a newcomer what was said before it joined.
      case 'conversation': return (await this.state.members(target.id)).map(channel.user)
    }
  }
}
