-- enqueue.lua: writes one micro-batch of events to the queue, atomically.
--
-- KEYS[1]   queue list                 event_buffer:queue
-- KEYS[2]   queue counter              event_buffer:total_count
-- KEYS[3]   micro-batch marker         event_buffer:applied:<batch id>
-- KEYS[4]   held-view index            event_buffer:held_index (zset: session key -> held at ms)
-- KEYS[5]   re-send marks, this window  event_buffer:seen:<window number> (set of event ids)
-- KEYS[6]   re-send marks, last window  event_buffer:seen:<window number - 1>
-- KEYS[7..] the keys of each op, in op order (see below)
-- ARGV[1]   held screen view TTL, seconds
-- ARGV[2]   live-visitor window, seconds
-- ARGV[3]   heartbeat refresh period, seconds
-- ARGV[4]   now, epoch milliseconds
-- ARGV[5]   re-send window, seconds
-- ARGV[6]   M, the number of ids that follow
-- ARGV[7..6+M]  the ids of the ops marked '+', in op order
-- ARGV[7+M..]   ops, two arguments each: kind, payload
--
--   kind  payload      keys                      effect
--   e     event JSON   -                         queue the event
--   v|V   held value   session [, profile if V]  hold it; queue the previously held view with
--                                                duration = its ts - the previous ts
--   x|X   event JSON   session [, profile if X]  queue the held view unchanged, then the event;
--                                                forget the profile's view
--   h     profile id   visitors zset, heartbeat  refresh the visitor's heartbeat
--
-- A kind followed by '+' (e+, v+, ...) is an event with an id (the next of ARGV[7..6+M]). An id
-- in either window's set, or earlier in this micro-batch, is a client's re-send of an event
-- already taken in: the op is skipped whole (a re-sent screen view must not release its own
-- earlier copy). New ids join this window's set, which expires two windows on: an id is
-- remembered for at least one window. Sets per window rather than a key per id: one
-- SMISMEMBER and one SADD per micro-batch, and no expiry entry per id.
--
-- A held value is {"ts":<created_at ms>,"at":<1-based offset of the event's top-level
-- "duration" value, 0 if none>,"event":<event JSON>}: the seed's {"event","ts"} object with its
-- numbers first, so this script reads them without scanning the event.
-- Atomicity: a script runs alone, so the whole micro-batch lands or none of it does. The marker
-- makes a call that is retried after a lost reply a no-op (returns -1), so a retry never queues
-- the batch twice. Otherwise returns the number of re-sent events skipped. The index lets
-- sweep.lua find views whose session went quiet. The functions used here (split_held,
-- set_duration, push_queued, heartbeat) are in held.lua, loaded with this script.
-- The event's text is never decoded: on release only its top-level "duration"
-- is rewritten, by string surgery.

if not redis.call('SET', KEYS[3], '1', 'NX', 'EX', 3600) then
  return -1
end

local held_ttl = ARGV[1]
local window_ms = tonumber(ARGV[2]) * 1000
local refresh_ms = tonumber(ARGV[3]) * 1000
local now = ARGV[4]
local seen_window = tonumber(ARGV[5])
local id_count = tonumber(ARGV[6])
-- Keys of each op.
local op_keys = { e = 0, v = 1, V = 2, x = 1, X = 2 }

-- The ids taken in before this micro-batch, by their ARGV index.
local known = {}
for i = 7, 6 + id_count, 1000 do
  local last = math.min(i + 999, 6 + id_count)
  local this_window = redis.call('SMISMEMBER', KEYS[5], unpack(ARGV, i, last))
  local last_window = redis.call('SMISMEMBER', KEYS[6], unpack(ARGV, i, last))
  for j = 1, last - i + 1 do
    if this_window[j] == 1 or last_window[j] == 1 then
      known[i + j - 1] = true
    end
  end
end

local out = {}
local new_ids = {}
local in_batch = {}
local resent = 0
local next_id = 7
local k = 7
for i = 7 + id_count, #ARGV, 2 do
  local kind, payload = ARGV[i], ARGV[i + 1]
  if string.byte(kind, 2) == 43 then -- '+'
    kind = string.sub(kind, 1, 1)
    local id = ARGV[next_id]
    if known[next_id] or in_batch[id] then
      resent = resent + 1
      k = k + (op_keys[kind] or 0)
      kind = 'skip'
    else
      in_batch[id] = true
      new_ids[#new_ids + 1] = id
    end
    next_id = next_id + 1
  end
  if kind == 'skip' then
    -- a re-sent event: nothing to do
  elseif kind == 'e' then
    out[#out + 1] = payload
  elseif kind == 'v' or kind == 'V' then
    local previous = redis.call('SET', KEYS[k], payload, 'EX', held_ttl, 'GET')
    redis.call('ZADD', KEYS[4], now, KEYS[k])
    k = k + 1
    if kind == 'V' then
      redis.call('SET', KEYS[k], payload, 'EX', held_ttl)
      k = k + 1
    end
    if previous then
      local json, prev_ts, at = split_held(previous)
      if prev_ts then
        local ts = tonumber(string.match(payload, '^{"ts":(%-?%d+)'))
        json = set_duration(json, math.max(0, ts - prev_ts), at)
      end
      out[#out + 1] = json
    end
  elseif kind == 'x' or kind == 'X' then
    local previous = redis.call('GETDEL', KEYS[k])
    redis.call('ZREM', KEYS[4], KEYS[k])
    k = k + 1
    if previous then
      out[#out + 1] = (split_held(previous))
    end
    out[#out + 1] = payload
    if kind == 'X' then
      redis.call('DEL', KEYS[k])
      k = k + 1
    end
  elseif kind == 'h' then
    heartbeat(KEYS[k], KEYS[k + 1], payload, now, window_ms, refresh_ms)
    k = k + 2
  else
    return redis.error_reply('ERR enqueue.lua: unknown op kind ' .. tostring(kind))
  end
end

for i = 1, #new_ids, 1000 do
  redis.call('SADD', KEYS[5], unpack(new_ids, i, math.min(i + 999, #new_ids)))
end
if #new_ids > 0 then
  redis.call('EXPIRE', KEYS[5], 2 * seen_window)
end
push_queued(KEYS[1], KEYS[2], out)
return resent
