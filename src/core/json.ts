/**
 * JSON.parse reads a number beyond a double's range (`1e400`, 309 digits) as
 * ±Infinity, which JSON.stringify writes as `null`: the event would go out
 * with another value than the one sent. Such a body is refused instead.
 */
export class NonFiniteNumberError extends Error {
  constructor () {
    super('a number beyond the range JSON numbers are read in (such as 1e400)')
  }
}

// A byte-order mark is kept in the text: parseJsonFinite takes one.
const UTF8 = new TextDecoder('utf-8', { fatal: true, ignoreBOM: true })

/**
 * The bytes as text, or null when they are not UTF-8. JSON is UTF-8 (RFC
 * 8259): a stray byte, a surrogate half, an overlong or cut sequence read
 * leniently would become U+FFFD, and two different ids or texts one.
 */
export function utf8OrNull (bytes: Uint8Array): string | null {
  try {
    return UTF8.decode(bytes)
  } catch {
    return null
  }
}

/**
 * Only text with a positive exponent (a long mantissa takes a short one past
 * the range: 1 and 210 zeros, e99) or 309 digits in a row can hold one: the
 * walk is for those.
 */
const MAY_OVERFLOW = /\d[eE]\+?\d|\d{309}/

/**
 * JSON.parse, throwing NonFiniteNumberError for a number read as ±Infinity.
 * A byte order mark, which some clients write first, is skipped: it is not
 * JSON, but a body or an ingress message that starts with one is meant as JSON.
 */
export function parseJsonFinite (text: string): unknown {
  if (text.charCodeAt(0) === 0xfeff) text = text.slice(1)
  const value: unknown = JSON.parse(text)
  if (MAY_OVERFLOW.test(text) && holdsNonFinite(value)) throw new NonFiniteNumberError()
  return value
}

function holdsNonFinite (root: unknown): boolean {
  // Without recursion: a body may nest as deep as its size allows.
  const pending: unknown[] = [root]
  while (pending.length > 0) {
    const value = pending.pop()
    if (typeof value === 'number') {
      if (!Number.isFinite(value)) return true
    } else if (Array.isArray(value)) {
      for (const item of value) pending.push(item)
    } else if (typeof value === 'object' && value !== null) {
      for (const key in value) pending.push((value as Record<string, unknown>)[key])
    }
  }
  return false
}
