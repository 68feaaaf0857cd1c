// The admin dashboard: live connections and topics (polled every 2 s, less
// often in a big cluster or a hidden tab) and a form that publishes an event
// to a user, a topic or everyone.
import { $, age, api, clockTime, EVENT_NAME, eventNames, h, peekClaims, session, setStatus, splitList } from './common.js'

const TOKEN_KEY = 'sse-gateway.admin-token'
const REFRESH_MS = 2000
// The gateway reads every stream of the cluster at each refresh, even to send
// a few: a big cluster is read less often, and a tab nobody looks at rarely.
const STREAMS_PER_REFRESH_STEP = 5000
const HIDDEN_REFRESH_MS = 30_000
// A table a person reads; the filter goes to the gateway, so it finds the rest.
const SHOWN_STREAMS = 500
const FILTER_DELAY_MS = 250

function nextRefreshMs () {
  if (document.hidden) return HIDDEN_REFRESH_MS
  return REFRESH_MS * Math.max(1, Math.ceil(clusterStreams / STREAMS_PER_REFRESH_STEP))
}

const tokenInput = $('#token')
const authStatus = $('#auth-status')
const connectButton = $('#connect')
const connectionsBody = $('#connections tbody')
const topicsBody = $('#topics tbody')
const filterInput = $('#filter')
const sendForm = $('#send')
const sendResult = $('#send-result')
const kindSelect = $('#target-kind')
const targetInput = $('#target')
const targetLabel = $('#target-label')
const eventInput = $('#event')
const dataInput = $('#data')

let token = ''
let timer = null
/** Bumped on every (re)start and stop, so a late answer of an older poll is ignored. */
let generation = 0
let lastConnections = []
/** How many streams match the filter the last listing was asked with, beyond the ones shown. */
let matchingStreams = 0
let clusterStreams = 0
/** The filter changed while a refresh was running: one more as soon as it ends. */
let refreshAgain = false
let filterTimer = null

// ---------------------------------------------------------------- polling

function stop () {
  generation += 1
  clearTimeout(timer)
  timer = null
  connectButton.textContent = 'Connect'
}

function start (newToken) {
  stop()
  token = newToken
  refreshAgain = false
  connectButton.textContent = 'Reconnect'
  const claims = peekClaims(token)
  const who = claims !== null && (typeof claims.sub === 'string' || typeof claims.sub === 'number') ? ` as ${claims.sub}` : ''
  setStatus(authStatus, `Loading${who}…`)
  void refresh(generation)
}

async function refresh (current) {
  // Null while a refresh runs: only a waiting one is brought forward (see visibilitychange).
  timer = null
  // Cut by characters, as the gateway counts them: a cut through a surrogate
  // pair would make encodeURIComponent throw, and no refresh would follow.
  const search = Array.from(filterInput.value.trim()).slice(0, 256).join('')
  const listing = `v1/connections?limit=${SHOWN_STREAMS}${search === '' ? '' : `&q=${encodeURIComponent(search)}`}`
  const [connections, stats] = await Promise.all([api(listing, { token }), api('v1/stats', { token })])
  if (current !== generation) return
  const failed = [connections, stats].find((result) => !result.ok)
  if (failed !== undefined) {
    if (failed.status === 401 || failed.status === 403) {
      stop()
      setStatus(authStatus, `Stopped: ${failed.message}. Paste an admin token and connect again.`, 'error')
      $('#updated').textContent = 'not refreshing'
      return
    }
    setStatus(authStatus, `Refresh failed (${failed.message}); retrying every ${REFRESH_MS / 1000} s.`, 'error')
  } else {
    lastConnections = Array.isArray(connections.body?.connections) ? connections.body.connections : []
    const total = Number(connections.headers.get('x-total-count'))
    matchingStreams = Number.isSafeInteger(total) ? Math.max(total, lastConnections.length) : lastConnections.length
    clusterStreams = typeof stats.body?.connections === 'number' ? stats.body.connections : lastConnections.length
    setStatus(authStatus, `Connected. Refreshing every ${nextRefreshMs() / 1000} s.`, 'ok')
    renderConnections()
    renderStats(stats.body ?? {})
    $('#updated').textContent = `updated ${clockTime().slice(0, 8)}`
  }
  if (current !== generation) return
  const delay = refreshAgain ? 0 : nextRefreshMs()
  refreshAgain = false
  timer = setTimeout(() => { void refresh(current) }, delay)
}

/** A waiting refresh runs now; a running one is followed by another. */
function refreshNow () {
  if (timer === null) {
    refreshAgain = true
    return
  }
  clearTimeout(timer)
  void refresh(generation)
}

// Back in view: fresh figures at once rather than at the hidden tab's next refresh.
document.addEventListener('visibilitychange', () => {
  if (document.hidden || timer === null) return
  refreshNow()
})

// ---------------------------------------------------------------- rendering

const number = (value) => typeof value === 'number' && Number.isFinite(value) ? String(value) : '–'

function renderStats (stats) {
  $('#stat-connections').textContent = number(stats.connections)
  $('#stat-users').textContent = number(stats.users)
  $('#stat-average').textContent = number(stats.averageConnectionsPerUser)
  $('#stat-instances').textContent = number(stats.instances)
  const topics = stats.topics !== null && typeof stats.topics === 'object' ? Object.entries(stats.topics) : []
  topics.sort((a, b) => (b[1] - a[1]) || a[0].localeCompare(b[0]))
  topicsBody.replaceChildren(...topics.map(([name, count]) => h('tr', { 'data-testid': 'topic-row', dataset: { topic: name } },
    h('td', {}, h('button', { type: 'button', class: 'link mono', title: 'Send to this topic', text: name, on: { click: () => target('topic', name) } })),
    h('td', { class: 'num', text: number(count) })
  )))
  $('#topics-count').textContent = topics.length > 0 ? `(${topics.length})` : ''
  $('#topics-empty').hidden = topics.length > 0
}

function renderConnections () {
  const query = filterInput.value.trim().toLowerCase()
  const now = Date.now()
  const rows = lastConnections
    .filter((connection) => query === '' || [connection.userId, connection.connectionId, connection.instance, ...(connection.topics ?? [])]
      .some((value) => String(value ?? '').toLowerCase().includes(query)))
    .sort((a, b) => String(b.openedAt).localeCompare(String(a.openedAt)))
  connectionsBody.replaceChildren(...rows.map((connection) => {
    const topics = Array.isArray(connection.topics) ? connection.topics : []
    return h('tr', { 'data-testid': 'connection-row', dataset: { connectionId: String(connection.connectionId), userId: String(connection.userId) } },
      h('td', {}, h('button', { type: 'button', class: 'link', title: 'Send to this user', text: connection.userId, on: { click: () => target('user', String(connection.userId)) } })),
      h('td', {}, h('button', { type: 'button', class: 'link mono', title: 'Send to this stream only', text: connection.connectionId, on: { click: () => target('connection', String(connection.connectionId)) } })),
      h('td', {}, topics.length === 0
        ? h('span', { class: 'hint', text: '—' })
        : h('ul', { class: 'chips' }, topics.map((topic) => h('li', { class: 'chip fixed' }, h('span', { text: topic }))))),
      h('td', { class: 'nowrap', title: String(connection.openedAt), text: age(connection.openedAt, now) }),
      h('td', { class: 'mono', text: connection.instance })
    )
  }))
  // Rows are filtered here too, so the table follows typing before the gateway answers.
  const total = Math.max(matchingStreams, lastConnections.length)
  $('#connections-count').textContent = total === 0
    ? ''
    : rows.length === total ? `(${total})` : `(${rows.length === lastConnections.length ? 'newest ' : ''}${rows.length} of ${total})`
  const empty = $('#connections-empty')
  empty.hidden = rows.length > 0
  empty.textContent = total > 0 || clusterStreams > 0 ? 'No stream matches the filter.' : 'No open streams.'
}

// ---------------------------------------------------------------- send form

const TARGETS = {
  user: { label: 'User id', placeholder: 'u1' },
  users: { label: 'User ids', placeholder: 'u1, u2, u3' },
  topic: { label: 'Topic', placeholder: 'news' },
  connection: { label: 'Connection id', placeholder: 'c_…' },
  conversation: { label: 'Conversation id', placeholder: 'c1' },
  broadcast: { label: 'Every open stream', placeholder: 'no target needed' }
}

function syncTarget () {
  const kind = kindSelect.value
  const info = TARGETS[kind] ?? TARGETS.user
  targetLabel.textContent = info.label
  targetInput.placeholder = info.placeholder
  targetInput.disabled = kind === 'broadcast'
}

function target (kind, value) {
  kindSelect.value = kind
  syncTarget()
  targetInput.value = value
  targetInput.focus()
}

function destination (kind, value) {
  switch (kind) {
    case 'broadcast': return { broadcast: true }
    case 'users': {
      const users = splitList(value)
      return users.length > 0 ? { users } : null
    }
    default: return value === '' ? null : { [kind]: value }
  }
}

async function send () {
  if (token === '') {
    setStatus(sendResult, 'Connect with an admin token first.', 'error')
    tokenInput.focus()
    return
  }
  const kind = kindSelect.value
  const to = destination(kind, targetInput.value.trim())
  if (to === null) {
    setStatus(sendResult, `Enter a ${TARGETS[kind].label.toLowerCase()}.`, 'error')
    targetInput.focus()
    return
  }
  const event = eventInput.value.trim()
  if (event !== '' && !EVENT_NAME.test(event)) {
    setStatus(sendResult, 'An event name is 1–64 characters of A–Z a–z 0–9 _ . : -', 'error')
    eventInput.focus()
    return
  }
  const raw = dataInput.value
  let data
  let asString = false
  try {
    data = JSON.parse(raw)
  } catch {
    data = raw
    asString = true
  }
  const body = { to, data, ...(event !== '' ? { event } : {}) }
  // Before the publish: a /demo page of this origin starts listening for the
  // name ahead of the event itself.
  if (event !== '') eventNames.postMessage({ event })
  const button = $('#send-button')
  button.disabled = true
  setStatus(sendResult, 'Sending…')
  const result = await api('v1/publish', { token, method: 'POST', body })
  button.disabled = false
  if (result.ok) {
    const id = result.body?.id ?? '?'
    const where = kind === 'broadcast' ? 'everyone' : `${kind} ${targetInput.value.trim()}`
    setStatus(sendResult, `Sent ${event || 'message'} to ${where}: id ${id}${asString ? ' (data sent as a string)' : ''} at ${clockTime().slice(0, 8)}.`, 'ok')
    sendResult.dataset.id = String(id)
    if (timer !== null) { stop(); start(token) } // show the effect (e.g. new topics) without waiting
  } else {
    delete sendResult.dataset.id
    setStatus(sendResult, `Not sent: ${result.message}`, 'error')
    if ((result.status === 401 || result.status === 403) && timer === null) setStatus(authStatus, result.message, 'error')
  }
}

// ---------------------------------------------------------------- wiring

$('#auth').addEventListener('submit', (event) => {
  event.preventDefault()
  const value = tokenInput.value.trim()
  if (value === '') return
  session.set(TOKEN_KEY, value)
  start(value)
})

$('#forget').addEventListener('click', () => {
  stop()
  token = ''
  session.remove(TOKEN_KEY)
  tokenInput.value = ''
  setStatus(authStatus, 'Token forgotten. Paste an admin token to load the dashboard.')
  $('#updated').textContent = 'not loaded'
  tokenInput.focus()
})

sendForm.addEventListener('submit', (event) => {
  event.preventDefault()
  void send()
})
dataInput.addEventListener('keydown', (event) => {
  if (event.key === 'Enter' && (event.ctrlKey || event.metaKey)) {
    event.preventDefault()
    sendForm.requestSubmit()
  }
})
kindSelect.addEventListener('change', syncTarget)
filterInput.addEventListener('input', () => {
  renderConnections()
  clearTimeout(filterTimer)
  filterTimer = setTimeout(refreshNow, FILTER_DELAY_MS)
})

syncTarget()
const saved = session.get(TOKEN_KEY)
if (saved) {
  tokenInput.value = saved
  start(saved)
}
