/**
 * The SSE wire format. An event is rendered once into a "body" (its `event:`
 * and `data:` lines and the blank line that ends it); the `id:` line is put in
 * front when the id is known, and the result is one Buffer shared by every
 * recipient.
 *
 * Streams are written straight to the socket as an HTTP/1.1 chunked body, and
 * every frame is already a complete chunk: any run of frames is a valid body,
 * so one Buffer goes to every recipient as is and several coalesce into one
 * write without re-framing.
 */

export const EVENT_NAME = /^[A-Za-z0-9_.:-]{1,64}$/
export const TOPIC_NAME = /^[A-Za-z0-9_.:/-]{1,128}$/

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
  if (!LINE_BREAK.test(text)) return `${out}data: ${text}\n\n`
  for (const line of text.split(LINE_BREAK)) out += `data: ${line}\n`
  return out + '\n'
}

/** `<size in hex>\r\n<payload>\r\n`, with room for `prefix` written before the payload. */
export function chunkOf (payload: Buffer, prefix: Buffer | null = null): Buffer {
  const length = payload.length + (prefix?.length ?? 0)
  const size = length.toString(16)
  const out = Buffer.allocUnsafe(size.length + length + 4)
  let offset = out.write(size, 0, 'latin1')
  out[offset++] = 13
  out[offset++] = 10
  if (prefix !== null) offset += prefix.copy(out, offset)
  offset += payload.copy(out, offset)
  out[offset++] = 13
  out[offset] = 10
  return out
}

/**
 * `chunkOf` for text, written straight into the chunk: a temporary Buffer of
 * the text, taken from Node's shared pool between two frames, would leave
 * every frame kept in history holding twice its size of pool memory.
 */
export function chunkOfText (text: string, ownMemory = false): Buffer {
  const length = Buffer.byteLength(text)
  const size = length.toString(16)
  const bytes = size.length + length + 4
  const out = ownMemory ? Buffer.allocUnsafeSlow(bytes) : Buffer.allocUnsafe(bytes)
  let offset = out.write(size, 0, 'latin1')
  out[offset++] = 13
  out[offset++] = 10
  offset += out.write(text, offset, 'utf8')
  out[offset++] = 13
  out[offset] = 10
  return out
}

const LF = 0x0a
const CR = 0x0d
const DATA_LINE = Buffer.from('data: ')
const EVENT_LINE = Buffer.from('event: ')

function holdsAt (bytes: Buffer, offset: number, expected: Buffer): boolean {
  if (offset + expected.length > bytes.length) return false
  for (let index = 0; index < expected.length; index++) if (bytes[offset + index] !== expected[index]) return false
  return true
}

/**
 * Whether `bytes` from `start` on is an event body as renderBody writes it:
 * `event:` and `data:` lines, no CR, and one blank line, at the end. Bodies
 * that come from outside the process are checked before they are written
 * to streams as they are: one that is not could end a frame early, glue
 * the next one onto it, or move the browser's cursor with an `id:` line.
 */
export function isEventBody (bytes: Buffer, start: number): boolean {
  const end = bytes.length
  if (end - start < 2 || bytes[end - 1] !== LF || bytes[end - 2] !== LF || bytes.indexOf(CR, start) !== -1) return false
  let line = start
  while (line < end - 1) {
    if (!holdsAt(bytes, line, DATA_LINE) && !holdsAt(bytes, line, EVENT_LINE)) return false
    line = bytes.indexOf(LF, line) + 1
  }
  return true
}

/** The chunk that ends a chunked body. */
export const END_CHUNK = Buffer.from('0\r\n\r\n')

/**
 * An event's frame. `ownMemory` for one kept in history: it stays for as
 * long as its channels keep it, and one sliced from Node's shared pool
 * would keep the whole 8 KB slab alive among frames long dropped.
 */
export function frameWithId (id: number, body: string, ownMemory = false): Buffer {
  return chunkOfText(`id: ${id}\n${body}`, ownMemory)
}

/** System events carry no `id:` line, so they never move the browser's cursor. */
export function systemFrame (event: string, data: unknown): Buffer {
  return chunkOfText(renderBody(event, dataText(data)))
}

export function retryFrame (retryMs: number): Buffer {
  return chunkOfText(`retry: ${retryMs}\n\n`)
}

export const KEEPALIVE_FRAME = chunkOfText(': keepalive\n\n')

/**
 * Status line and headers of a stream response; the body that follows is
 * chunked, or (`chunked` false, for an HTTP/1.0 client) ends with the connection.
 */
export function streamHead (headers: Record<string, string | number | string[]>, chunked = true): Buffer {
  let head = 'HTTP/1.1 200 OK\r\n'
  for (const [name, value] of Object.entries(headers)) {
    for (const item of Array.isArray(value) ? value : [value]) {
      const text = String(item)
      // Header values come from our own config and CORS; never let one split the head.
      if (/[\r\n]/.test(name) || /[\r\n]/.test(text)) continue
      head += `${name}: ${text}\r\n`
    }
  }
  return Buffer.from(`${head}${chunked ? 'transfer-encoding: chunked\r\n' : ''}\r\n`, 'latin1')
}

/**
 * Parses a `Last-Event-ID` cursor; whitespace around it (as String#trim
 * reads it) is not part of it, and anything else but a decimal integer is
 * malformed. One past 2^53 is above every id ever issued (microseconds
 * since 1970 stay below it until the year 2255), so it is read as the
 * largest exact one: a cursor from the future, as any id not yet issued.
 */
export function parseCursor (raw: string | undefined): number | 'malformed' | null {
  const cursor = raw?.trim()
  if (cursor === undefined || cursor === '') return null
  if (!/^\d+$/.test(cursor)) return 'malformed'
  return Math.min(Number(cursor), Number.MAX_SAFE_INTEGER)
}

/** `*` in a topic pattern matches any run of characters; nothing else is special. */
export function topicAllowed (topic: string, patterns: readonly string[] | null): boolean {
  if (patterns === null) return true
  return patterns.some((pattern) => wildcardMatches(pattern, topic))
}

/**
 * Matches without backtracking: the text between stars is found leftmost, in
 * order, which is enough when a star matches anything. (A regular expression
 * made of `.*` runs backtracks exponentially on a topic that almost matches,
 * and the topic is the client's to choose.)
 */
function wildcardMatches (pattern: string, topic: string): boolean {
  const parts = pattern.split('*')
  if (parts.length === 1) return pattern === topic
  const first = parts[0]
  const last = parts[parts.length - 1]
  if (topic.length < first.length + last.length || !topic.startsWith(first) || !topic.endsWith(last)) return false
  const end = topic.length - last.length
  let at = first.length
  for (let index = 1; index < parts.length - 1; index++) {
    const part = parts[index]
    if (part === '') continue
    const found = topic.indexOf(part, at)
    if (found === -1 || found + part.length > end) return false
    at = found + part.length
  }
  return true
}
