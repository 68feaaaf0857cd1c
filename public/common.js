// Helpers shared by the admin and demo pages. Everything that shows data goes
// through textContent: nothing from a token, a server or a user is parsed as HTML.

/** The gateway's root, found from this module's own URL (/assets/common.js → /), so the pages also work under a proxy prefix. */
export const gatewayRoot = new URL('../', import.meta.url)

/** An absolute URL for a gateway path such as `v1/stats`. */
export function gatewayUrl (path, query) {
  const url = new URL(path, gatewayRoot)
  if (query !== undefined) {
    for (const [key, value] of Object.entries(query)) {
      if (value !== undefined && value !== null && value !== '') url.searchParams.set(key, value)
    }
  }
  return url
}

/**
 * Calls a JSON route. Never throws: answers `{ ok, status, body, message }`,
 * with `message` taken from the gateway's `{ statusCode, error, message }` body.
 */
export async function api (path, { token, method = 'GET', body, signal } = {}) {
  const headers = { accept: 'application/json' }
  if (token) headers.authorization = `Bearer ${token}`
  if (body !== undefined) headers['content-type'] = 'application/json'
  let response
  try {
    response = await fetch(gatewayUrl(path), {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      cache: 'no-store',
      signal
    })
  } catch (error) {
    return { ok: false, status: 0, body: null, message: `network error: ${error instanceof Error ? error.message : String(error)}` }
  }
  let parsed = null
  const text = await response.text().catch(() => '')
  if (text !== '') {
    try { parsed = JSON.parse(text) } catch { parsed = text }
  }
  if (response.ok) return { ok: true, status: response.status, body: parsed, headers: response.headers, message: '' }
  return { ok: false, status: response.status, body: parsed, headers: response.headers, message: errorMessage(response, parsed) }
}

function errorMessage (response, body) {
  const reason = body !== null && typeof body === 'object' && typeof body.error === 'string' ? body.error : response.statusText
  const detail = body !== null && typeof body === 'object' && typeof body.message === 'string'
    ? body.message
    : typeof body === 'string' ? body.slice(0, 200) : ''
  return [`${response.status}${reason ? ` ${reason}` : ''}`, detail].filter(Boolean).join(': ')
}

/**
 * Builds an element. `props`: `class`, `text`, `dataset`, `hidden`, `title`,
 * `on` (event listeners), any other key becomes an attribute. Children are
 * nodes or strings (strings become text nodes).
 */
export function h (tag, props = {}, ...children) {
  const element = document.createElement(tag)
  for (const [key, value] of Object.entries(props)) {
    if (value === undefined || value === null || value === false) continue
    if (key === 'class') element.className = value
    else if (key === 'text') element.textContent = String(value)
    else if (key === 'dataset') Object.assign(element.dataset, value)
    else if (key === 'on') for (const [name, listener] of Object.entries(value)) element.addEventListener(name, listener)
    else if (key === 'hidden') element.hidden = Boolean(value)
    else element.setAttribute(key, value === true ? '' : String(value))
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue
    element.append(child instanceof Node ? child : document.createTextNode(String(child)))
  }
  return element
}

export const $ = (selector) => document.querySelector(selector)

/** Sets a status line's text and tone (`ok`, `error`, `warn` or none). */
export function setStatus (element, text, tone) {
  element.textContent = text
  element.classList.remove('ok', 'error', 'warn')
  if (tone) element.classList.add(tone)
}

const pad = (value, width = 2) => String(value).padStart(width, '0')

/** 14:03:07.215 */
export function clockTime (date = new Date()) {
  return `${pad(date.getHours())}:${pad(date.getMinutes())}:${pad(date.getSeconds())}.${pad(date.getMilliseconds(), 3)}`
}

/** "42s", "3m 05s", "2h 10m", "3d 4h" since an ISO date. */
export function age (iso, now = Date.now()) {
  const time = Date.parse(iso)
  if (Number.isNaN(time)) return '–'
  let seconds = Math.max(0, Math.floor((now - time) / 1000))
  if (seconds < 60) return `${seconds}s`
  let minutes = Math.floor(seconds / 60)
  seconds %= 60
  if (minutes < 60) return `${minutes}m ${pad(seconds)}s`
  let hours = Math.floor(minutes / 60)
  minutes %= 60
  if (hours < 24) return `${hours}h ${pad(minutes)}m`
  const days = Math.floor(hours / 24)
  hours %= 24
  return `${days}d ${hours}h`
}

/** sessionStorage that never throws (private modes, disabled storage). */
export const session = {
  get (key) {
    try { return sessionStorage.getItem(key) } catch { return null }
  },
  set (key, value) {
    try { sessionStorage.setItem(key, value) } catch {}
  },
  remove (key) {
    try { sessionStorage.removeItem(key) } catch {}
  }
}

/** The unverified claims of a JWT, for display only (never trusted). */
export function peekClaims (token) {
  try {
    const part = token.split('.')[1]
    const json = atob(part.replace(/-/g, '+').replace(/_/g, '/').padEnd(Math.ceil(part.length / 4) * 4, '='))
    const claims = JSON.parse(decodeURIComponent(Array.from(json, (c) => `%${c.charCodeAt(0).toString(16).padStart(2, '0')}`).join('')))
    return claims !== null && typeof claims === 'object' ? claims : null
  } catch {
    return null
  }
}

export const EVENT_NAME = /^[A-Za-z0-9_.:-]{1,64}$/

/**
 * Pages of one origin tell each other the event names they are about to
 * send: an EventSource delivers only the named events it listens for.
 * (Browsers without BroadcastChannel get a stand-in that does nothing.)
 */
export const eventNames = typeof BroadcastChannel === 'function'
  ? new BroadcastChannel('sse-gateway.event-names')
  : { postMessage () {}, addEventListener () {} }
export const TOPIC_NAME = /^[A-Za-z0-9_.:/-]{1,128}$/

/** "a, b c" → ["a", "b", "c"], without duplicates. */
export function splitList (value) {
  return [...new Set(String(value).split(/[\s,]+/).map((item) => item.trim()).filter(Boolean))]
}
