// The demo client: a native EventSource on /v1/stream?token=…&topics=…, each
// event shown as it arrives, topics changed on the live stream.
import { $, api, clockTime, EVENT_NAME, eventNames, gatewayUrl, h, peekClaims, session, setStatus, splitList, TOPIC_NAME } from './common.js'

const TOKEN_KEY = 'sse-gateway.user-token'
const TOPICS_KEY = 'sse-gateway.demo-topics'
const LISTEN_KEY = 'sse-gateway.demo-listen'
const MAX_EVENTS = 500

/**
 * Named events a browser must ask for; unnamed ones arrive as `message`.
 * The names the systems this gateway replaces send (chat, notifications,
 * topics, blog generation). `job_update` is not among them: it comes on job
 * streams, never on this one.
 */
const DEFAULT_EVENTS = [
  'message', 'notification', 'announcement', 'message:new', 'message:updated', 'message:deleted',
  'message:delivered', 'message:read', 'conversation:updated',
  'user:online', 'user:offline', 'user:typing', 'user-update', 'content-chunk',
  'system-alert', 'maintenance', 'maintenance-alert', 'job-completed', 'job-failed',
  'newEvent', 'eventUpdate', 'newPost'
]
/** Sent by the gateway itself, without an id. */
const SYSTEM_EVENTS = ['connected', 'reset', 'auth-expired', 'shutdown', 'evicted']

const tokenInput = $('#token')
const topicsInput = $('#topics')
const connectButton = $('#connect')
const disconnectButton = $('#disconnect')
const stateBadge = $('#state')
const eventsList = $('#events')
const topicInput = $('#topic')
const subResult = $('#sub-result')
const listenInput = $('#listen-name')
const listenResult = $('#listen-result')

/** The open EventSource, or null. */
let source = null
let token = ''
let connectionId = null
let eventCount = 0
/** Topics this page wants on its stream, re-applied when a reconnect gives a new connection. */
const wanted = new Set()
/** Topics this page left; a reconnect's URL would bring them back. */
const left = new Set()
const customEvents = new Set(readCustomEvents())

// ---------------------------------------------------------------- state and notices

function setState (state, label = state) {
  stateBadge.dataset.state = state
  stateBadge.textContent = label
  const active = state === 'open' || state === 'connecting'
  disconnectButton.disabled = !active
  connectButton.textContent = active ? 'Reconnect' : 'Connect'
}

let noticeKind = null
function notice (text, kind, tone = 'warn') {
  noticeKind = kind
  $('#notice-text').textContent = text
  $('#notice').classList.toggle('error', tone === 'error')
  $('#notice').dataset.kind = kind
  $('#notice').hidden = false
}
function clearNotice () {
  noticeKind = null
  $('#notice').hidden = true
}

// ---------------------------------------------------------------- the event list

function pretty (data) {
  try {
    return JSON.stringify(JSON.parse(data), null, 2)
  } catch {
    return data
  }
}

function showEvent (name, id, data, tone) {
  const system = SYSTEM_EVENTS.includes(name)
  eventCount += 1
  const item = h('li', { class: ['event', system ? 'system' : '', tone ?? ''].filter(Boolean).join(' '), 'data-testid': 'event', dataset: { event: name, ...(id ? { id } : {}) } },
    h('div', { class: 'event-head' },
      h('span', { class: 'event-name', text: name }),
      id ? h('span', { class: 'event-id', title: 'event id (Last-Event-ID)', text: `id ${id}` }) : h('span', { class: 'event-id', text: system ? 'system event' : 'no id' }),
      h('time', { class: 'event-time', datetime: new Date().toISOString(), text: clockTime() })
    ),
    h('pre', { class: 'event-data', text: pretty(data) })
  )
  eventsList.prepend(item)
  while (eventsList.childElementCount > MAX_EVENTS) eventsList.lastElementChild.remove()
  $('#event-count').textContent = `(${eventCount})`
  $('#events-empty').hidden = true
}

function clearEvents () {
  eventsList.replaceChildren()
  eventCount = 0
  $('#event-count').textContent = ''
  $('#events-empty').hidden = false
}

// ---------------------------------------------------------------- the stream

function onNamedEvent (event) {
  if (event.currentTarget !== source) return
  showEvent(event.type, event.lastEventId, event.data)
  if (event.lastEventId) $('#last-id').textContent = event.lastEventId
}

function parse (data) {
  try {
    const value = JSON.parse(data)
    return value !== null && typeof value === 'object' ? value : {}
  } catch {
    return {}
  }
}

const systemHandlers = {
  connected (data, es) {
    const previous = connectionId
    connectionId = typeof data.connectionId === 'string' ? data.connectionId : null
    $('#connection-id').textContent = connectionId ?? '–'
    $('#user-id').textContent = data.userId !== undefined ? String(data.userId) : '–'
    const topics = Array.isArray(data.topics) ? data.topics.map(String) : []
    renderTopics(topics)
    setState('open')
    if (noticeKind === 'shutdown') notice(`Reconnected after the gateway closed the stream (connection ${connectionId ?? '?'}).`, 'reconnected')
    // A reconnect without a connection id in the URL gets a new stream: put back the topics changed on the old one.
    if (previous !== null && previous !== connectionId) void reconcile(topics, es)
  },
  reset (data) {
    const reason = typeof data.reason === 'string' ? data.reason : 'unknown reason'
    notice(`Reset: the gateway could not replay what this page missed (${reason}). A real client now reloads its state from its backend.`, 'reset')
  },
  'auth-expired' (_data, es) {
    es.close()
    setState('error', 'token expired')
    notice('The token expired and the gateway closed the stream. Paste a fresh token and connect again.', 'auth-expired', 'error')
  },
  shutdown () {
    notice('The gateway is shutting down this stream. The browser reconnects by itself and replays what it missed on the topics it connected with; topics changed since are subscribed again, without what they published meanwhile (a per-stream subscription ends with its stream).', 'shutdown')
  },
  evicted (data, es) {
    es.close()
    setState('closed', 'evicted')
    const reason = typeof data.reason === 'string' ? data.reason : 'no reason given'
    notice(`The gateway closed this stream (${reason}). It does not reconnect by itself, so it cannot evict another tab in turn; connect again to take it back.`, 'evicted', 'error')
  }
}

function connect () {
  const value = tokenInput.value.trim()
  if (value === '') {
    tokenInput.focus()
    return
  }
  const topics = splitList(topicsInput.value)
  const bad = topics.find((topic) => !TOPIC_NAME.test(topic))
  if (bad !== undefined) {
    notice(`"${bad}" is not a topic name: 1–128 characters of A–Z a–z 0–9 _ . : / -`, 'input', 'error')
    return
  }
  disconnect('connecting')
  clearNotice()
  token = value
  session.set(TOKEN_KEY, token)
  session.set(TOPICS_KEY, topics.join(', '))
  wanted.clear()
  left.clear()
  for (const topic of topics) wanted.add(topic)
  setStatus(subResult, '')

  const url = gatewayUrl('v1/stream', { token, topics: topics.join(',') })
  const es = new EventSource(url)
  source = es
  setState('connecting')
  es.addEventListener('open', () => { if (es === source) setState('open') })
  es.addEventListener('error', () => {
    if (es !== source) return
    if (es.readyState === EventSource.CLOSED) {
      setState('error')
      void diagnose(url)
    } else {
      setState('connecting', 'reconnecting')
    }
  })
  for (const [name, handler] of Object.entries(systemHandlers)) {
    es.addEventListener(name, (event) => {
      if (es !== source) return
      showEvent(name, '', event.data, name === 'connected' ? undefined : 'warn')
      handler(parse(event.data), es)
    })
  }
  for (const name of listenedEvents()) es.addEventListener(name, onNamedEvent)
}

/** EventSource hides why it gave up; ask the same URL once to show the gateway's answer. */
async function diagnose (url) {
  const claims = peekClaims(token)
  if (claims !== null && typeof claims.exp === 'number' && claims.exp * 1000 <= Date.now()) {
    notice('The token has expired. Paste a fresh token and connect again.', 'error', 'error')
    return
  }
  const controller = new AbortController()
  try {
    const response = await fetch(url, { signal: controller.signal, cache: 'no-store' })
    if (response.ok) {
      controller.abort()
      notice('The stream failed but the gateway accepts it now: connect again.', 'error', 'error')
      return
    }
    const body = await response.json().catch(() => null)
    const message = body !== null && typeof body.message === 'string' ? body.message : response.statusText
    notice(`The gateway refused the stream: ${response.status} ${message}`, 'error', 'error')
  } catch (error) {
    controller.abort()
    notice(`The gateway cannot be reached (${error instanceof Error ? error.message : String(error)}).`, 'error', 'error')
  }
}

function disconnect (state = 'closed') {
  if (source !== null) source.close()
  source = null
  connectionId = null
  $('#connection-id').textContent = '–'
  if (state !== 'connecting') setState(state)
}

// ---------------------------------------------------------------- topics

function renderTopics (topics) {
  $('#current-topics').replaceChildren(...[...topics].sort().map((topic) => h('li', { class: 'chip', dataset: { topic } },
    h('span', { text: topic }),
    h('button', { type: 'button', title: `Unsubscribe from ${topic}`, 'aria-label': `Unsubscribe from ${topic}`, text: '×', on: { click: () => { void change([topic], false) } } })
  )))
}

async function change (topics, add) {
  if (source === null || connectionId === null) {
    setStatus(subResult, 'Connect first: topics are changed on the open stream.', 'error')
    return false
  }
  const bad = topics.find((topic) => !TOPIC_NAME.test(topic))
  if (bad !== undefined) {
    setStatus(subResult, `"${bad}" is not a topic name: 1–128 characters of A–Z a–z 0–9 _ . : / -`, 'error')
    return false
  }
  const result = await api('v1/subscriptions', { token, method: add ? 'POST' : 'DELETE', body: { topics, connectionId } })
  if (!result.ok) {
    setStatus(subResult, `${add ? 'Subscribe' : 'Unsubscribe'} failed: ${result.message}`, 'error')
    return false
  }
  for (const topic of topics) {
    if (add) { wanted.add(topic); left.delete(topic) } else { wanted.delete(topic); left.add(topic) }
  }
  renderTopics(Array.isArray(result.body?.topics) ? result.body.topics : [])
  setStatus(subResult, `${add ? 'Subscribed to' : 'Unsubscribed from'} ${topics.join(', ')}.`, 'ok')
  return true
}

async function reconcile (current, es) {
  const missing = [...wanted].filter((topic) => !current.includes(topic))
  const extra = current.filter((topic) => left.has(topic))
  if (missing.length > 0 && es === source) await change(missing, true)
  if (extra.length > 0 && es === source) await change(extra, false)
}

// ---------------------------------------------------------------- listeners

function readCustomEvents () {
  try {
    const saved = JSON.parse(session.get(LISTEN_KEY) ?? '[]')
    return Array.isArray(saved) ? saved.filter((name) => typeof name === 'string' && EVENT_NAME.test(name)) : []
  } catch {
    return []
  }
}

function listenedEvents () {
  return [...DEFAULT_EVENTS, ...[...customEvents].filter((name) => !DEFAULT_EVENTS.includes(name))]
}

function renderListening () {
  $('#listening').replaceChildren(...listenedEvents().map((name) => {
    const custom = customEvents.has(name) && !DEFAULT_EVENTS.includes(name)
    return h('li', { class: custom ? 'chip' : 'chip fixed', dataset: { event: name } },
      h('span', { text: name }),
      custom
        ? h('button', { type: 'button', title: `Stop listening for ${name}`, 'aria-label': `Stop listening for ${name}`, text: '×', on: { click: () => removeListener(name) } })
        : null
    )
  }))
  session.set(LISTEN_KEY, JSON.stringify([...customEvents]))
}

function addListener (name, from) {
  if (!EVENT_NAME.test(name)) {
    setStatus(listenResult, 'An event name is 1–64 characters of A–Z a–z 0–9 _ . : -', 'error')
    return
  }
  if (SYSTEM_EVENTS.includes(name) || name === 'error' || name === 'open') {
    setStatus(listenResult, `${name} is handled by the page already.`, 'warn')
    return
  }
  if (listenedEvents().includes(name)) {
    setStatus(listenResult, `Already listening for ${name}.`, 'warn')
    return
  }
  customEvents.add(name)
  if (source !== null) source.addEventListener(name, onNamedEvent)
  renderListening()
  setStatus(listenResult, `Listening for ${name}${from !== undefined ? ` (sent from ${from})` : ''}.`, 'ok')
}

function removeListener (name) {
  customEvents.delete(name)
  if (source !== null) source.removeEventListener(name, onNamedEvent)
  renderListening()
  setStatus(listenResult, `Stopped listening for ${name}.`)
}

// ---------------------------------------------------------------- wiring

$('#open').addEventListener('submit', (event) => {
  event.preventDefault()
  connect()
})
disconnectButton.addEventListener('click', () => {
  disconnect('closed')
  setStatus(subResult, '')
})
$('#subscribe-form').addEventListener('submit', (event) => {
  event.preventDefault()
  const topics = splitList(topicInput.value)
  if (topics.length === 0) return
  void change(topics, true).then((ok) => { if (ok) topicInput.value = '' })
})
$('#unsubscribe').addEventListener('click', () => {
  const topics = splitList(topicInput.value)
  if (topics.length === 0) return
  void change(topics, false).then((ok) => { if (ok) topicInput.value = '' })
})
$('#listen-form').addEventListener('submit', (event) => {
  event.preventDefault()
  const name = listenInput.value.trim()
  if (name === '') return
  addListener(name)
  listenInput.value = ''
})
$('#clear').addEventListener('click', clearEvents)
// A name /admin is about to send (same origin only): listened for from now on.
eventNames.addEventListener('message', (message) => {
  const name = message.data?.event
  if (typeof name === 'string' && !listenedEvents().includes(name) && !SYSTEM_EVENTS.includes(name)) addListener(name, 'the dashboard')
})
$('#notice-close').addEventListener('click', clearNotice)
window.addEventListener('pagehide', () => { if (source !== null) source.close() })

renderListening()
renderTopics([])
topicsInput.value = session.get(TOPICS_KEY) ?? ''
const saved = session.get(TOKEN_KEY)
if (saved) {
  tokenInput.value = saved
  connect()
}
