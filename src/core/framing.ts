/**
 * The SSE wire format. An event is rendered once into a "body" (its `event:`
 * and `data:` lines and the blank line that ends it); the `id:` line is put in
 * front when the id is known, and the result is one Buffer shared by every
 * recipient.
 */

export const EVENT_NAME = /^[A-Za-z0-9_.:-]{1,64}$/
export const TOPIC_NAME = /^[A-Za-z0-9_.:/-]{1,128}$/
/** Ids of users, conversations, jobs and connections as they appear in routes. */
export const ENTITY_ID = /^[A-Za-z0-9_.:@|=+-]{1,128}$/

const LINE_BREAK = /\r\n|\r|\n/

/** The bytes `data` takes on the wire: a string as is, anything else as its JSON. */
export function dataText (data: unknown): string {
  return typeof data === 'string' ? data : JSON.stringify(data)
}

/**
 * Renders `event:` and `data:` lines. A string is split on CR, LF and CRLF so a
 * multi-line string arrives intact; JSON never holds a raw line break.
 */
export function renderBody (event: string, text: string): string {
  let out = event === 'message' ? '' : `event: ${event}\n`
  if (typeof text === 'string' && !LINE_BREAK.test(text)) return `${out}data: ${text}\n\n`
  for (const line of text.split(LINE_BREAK)) out += `data: ${line}\n`
  return out + '\n'
}

export function frameWithId (id: number, body: string): Buffer {
  return Buffer.from(`id: ${id}\n${body}`)
}

/** System events carry no `id:` line, so they never move the browser's cursor. */
export function systemFrame (event: string, data: unknown): Buffer {
  return Buffer.from(renderBody(event, dataText(data)))
}

export function retryFrame (retryMs: number): string {
  return `retry: ${retryMs}\n\n`
}

export const KEEPALIVE_FRAME = Buffer.from(': keepalive\n\n')

/** Parses a `Last-Event-ID` cursor; anything but a positive decimal integer is malformed. */
export function parseCursor (raw: string | undefined): number | 'malformed' | null {
  if (raw === undefined || raw === '') return null
  if (!/^\d{1,16}$/.test(raw)) return 'malformed'
  const value = Number(raw)
  return Number.isSafeInteger(value) ? value : 'malformed'
}

/** `*` in a topic pattern matches any run of characters; nothing else is special. */
export function topicAllowed (topic: string, patterns: readonly string[] | null): boolean {
  if (patterns === null) return true
  return patterns.some((pattern) => {
    if (pattern === '*') return true
    if (!pattern.includes('*')) return pattern === topic
    const source = pattern.split('*').map((part) => part.replace(/[.*+?^${}()|[\]\\/]/g, '\\$&')).join('.*')
    return new RegExp(`^${source}$`).test(topic)
  })
}
