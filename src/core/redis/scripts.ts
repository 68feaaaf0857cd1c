/**
 * Lua scripts run inside Redis. Each runs atomically, which is what makes
 * ids, history and fan-out agree across instances: the script that assigns
 * an id also appends the event to every channel's history and PUBLISHes it,
 * so every subscriber connection receives events in id order.
 *
 * Key layout (all under the configured prefix, written `P` here):
 *   P id                 last id issued (microseconds since the epoch, or above)
 *   P epoch              ids below it cannot be served: issued before this store's
 *                        life, or before a restart that may have lost some of them
 *   P run                run_id of the Redis server that last checked the epoch (INIT)
 *   P e:<id>             an event's body, stored once whatever its channel count (TTL = window)
 *   P h:<channel>        sorted set of the channel's event ids, capped at HISTORY_SIZE (TTL = window)
 *   P d:<channel>        highest id trimmed from that history by the size cap (with
 *                        HISTORY_SIZE=0: the channel's latest id, as nothing is kept)
 *   P ch:<channel>       pub/sub channel carrying "<id>\n<body>"
 * Ids are formatted with %.0f: Lua numbers are doubles, exact below 2^53,
 * and microsecond timestamps stay far below it.
 */

/** Redis's clock in microseconds and in milliseconds, and how such numbers are written as strings. */
const CLOCK = `
local function clock_us()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end

local function clock_ms()
  return math.floor(clock_us() / 1000)
end

local function fmt(n)
  return string.format('%.0f', n)
end
`

/** Shared by every script that publishes: assigns ids, appends, publishes. */
const PUBLISH_FUNCTIONS = `${CLOCK}
-- Starts a new epoch: no cursor issued before it is served. Every id issued
-- so far is below it (ids follow the clock, and 'now' is later than any
-- issued before a restart), including ones a restarted store no longer has.
local function new_epoch(prefix, last, now)
  local epoch = math.max(last + 1, now)
  redis.call('SET', prefix .. 'id', fmt(epoch))
  redis.call('SET', prefix .. 'epoch', fmt(epoch))
  return epoch
end

-- Starts the id counter and the epoch if the store is new or lost them
-- (emptied, evicted); returns the last id.
local function ensure_epoch(prefix, now)
  local kept = redis.call('MGET', prefix .. 'id', prefix .. 'epoch')
  if not kept[1] then return new_epoch(prefix, 0, now) end
  local last = tonumber(kept[1])
  if not kept[2] then return new_epoch(prefix, last, now) end
  return last
end

-- Publishes one event on its channels; returns its id. A transient one
-- (skipHistory) is only PUBLISHed: no history, and no drop mark, as a cursor
-- below it misses nothing a reconnect would replay.
local function publish_event(prefix, size, ttl_s, last, now, channels, body, transient)
  local id = math.max(last + 1, now)
  local ids = fmt(id)
  if not transient and size > 0 and #channels > 0 then
    redis.call('SET', prefix .. 'e:' .. ids, body, 'EX', ttl_s)
  end
  local message = ids .. '\\n' .. body
  for _, ch in ipairs(channels) do
    if transient then
      -- Nothing kept, and nothing marked.
    elseif size > 0 then
      local hk = prefix .. 'h:' .. ch
      redis.call('ZADD', hk, id, ids)
      local extra = redis.call('ZCARD', hk) - size
      if extra > 0 then
        local dropped = redis.call('ZRANGE', hk, extra - 1, extra - 1)
        redis.call('ZREMRANGEBYRANK', hk, 0, extra - 1)
        redis.call('SET', prefix .. 'd:' .. ch, dropped[1], 'EX', ttl_s)
      end
      redis.call('ZREMRANGEBYSCORE', hk, '-inf', '(' .. fmt(now - ttl_s * 1000000))
      redis.call('EXPIRE', hk, ttl_s)
    else
      -- No history: the event is trimmed as it is published, so a cursor
      -- below it gets 'trimmed' and one at or past it misses nothing here.
      redis.call('SET', prefix .. 'd:' .. ch, ids, 'EX', ttl_s)
    end
    redis.call('PUBLISH', prefix .. 'ch:' .. ch, message)
  end
  return id
end
`

// Publishes the items from ARGV[first] on, each as (its channels as a JSON
// array, prefixed with '!' for a transient event, body); returns their ids. Two arguments per event whatever its
// channel count: a call's argument list is built on the caller's stack, and
// one per channel overflowed it on a batch to a large conversation.
const PUBLISH_ITEMS = `
local function publish_items(prefix, size, ttl_s, first)
  local now = clock_us()
  local last = ensure_epoch(prefix, now)
  local ids = {}
  for i = first, #ARGV, 2 do
    local listed = ARGV[i]
    local transient = string.sub(listed, 1, 1) == '!'
    if transient then listed = string.sub(listed, 2) end
    last = publish_event(prefix, size, ttl_s, last, now, cjson.decode(listed), ARGV[i + 1], transient)
    ids[#ids + 1] = fmt(last)
  end
  redis.call('SET', prefix .. 'id', fmt(last))
  return ids
end
`

/**
 * ARGV: prefix, historySize, historyTtlS, then per event: its channels as
 * a JSON array ('!' before it: a transient event), the body. Returns the ids as strings, in order.
 */
export const PUBLISH = `${PUBLISH_FUNCTIONS}${PUBLISH_ITEMS}
return publish_items(ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), 4)
`

/**
 * ARGV: prefix, historySize, historyTtlS, holder, leaseMs, the message's
 * place among the ingress messages ('' when not known; see LEASE), then the
 * events as for PUBLISH. As PUBLISH while the holder holds the ingress lease;
 * a lease key gone while its holder still acts on it (the store emptied, the
 * key evicted) is taken back. Otherwise publishes nothing and returns
 * { 'not-holder' }: an instance that took the lease meanwhile handles the
 * message too, and it must not be published twice.
 */
export const PUBLISH_AS_HOLDER = `${PUBLISH_FUNCTIONS}${PUBLISH_ITEMS}
local lease = ARGV[1] .. 'leader'
local holder = redis.call('GET', lease)
if not holder then
  redis.call('SET', lease, ARGV[4], 'PX', tonumber(ARGV[5]))
elseif holder ~= ARGV[4] then
  return { 'not-holder' }
end
local ids = publish_items(ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), 7)
-- An unknown place is recorded too: a successor must not take an older one for it.
redis.call('SET', ARGV[1] .. 'ingress-at', ARGV[4] .. '\\n' .. ARGV[6], 'PX', tonumber(ARGV[5]))
return ids
`

// What a key used within its window answers: { 'repeated', its ids... } for
// the same fingerprint, { 'conflict' } for another; nil when it is unused.
const ONCE_SEEN = `
local function once_seen(key, fingerprint)
  local seen = redis.call('GET', key)
  if not seen then return nil end
  local cut = string.find(seen, '|', 1, true)
  if string.sub(seen, 1, cut - 1) ~= fingerprint then return { 'conflict' } end
  local result = { 'repeated' }
  for id in string.gmatch(string.sub(seen, cut + 1), '[^,]+') do result[#result + 1] = id end
  return result
end
`

/**
 * ARGV: prefix, historySize, historyTtlS, key, fingerprint, windowS, then the
 * events as for PUBLISH. Returns { 'published', ids... } and remembers the key
 * for the window; within it, { 'repeated', the first ids... } for the same
 * fingerprint and { 'conflict' } for another, publishing nothing.
 */
export const PUBLISH_ONCE = `${PUBLISH_FUNCTIONS}${PUBLISH_ITEMS}${ONCE_SEEN}
local prefix = ARGV[1]
local key = prefix .. 'once:' .. ARGV[4]
local seen = once_seen(key, ARGV[5])
if seen then return seen end
local ids = publish_items(prefix, tonumber(ARGV[2]), tonumber(ARGV[3]), 7)
redis.call('SET', key, ARGV[5] .. '|' .. table.concat(ids, ','), 'EX', tonumber(ARGV[6]))
table.insert(ids, 1, 'published')
return ids
`

/** ARGV: prefix, key, fingerprint. As PUBLISH_ONCE for a used key, publishing nothing; { 'unused' } otherwise. */
export const ONCE_OUTCOME = `${ONCE_SEEN}
return once_seen(ARGV[1] .. 'once:' .. ARGV[2], ARGV[3]) or { 'unused' }
`

/**
 * ARGV: prefix. Starts the counter and epoch if missing, and a new epoch if
 * the Redis server is not the one that last ran this (restarted, or a
 * replica promoted): its data may be older than what was served, so a
 * cursor from before gets 'reset' rather than a silent gap. Returns the last id.
 */
export const INIT = `${PUBLISH_FUNCTIONS}
local prefix = ARGV[1]
local now = clock_us()
local last = ensure_epoch(prefix, now)
-- A Redis whose ACL refuses the gateway INFO (ioredis accepts that for its
-- own ready check) goes without this check rather than failing every connection.
local info = redis.pcall('INFO', 'server')
local run_id = type(info) == 'string' and string.match(info, 'run_id:(%w+)') or nil
local known = redis.call('GET', prefix .. 'run')
if run_id and known ~= run_id then
  -- No record (a new store, or one from before this check): nothing to compare.
  if known then last = new_epoch(prefix, last, now) end
  redis.call('SET', prefix .. 'run', run_id)
end
return fmt(last)
`

/**
 * ARGV: prefix, channel. Issues an id that no event gets, PUBLISHes it on
 * `channel` (as the id and a newline) and returns it: every event with a lower id was
 * published (and PUBLISHed) before this ran, every later one gets a higher
 * id. A cursor a quiet stream can be moved to (see RedisBus.watermark).
 */
export const WATERMARK = `${PUBLISH_FUNCTIONS}
local prefix = ARGV[1]
local now = clock_us()
local id = math.max(ensure_epoch(prefix, now) + 1, now)
redis.call('SET', prefix .. 'id', fmt(id))
redis.call('PUBLISH', ARGV[2], fmt(id) .. '\\n')
return fmt(id)
`

/**
 * ARGV: prefix, cursor ('' for the whole window), after (the id a window read
 * continues after, else ''), historyTtlS, maxBytes, channels...
 * Returns { 'reset', reason } or { 'ok', next, id1, body1, id2, body2, ... }
 * merged in id order: one page, whose bodies stop once they reach maxBytes
 * (one at least), and which takes at most a bounded number of ids from each
 * channel. A script holds every other client of Redis up while it runs, so
 * a long history is read in pages, each as short as a publish. `next` is ''
 * when nothing follows, else the id to read on after: with a cursor, a read
 * from that id as the cursor (its checks again included: a history trimmed
 * meanwhile gets its reset); for a window, as `after`.
 */
export const REPLAY = `
local prefix = ARGV[1]
local has_cursor = ARGV[2] ~= ''
local after = tonumber(ARGV[2]) or tonumber(ARGV[3]) or 0
local ttl_s = tonumber(ARGV[4])
local max_bytes = tonumber(ARGV[5])
local first = 6
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local cutoff = now - ttl_s * 1000000
if has_cursor then
  local last = tonumber(redis.call('GET', prefix .. 'id') or '-1')
  local epoch = tonumber(redis.call('GET', prefix .. 'epoch') or '-1')
  if last < 0 or epoch < 0 then return { 'reset', 'unknown' } end
  if after > last then return { 'reset', 'future' } end
  if after < epoch then return { 'reset', 'unknown' } end
  -- Trimming first: a caller that knows nothing older than the window can
  -- be missing (a catch-up) reads the window on 'expired', not on 'trimmed'.
  for i = first, #ARGV do
    local dropped = tonumber(redis.call('GET', prefix .. 'd:' .. ARGV[i]) or '0')
    if dropped > after then return { 'reset', 'trimmed' } end
  end
  if after < cutoff then return { 'reset', 'expired' } end
end
local low = '(' .. string.format('%.0f', math.max(after, cutoff - 1))
-- The lowest ids of each channel, a bounded number: past the lowest last id
-- of a channel that had more, another channel's later ids may be missing
-- from the merge, so the page ends there.
local per_channel = math.max(16, math.floor(2048 / math.max(1, #ARGV - first + 1)))
local bound = math.huge
local seen = {}
local ids = {}
for i = first, #ARGV do
  local found = redis.call('ZRANGEBYSCORE', prefix .. 'h:' .. ARGV[i], low, '+inf', 'LIMIT', 0, per_channel)
  if #found == per_channel then bound = math.min(bound, tonumber(found[#found])) end
  for _, id in ipairs(found) do
    if not seen[id] then
      seen[id] = true
      ids[#ids + 1] = tonumber(id)
    end
  end
end
table.sort(ids)
local out = { 'ok', '' }
local bytes = 0
local read_up_to = nil
for _, id in ipairs(ids) do
  if id > bound or bytes >= max_bytes then break end
  local key = string.format('%.0f', id)
  local body = redis.call('GET', prefix .. 'e:' .. key)
  if body then
    out[#out + 1] = key
    out[#out + 1] = body
    bytes = bytes + #body
  elseif has_cursor then
    -- Gone before its window ended (evicted under maxmemory, deleted): a
    -- hole the client must hear of. Not for a window read, which promises nothing.
    return { 'reset', 'trimmed' }
  end
  read_up_to = id
end
if read_up_to ~= nil and (read_up_to ~= ids[#ids] or bound ~= math.huge) then
  out[2] = string.format('%.0f', read_up_to)
end
return out
`

/**
 * Compare-and-set of a job's state with its job_update event, in one step.
 * ARGV: prefix, historySize, historyTtlS, jobId, expectedVersion ('0' if new),
 * stateJson, jobTtlS, channel count, channels..., body.
 * Returns { 'ok', id } or { 'conflict' }.
 */
export const PUT_JOB = `${PUBLISH_FUNCTIONS}
local prefix = ARGV[1]
local size = tonumber(ARGV[2])
local ttl_s = tonumber(ARGV[3])
local key = prefix .. 'job:' .. ARGV[4]
local version = tonumber(redis.call('HGET', key, 'version') or '0')
if version ~= tonumber(ARGV[5]) then return { 'conflict' } end
local n = tonumber(ARGV[8])
local channels = {}
for c = 1, n do channels[c] = ARGV[8 + c] end
local now = clock_us()
local last = ensure_epoch(prefix, now)
local id = publish_event(prefix, size, ttl_s, last, now, channels, ARGV[9 + n])
redis.call('SET', prefix .. 'id', fmt(id))
redis.call('HSET', key, 'json', ARGV[6], 'eventId', fmt(id), 'version', version + 1)
redis.call('EXPIRE', key, tonumber(ARGV[7]))
return { 'ok', fmt(id) }
`

/**
 * Presence helpers: Redis's clock in ms; whether an instance beat within its
 * TTL; a user's members, oldest first; whether any of them holds a stream id.
 *
 * A member is live while its instance beats and lists it. One whose instance
 * stopped beating is only counted as pending: it no longer counts against the
 * user's limit nor as online to a presence query, but the user's going
 * offline is the reaper's to find and announce (REAP), once. Dropping it here
 * would leave the reaper nothing to remove and nobody would tell the user's
 * peers. A member nobody will reap (its instance was forgotten, or lists it no
 * more) is dropped.
 */
const LIVE_MEMBERS = `${CLOCK}
local function beating(prefix, inst, now_ms, inst_ttl)
  local beat = redis.call('ZSCORE', prefix .. 'instances', inst)
  return beat and tonumber(beat) > now_ms - inst_ttl
end
local function holds(members, conn)
  for _, m in ipairs(members) do
    if string.sub(m, -(#conn + 1)) == '|' .. conn then return true end
  end
  return false
end
local function live_members(prefix, uk, now_ms, inst_ttl)
  local members = redis.call('ZRANGE', uk, 0, -1)
  local live = {}
  local pending = 0
  for _, m in ipairs(members) do
    local inst, conn = string.match(m, '^(.-)|(.*)$')
    local beat = inst and redis.call('ZSCORE', prefix .. 'instances', inst)
    if not beat or redis.call('HEXISTS', prefix .. 'i:' .. inst .. ':conns', conn) == 0 then
      redis.call('ZREM', uk, m)
    elseif tonumber(beat) > now_ms - inst_ttl then
      live[#live + 1] = m
    else
      pending = pending + 1
    end
  end
  return live, pending
end
`

/**
 * Admits a stream under the per-user limit, cluster-wide.
 * ARGV: prefix, userId, instance, connectionId, limit, policy,
 * instanceTtlMs, infoJson, reopenTtlS. Returns { admitted(0|1), cameOnline(0|1), evicted member or '', the admission's seq (clock microseconds, or past the last one in P admissions: it orders every admission of the cluster), the last event id issued, then the other instances whose stream of the id it replaced },
 * or { -1 } when the instance is not listed (Redis emptied, or the instance
 * reaped since its last beat): its own streams are not counted then, and it
 * must record them again first.
 * A user's streams are scored by their admission's seq, so the oldest one
 * (evict-oldest) is the one admitted first, whatever the gateways' clocks say.
 */
export const ADMIT = `${LIVE_MEMBERS}
local prefix, user, inst, conn = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
if not redis.call('ZSCORE', prefix .. 'instances', inst) then return { -1 } end
local now_ms = clock_ms()
local uk = prefix .. 'uc:' .. user
local function of_conn(m) return string.sub(m, -(#conn + 1)) == '|' .. conn end
local live, pending = live_members(prefix, uk, now_ms, tonumber(ARGV[7]))
-- A reopened stream id takes its earlier holder's place, wherever that was:
-- the holder does not count against the limit, and a refusal leaves it be.
local others = {}
for _, m in ipairs(live) do
  if not of_conn(m) then others[#others + 1] = m end
end
local evict = ''
if #others >= tonumber(ARGV[5]) then
  if ARGV[6] == 'reject' then return { 0, 0, '' } end
  -- The oldest by admission seq (µs). Earlier versions of the gateway scored
  -- their streams with the open's time in ms: during a rolling upgrade those
  -- scores are read as µs, or every one of them would sort before the rest.
  local oldest_seq = nil
  for _, m in ipairs(others) do
    local s = tonumber(redis.call('ZSCORE', uk, m))
    if s < 1e14 then s = s * 1000 end
    if oldest_seq == nil or s < oldest_seq then
      oldest_seq = s
      evict = m
    end
  end
  redis.call('ZREM', uk, evict)
  local evicted_conn = string.match(evict, '|(.*)$')
  local evicted_inst = string.match(evict, '^(.-)|')
  redis.call('HDEL', prefix .. 'i:' .. evicted_inst .. ':conns', evicted_conn)
  redis.call('EXPIRE', prefix .. 'conn:' .. evicted_conn, tonumber(ARGV[9]))
end
-- The caller tells the holders on other instances to close theirs.
local replaced = 0
local replaced_on = {}
for _, m in ipairs(redis.call('ZRANGE', uk, 0, -1)) do
  if of_conn(m) then
    replaced = replaced + redis.call('ZREM', uk, m)
    local holder = string.sub(m, 1, #m - #conn - 1)
    if holder ~= inst then replaced_on[#replaced_on + 1] = holder end
  end
end
-- A reconnect within the grace cancels it, wherever it started.
local in_grace = redis.call('DEL', prefix .. 'grace:' .. user) + redis.call('ZREM', prefix .. 'graces', user) > 0
-- Its peers were never told it left while a stream it replaces or one of a
-- dead instance not reaped yet was listed.
local was_online = #others > 0 or pending > 0 or replaced > 0 or in_grace
-- Like event ids, clock microseconds unless the last one is ahead: the seq
-- keeps growing when Redis loses its data (a counter would start again
-- below the streams still open).
local seq = math.max(tonumber(redis.call('GET', prefix .. 'admissions') or '0') + 1, clock_us())
redis.call('SET', prefix .. 'admissions', fmt(seq), 'EX', 86400)
redis.call('ZADD', uk, fmt(seq), inst .. '|' .. conn)
redis.call('SET', prefix .. 'conn:' .. conn, user)
redis.call('PERSIST', prefix .. 'ut:' .. user)
redis.call('HSET', prefix .. 'i:' .. inst .. ':conns', conn, ARGV[8])
-- Every event up to the last id issued now predates the stream, which joins its channels after.
local result = { 1, was_online and 0 or 1, evict, seq, redis.call('GET', prefix .. 'id') or '0' }
for _, holder in ipairs(replaced_on) do result[#result + 1] = holder end
return result
`

/**
 * Forgets a closed stream. ARGV: prefix, userId, instance, connectionId,
 * reopenTtlS, instanceTtlMs, graceMs, graceToken.
 * Returns 1 when it was the user's last stream (a grace period starts), else 0.
 * The grace is `P grace:<user>` (its token) and the user's entry in `P graces`,
 * scored by its deadline: the releasing instance may stop or die before the
 * deadline, so any instance can end it from there (END_GRACE 'due').
 */
export const RELEASE = `${LIVE_MEMBERS}
local prefix, user, inst, conn = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local now_ms = clock_ms()
local uk = prefix .. 'uc:' .. user
local removed = redis.call('ZREM', uk, inst .. '|' .. conn)
redis.call('HDEL', prefix .. 'i:' .. inst .. ':conns', conn)
local live, pending = live_members(prefix, uk, now_ms, tonumber(ARGV[6]))
-- Not listed any more (removed == 0): reopened elsewhere, and then a live
-- stream holds the id, or pruned as stale (this instance was taken for dead).
-- Listed and held elsewhere too: this entry was recorded again by a resync
-- after a reopen elsewhere had taken the id. Unless a live stream holds it,
-- the id expires as after any close. Gone (Redis lost its data while the
-- stream was open, or before this close was recorded), it is written again
-- to expire alike: the client's reopen of its id within the window finds it.
if not holds(live, conn) then
  local owner = redis.call('GET', prefix .. 'conn:' .. conn)
  if owner == user then
    redis.call('EXPIRE', prefix .. 'conn:' .. conn, tonumber(ARGV[5]))
  elseif not owner then
    redis.call('SET', prefix .. 'conn:' .. conn, user, 'EX', tonumber(ARGV[5]))
  end
end
-- With a stream of a dead instance still listed, its reaper takes the user offline.
if removed == 0 or #live > 0 or pending > 0 then return 0 end
redis.call('SET', prefix .. 'grace:' .. user, ARGV[8], 'PX', tonumber(ARGV[7]) + 60000)
redis.call('ZADD', prefix .. 'graces', now_ms + tonumber(ARGV[7]), user)
redis.call('EXPIRE', prefix .. 'ut:' .. user, tonumber(ARGV[5]))
return 1
`

/**
 * Ends grace periods, each once whoever asks: the one of a user if it still
 * holds the token (the releasing instance's timer), or every one past its
 * deadline, at most `batch` (the lease holder's sweep, for graces whose
 * instance stopped or died).
 * ARGV: prefix, instanceTtlMs, then 'user', userId, graceToken, or 'due', batch.
 * Returns { graces ended, users now offline (nobody reconnected meanwhile)... }.
 */
export const END_GRACE = `${LIVE_MEMBERS}
local prefix = ARGV[1]
local graces = prefix .. 'graces'
local now_ms = clock_ms()
local users
if ARGV[3] == 'user' then
  if redis.call('GET', prefix .. 'grace:' .. ARGV[4]) ~= ARGV[5] then return { 0 } end
  users = { ARGV[4] }
else
  users = redis.call('ZRANGEBYSCORE', graces, '-inf', now_ms, 'LIMIT', 0, tonumber(ARGV[4]))
end
local out = { #users }
for _, user in ipairs(users) do
  redis.call('DEL', prefix .. 'grace:' .. user)
  redis.call('ZREM', graces, user)
  local live, pending = live_members(prefix, prefix .. 'uc:' .. user, now_ms, tonumber(ARGV[2]))
  if #live == 0 and pending == 0 then out[#out + 1] = user end
end
return out
`

/** Milliseconds until the earliest running grace ends, by Redis's clock; -1 when none runs. ARGV: prefix. */
export const NEXT_GRACE = `${CLOCK}
local first = redis.call('ZRANGE', ARGV[1] .. 'graces', 0, 0, 'WITHSCORES')
if first[2] == nil then return -1 end
return math.max(0, math.floor(tonumber(first[2]) - clock_ms()))
`

/**
 * Clears one user's streams of a dead instance, as RELEASE would have one by
 * one. ARGV: prefix, userId, deadInstance, instanceTtlMs, reopenTtlS,
 * connectionIds... Each id stays reopenable for reopenTtlS, unless it is live
 * elsewhere now (reopened); with no stream left and no grace running, the
 * user-wide topics expire as after a last close. Returns 1 when this call
 * took the user offline: it removed a stream, and none is left, live or of
 * another dead instance (a second reaper removes nothing), so each
 * going-offline is announced once.
 */
export const REAP = `${LIVE_MEMBERS}
local prefix, user, inst = ARGV[1], ARGV[2], ARGV[3]
local ttl = tonumber(ARGV[5])
local now_ms = clock_ms()
-- The instance beats again (it was cut off, not dead): its streams are live.
if beating(prefix, inst, now_ms, tonumber(ARGV[4])) then return 0 end
local uk = prefix .. 'uc:' .. user
local removed = 0
for i = 6, #ARGV do
  removed = removed + redis.call('ZREM', uk, inst .. '|' .. ARGV[i])
end
local live, pending = live_members(prefix, uk, now_ms, tonumber(ARGV[4]))
for i = 6, #ARGV do
  local conn = ARGV[i]
  if not holds(live, conn) and redis.call('GET', prefix .. 'conn:' .. conn) == user then
    redis.call('EXPIRE', prefix .. 'conn:' .. conn, ttl)
  end
end
-- Another dead instance's stream still listed: its reap takes the user offline.
if #live > 0 or pending > 0 or redis.call('EXISTS', prefix .. 'grace:' .. user) == 1 then return 0 end
redis.call('EXPIRE', prefix .. 'ut:' .. user, ttl)
if removed == 0 then return 0 end
return 1
`

/**
 * Raises the admission seq to at least ARGV[2] (prefix: ARGV[1]): an
 * instance's streams admitted before Redis lost its data (or failed over
 * to a replica with a clock behind) keep their seqs, and later admissions
 * must still come after them.
 */
export const ADMISSIONS_AT_LEAST = `
local key = ARGV[1] .. 'admissions'
if tonumber(ARGV[2]) > tonumber(redis.call('GET', key) or '0') then
  redis.call('SET', key, ARGV[2], 'EX', 86400)
end
return 0
`

/**
 * An instance's heartbeat, stamped with Redis's clock: every script that
 * judges a beat reads that clock, so a gateway whose own clock is off still
 * counts as beating. ARGV: prefix, instance, ttl of its list of streams (s).
 * Returns 1 when the instance was not listed: its record is new, or it was
 * lost (Redis emptied, FLUSHALL) or reaped since the last beat.
 */
export const BEAT = `${CLOCK}
local prefix, inst = ARGV[1], ARGV[2]
local added = redis.call('ZADD', prefix .. 'instances', fmt(clock_ms()), inst)
redis.call('EXPIRE', prefix .. 'i:' .. inst .. ':conns', tonumber(ARGV[3]))
return added
`

/**
 * The instances whose last beat is within instanceTtlMs ('live') or older
 * ('dead') by Redis's clock. ARGV: prefix, instanceTtlMs, 'live' | 'dead'.
 */
export const INSTANCES = `${CLOCK}
local cutoff = fmt(clock_ms() - tonumber(ARGV[2]))
if ARGV[3] == 'live' then return redis.call('ZRANGEBYSCORE', ARGV[1] .. 'instances', cutoff, '+inf') end
return redis.call('ZRANGEBYSCORE', ARGV[1] .. 'instances', '-inf', '(' .. cutoff)
`

/**
 * Records again one user's streams of this instance after Redis came back
 * (maybe empty, maybe after this instance was taken for dead and reaped).
 * An id a live stream of another instance holds (a reopen there took it
 * while this ran) is left to it.
 * ARGV: prefix, userId, instance, instanceTtlMs, then connectionId, admission
 * seq pairs. Returns 1 when the user was offline until now (others were told so).
 */
export const REJOIN = `${LIVE_MEMBERS}
local prefix, user, inst = ARGV[1], ARGV[2], ARGV[3]
local now_ms = clock_ms()
local uk = prefix .. 'uc:' .. user
local live, pending = live_members(prefix, uk, now_ms, tonumber(ARGV[4]))
local was_online = #live > 0 or pending > 0
  or redis.call('EXISTS', prefix .. 'grace:' .. user) == 1
local elsewhere = {}
for _, m in ipairs(live) do
  local holder, conn = string.match(m, '^(.-)|(.*)$')
  if holder ~= inst then elsewhere[conn] = true end
end
for i = 5, #ARGV, 2 do
  if not elsewhere[ARGV[i]] then
    redis.call('ZADD', uk, tonumber(ARGV[i + 1]), inst .. '|' .. ARGV[i])
    redis.call('SET', prefix .. 'conn:' .. ARGV[i], user)
  end
end
redis.call('PERSIST', prefix .. 'ut:' .. user)
if was_online then return 0 end
return 1
`

/**
 * Forgets a dead instance's list and its place among the instances, unless it
 * beats again. ARGV: prefix, instance, instanceTtlMs. Returns 1 when forgotten.
 */
export const FORGET = `${LIVE_MEMBERS}
local prefix, inst = ARGV[1], ARGV[2]
if beating(prefix, inst, clock_ms(), tonumber(ARGV[3])) then return 0 end
-- UNLINK: a dead instance's list may hold 100 000 records, freed off Redis's main thread.
redis.call('UNLINK', prefix .. 'i:' .. inst .. ':conns')
redis.call('ZREM', prefix .. 'instances', inst)
return 1
`

/** ARGV: prefix, userId, instanceTtlMs. Returns { live streams, in grace (0|1) }. */
export const PRESENCE = `${LIVE_MEMBERS}
local prefix, user = ARGV[1], ARGV[2]
local now_ms = clock_ms()
local live = live_members(prefix, prefix .. 'uc:' .. user, now_ms, tonumber(ARGV[3]))
return { #live, redis.call('EXISTS', prefix .. 'grace:' .. user) }
`

/**
 * User-wide topics. ARGV: prefix, userId, ttlS, 'add'|'remove', max,
 * control channel, control envelope, topics...
 * The set does not expire while the user has streams; it expires ttlS after
 * the later of this change and the last stream closing. An add that would
 * leave more than max topics adds none and returns 0.
 * The envelope is PUBLISHed on the control channel after the change, in the
 * same script: every instance hears the changes in the order they were made.
 * The topics removed are also kept for ttlS in `P utr:<user>`, the latest
 * max of them (an add takes them out): after Redis lost its data, a topic the
 * user left since is not written back from the streams that still hold it
 * (USER_TOPICS_AGAIN).
 * Returns { instances that received the envelope, the user's topics... }.
 */
export const USER_TOPICS = `${CLOCK}
local prefix, user = ARGV[1], ARGV[2]
local key = prefix .. 'ut:' .. user
local removed = prefix .. 'utr:' .. user
local max = tonumber(ARGV[5])
local first = 8
if ARGV[4] == 'add' then
  local count = redis.call('SCARD', key)
  for i = first, #ARGV do
    if redis.call('SISMEMBER', key, ARGV[i]) == 0 then count = count + 1 end
  end
  if count > max then return 0 end
end
local now = clock_us()
for i = first, #ARGV do
  if ARGV[4] == 'add' then
    redis.call('SADD', key, ARGV[i])
    redis.call('ZREM', removed, ARGV[i])
  else
    -- Whether the set held it or not: after a loss, the set may be the one lost.
    redis.call('SREM', key, ARGV[i])
    redis.call('ZADD', removed, now, ARGV[i])
  end
end
if ARGV[4] ~= 'add' and #ARGV >= first then
  redis.call('ZREMRANGEBYRANK', removed, 0, -(max + 1))
  redis.call('EXPIRE', removed, tonumber(ARGV[3]))
end
if redis.call('EXISTS', key) == 1 then
  if redis.call('ZCARD', prefix .. 'uc:' .. user) > 0 then
    redis.call('PERSIST', key)
  elseif ARGV[4] == 'add' then
    redis.call('EXPIRE', key, tonumber(ARGV[3]))
  end
end
local out = { redis.call('PUBLISH', ARGV[6], ARGV[7]) }
for _, topic in ipairs(redis.call('SMEMBERS', key)) do out[#out + 1] = topic end
return out
`

/**
 * A user's user-wide topics written back from the streams of one instance
 * that hold them, after Redis lost its data (the caller's epoch changed):
 * each instance adds what its streams hold, but not a topic the user left
 * since (`P utr:<user>`). What it adds goes to every instance as a
 * user-wide add, PUBLISHed here so that it comes before any later change of
 * the user's: the user's streams elsewhere may lack it. ARGV: prefix,
 * userId, ttlS, control channel, the envelope's text before and after its
 * list of added topics, topics... Returns the topics added.
 */
export const USER_TOPICS_AGAIN = `
local prefix, user = ARGV[1], ARGV[2]
local key = prefix .. 'ut:' .. user
local removed = prefix .. 'utr:' .. user
local existed = redis.call('EXISTS', key)
local added = {}
for i = 7, #ARGV do
  if not redis.call('ZSCORE', removed, ARGV[i]) and redis.call('SADD', key, ARGV[i]) == 1 then added[#added + 1] = ARGV[i] end
end
if #added == 0 then return added end
if existed == 0 then
  if redis.call('ZCARD', prefix .. 'uc:' .. user) > 0 then
    redis.call('PERSIST', key)
  else
    redis.call('EXPIRE', key, tonumber(ARGV[3]))
  end
end
-- Topic names are of A-Z a-z 0-9 _ . : / - only: quoted as they are.
redis.call('PUBLISH', ARGV[4], ARGV[5] .. '["' .. table.concat(added, '","') .. '"]' .. ARGV[6])
return added
`

/**
 * A user's user-wide topics, to bring streams back in line with, and
 * whether they can be trusted for it. ARGV: prefix, userId. Returns
 * { the id epoch ('' if none), 1 if the set or the topics removed exist
 * (else 0: neither was ever written, or both were lost), topics... }.
 */
export const USER_TOPICS_CHECKED = `
local prefix, user = ARGV[1], ARGV[2]
local key = prefix .. 'ut:' .. user
local out = { redis.call('GET', prefix .. 'epoch') or '', redis.call('EXISTS', key, prefix .. 'utr:' .. user) > 0 and 1 or 0 }
for _, topic in ipairs(redis.call('SMEMBERS', key)) do out[#out + 1] = topic end
return out
`

/** ARGV: prefix, conversationId, 'set'|'add'|'remove', members... Returns the members. */
export const MEMBERS = `
local prefix, id, op = ARGV[1], ARGV[2], ARGV[3]
local key = prefix .. 'cv:' .. id
local before = redis.call('SMEMBERS', key)
local wanted = {}
for i = 4, #ARGV do wanted[ARGV[i]] = true end
if op == 'set' then
  for _, m in ipairs(before) do
    if not wanted[m] then
      redis.call('SREM', key, m)
      redis.call('SREM', prefix .. 'ucv:' .. m, id)
    end
  end
end
for i = 4, #ARGV do
  local m = ARGV[i]
  if op == 'remove' then
    redis.call('SREM', key, m)
    redis.call('SREM', prefix .. 'ucv:' .. m, id)
  else
    redis.call('SADD', key, m)
    redis.call('SADD', prefix .. 'ucv:' .. m, id)
  end
end
return redis.call('SMEMBERS', key)
`

/**
 * The other members of the user's conversations, smallest conversation first
 * while they stay within max in all (SharedState.contacts). ARGV: prefix,
 * userId, max. Returns { conversations left out, members... }.
 */
export const CONTACTS = `
local prefix, user, max = ARGV[1], ARGV[2], tonumber(ARGV[3])
local conversations = {}
for _, id in ipairs(redis.call('SMEMBERS', prefix .. 'ucv:' .. user)) do
  conversations[#conversations + 1] = { id = id, size = redis.call('SCARD', prefix .. 'cv:' .. id) }
end
table.sort(conversations, function (one, other)
  if one.size ~= other.size then return one.size < other.size end
  return one.id < other.id
end)
local seen, out, skipped = {}, {}, 0
for _, conversation in ipairs(conversations) do
  -- Its size counts the user: past max + 1 it cannot fit, and is not read.
  local fits = conversation.size <= max + 1
  local added = {}
  if fits then
    for _, m in ipairs(redis.call('SMEMBERS', prefix .. 'cv:' .. conversation.id)) do
      if m ~= user and not seen[m] then added[#added + 1] = m end
    end
    fits = #out + #added <= max
  end
  if fits then
    for _, m in ipairs(added) do
      seen[m] = true
      out[#out + 1] = m
    end
  else
    skipped = skipped + 1
  end
end
table.insert(out, 1, skipped)
return out
`

/**
 * ARGV: prefix, stopping holder, successor, waitMs. A stopping holder's
 * hand-over (IngressLeader.handOver): one instance, the first to ask while
 * the holder still holds the lease, becomes its successor for waitMs, and
 * meanwhile only it may take the lease (LEASE). Returns 1 for it.
 */
export const CLAIM_SUCCESSION = `
if redis.call('GET', ARGV[1] .. 'leader') ~= ARGV[2] then return 0 end
if redis.call('SET', ARGV[1] .. 'successor', ARGV[3], 'NX', 'PX', tonumber(ARGV[4])) then return 1 end
return 0
`

/**
 * ARGV: prefix, holder, successor, leaseMs. The holder passes the lease to
 * its successor directly, as renewed now: no other instance can take it in
 * between. Returns 1 if passed; 0 if the holder no longer holds it, or the
 * successor gave its claim up or is not heard (it died: the lease goes free
 * at once rather than to an instance that cannot renew it).
 */
export const PASS_LEASE = `${CLOCK}
local key = ARGV[1] .. 'leader'
if redis.call('GET', key) ~= ARGV[2] or redis.call('GET', ARGV[1] .. 'successor') ~= ARGV[3] then return 0 end
if redis.call('PUBSUB', 'NUMSUB', ARGV[1] .. 'alive:' .. ARGV[3])[2] == 0 then
  redis.call('DEL', ARGV[1] .. 'successor')
  return 0
end
redis.call('SET', key, ARGV[3], 'PX', tonumber(ARGV[4]))
redis.call('SET', ARGV[1] .. 'leader-at', fmt(clock_ms()), 'PX', tonumber(ARGV[4]))
redis.call('DEL', ARGV[1] .. 'successor')
-- The holder's record goes: a successor of an older version would not keep
-- it up to date, and a taker after it would publish again what it did.
-- One of this version starts its own at its first renewal (LEASE).
redis.call('DEL', ARGV[1] .. 'ingress-at')
return 1
`

/** Publishes a marker on `<prefix>ingress-mark` (see LEASE): a number above every earlier one. Returns it. */
const MARK_FUNCTION = `
local function mark()
  local mark_key = ARGV[1] .. 'ingress-mark'
  local seq = math.max(clock_us(), tonumber(redis.call('GET', mark_key) or 0) + 1)
  redis.call('SET', mark_key, fmt(seq))
  -- pcall: a Redis ACL that does not allow the channel must not fail the
  -- lease with it (the writes before it would stay, and no one would hold it).
  redis.pcall('PUBLISH', mark_key, fmt(seq))
  return seq
end
`

/**
 * ARGV: prefix. A marker published by a standby that just subscribed: every
 * instance may publish one, and from it on the standby knows the places of
 * what it keeps, without waiting for the holder's next renewal.
 */
export const MARK = `${CLOCK}${MARK_FUNCTION}
return fmt(mark())
`

/**
 * ARGV: prefix, instance, leaseMs, staleMs. Takes or renews the ingress lease; returns 1 if held.
 * Every instance's subscriber listens to `<prefix>alive:<instance>` from start-up,
 * and the holder notes when it last renewed (`<prefix>leader-at`, Redis's
 * clock: instances with another INSTANCE_TTL_MS judge it alike). A holder
 * with no one there that has not renewed for staleMs (it renews several
 * times as often) has died, or lost Redis: ingress messages reach no one
 * until its lease would have expired, so it is taken from it then. Both are
 * needed: a holder whose subscriber only reconnects still renews, and keeps
 * the lease its waiting messages are published under; a frozen one keeps
 * its connection, and its lease. It is taken by an instance heard there
 * itself: two that are not (their subscription failed) would otherwise take
 * it from each other at every probe.
 *
 * The holder, at each renewal, publishes a marker on `<prefix>ingress-mark`
 * (a number above every earlier one). Every instance's subscriber gets it at
 * the same place among the ingress messages, so "the n-th message after
 * marker m" names one message alike on every instance. The holder records,
 * as it publishes each message, that message's place (`ingress-at`, kept as
 * long as its lease). A taker starts from the record of the holder it takes
 * over from, or from the marker it takes the lease with, and gets that
 * place back ({ 1, place }): it publishes what it kept after it (see
 * IngressLeader's standby). An instance passed the lease starts from the
 * marker of its first renewal.
 */
export const LEASE = `${CLOCK}${MARK_FUNCTION}
local key = ARGV[1] .. 'leader'
local renewed = ARGV[1] .. 'leader-at'
local at_key = ARGV[1] .. 'ingress-at'
local lease_ms = tonumber(ARGV[3])
local holder = redis.call('GET', key)
local now = clock_ms()
if holder == ARGV[2] then
  redis.call('PEXPIRE', key, lease_ms)
  redis.call('SET', renewed, fmt(now), 'PX', lease_ms)
  local seq = mark()
  -- Passed the lease (PASS_LEASE leaves no record): from this marker on.
  if redis.call('PEXPIRE', at_key, lease_ms) == 0 then
    redis.call('SET', at_key, ARGV[2] .. '\\n' .. fmt(seq) .. ':0', 'PX', lease_ms)
  end
  return 1
end
local function heard(instance)
  return redis.call('PUBSUB', 'NUMSUB', ARGV[1] .. 'alive:' .. instance)[2] > 0
end
if holder and (heard(holder) or not heard(ARGV[2]) or now - tonumber(redis.call('GET', renewed) or 0) < tonumber(ARGV[4])) then
  return 0
end
-- A stopping holder's successor keeps what came after its marker: only it
-- may take the lease while it waits, or another would publish those too.
local successor = redis.call('GET', ARGV[1] .. 'successor')
if successor and successor ~= ARGV[2] then return 0 end
if successor then redis.call('DEL', ARGV[1] .. 'successor') end
-- Only the record of the holder it takes over from: another's is older.
local at = holder and redis.call('GET', at_key)
redis.call('SET', key, ARGV[2], 'PX', lease_ms)
redis.call('SET', renewed, fmt(now), 'PX', lease_ms)
-- From the dead holder's place, or, without one, from this marker on: what
-- comes after is the taker's to publish, and the next taker's should it
-- die before it has.
local place = fmt(mark()) .. ':0'
if at and string.sub(at, 1, #holder + 1) == holder .. '\\n' and #at > #holder + 1 then
  place = string.sub(at, #holder + 2)
end
redis.call('SET', at_key, ARGV[2] .. '\\n' .. place, 'PX', lease_ms)
return { 1, place }
`

/**
 * ARGV: stream key, group, the holder's consumer name. Removes the group's
 * other consumers that have nothing pending, in one step, so none can be
 * handed an entry between the check and the removal (a consumer removed with
 * entries pending would leave them unclaimable). Returns how many it removed.
 */
export const DROP_IDLE_CONSUMERS = `
local removed = 0
for _, consumer in ipairs(redis.call('XINFO', 'CONSUMERS', ARGV[1], ARGV[2])) do
  local name, pending
  for i = 1, #consumer, 2 do
    if consumer[i] == 'name' then name = consumer[i + 1] elseif consumer[i] == 'pending' then pending = consumer[i + 1] end
  end
  if name ~= ARGV[3] and pending == 0 then
    redis.call('XGROUP', 'DELCONSUMER', ARGV[1], ARGV[2], name)
    removed = removed + 1
  end
end
return removed
`

/**
 * ARGV: key, window in ms. Counts one request under a rate limit's key,
 * shared by every instance; the window starts at the key's first request.
 * Returns the count within the window and the milliseconds it has left.
 * (A key found without a TTL, which nothing here writes, is given one rather
 * than limiting its client for good.)
 */
export const COUNT_REQUEST = `
local count = redis.call('INCR', ARGV[1])
local left = redis.call('PTTL', ARGV[1])
if count == 1 or left < 0 then
  left = tonumber(ARGV[2])
  redis.call('PEXPIRE', ARGV[1], left)
elseif left == 0 then
  -- Its last millisecond: a refusal still says to retry in a second, not 0.
  left = 1
end
return {count, left}
`
