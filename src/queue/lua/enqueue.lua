-- enqueue.lua: writes one micro-batch of events to the queue, atomically.
--
-- KEYS[1]   queue list                 event_buffer:queue
-- KEYS[2]   queue counter              event_buffer:total_count
-- KEYS[3]   micro-batch marker         event_buffer:applied:<batch id>
-- KEYS[4..] the keys of each op, in op order (see below)
-- ARGV[1]   held screen view TTL, seconds
-- ARGV[2]   live-visitor window, seconds
-- ARGV[3]   heartbeat refresh period, seconds
-- ARGV[4]   now, epoch milliseconds
-- ARGV[5..] ops, two arguments each: kind, payload
--
--   kind  payload      keys                      effect
--   e     event JSON   -                         queue the event
--   v|V   held value   session [, profile if V]  hold it; queue the previously held view with
--                                                duration = its ts - the previous ts
--   x|X   event JSON   session [, profile if X]  queue the held view unchanged, then the event;
--                                                forget the profile's view
--   h     profile id   visitors zset, heartbeat  refresh the visitor's heartbeat
--
-- A held value is {"ts":<created_at ms>,"at":<1-based offset of the event's top-level
-- "duration" value, 0 if none>,"event":<event JSON>}: the seed's {"event","ts"} object with its
-- numbers first, so this script reads them without scanning the event.
-- Atomicity: a script runs alone, so the whole micro-batch lands or none of it does. The marker
-- makes a call that is retried after a lost reply a no-op (returns -1), so a retry never queues
-- the batch twice. The event's text is never decoded: on release only its top-level "duration"
-- is rewritten, by string surgery.

if not redis.call('SET', KEYS[3], '1', 'NX', 'EX', 3600) then
  return -1
end

local held_ttl = ARGV[1]
local window_ms = tonumber(ARGV[2]) * 1000
local refresh_ms = tonumber(ARGV[3]) * 1000
local now = ARGV[4]

-- Start and end of the value of the object's top-level "duration" field, or nil.
local function find_duration(json)
  local depth, i, expect_key = 0, 1, false
  while true do
    local s, _, c = string.find(json, '([{}%[%]",])', i)
    if not s then return nil end
    if c == '"' then
      local e = s + 1
      while true do
        local q = string.find(json, '["\\]', e)
        if not q then return nil end
        if string.byte(json, q) == 92 then e = q + 2 else e = q; break end
      end
      if depth == 1 and expect_key then
        expect_key = false
        if string.sub(json, s, e) == '"duration"' then
          local vs, ve = string.match(json, '^%s*:%s*()[^,}%s]*()', e + 1)
          if vs then return vs, ve - 1 end
          return nil
        end
      end
      i = e + 1
    else
      if c == '{' or c == '[' then
        depth = depth + 1
        expect_key = (c == '{' and depth == 1)
      elseif c == '}' or c == ']' then
        depth = depth - 1
      elseif depth == 1 then
        expect_key = true
      end
      i = s + 1
    end
  end
end

-- The event with its top-level duration set to ms; every other byte unchanged. `at` is the
-- 1-based offset of the duration value (0: there is none; nil: unknown, scan for it).
local function set_duration(json, ms, at)
  local text = string.format('%d', ms)
  local vs, ve
  if at == nil then
    vs, ve = find_duration(json)
  elseif at > 0 then
    vs = at
    ve = (string.find(json, '[^%d%.eE%+%-]', at) or (#json + 1)) - 1
  end
  if vs then
    return string.sub(json, 1, vs - 1) .. text .. string.sub(json, ve + 1)
  end
  local body = string.match(json, '^(.-)%s*}%s*$')
  if not body then return json end
  if string.match(body, '{%s*$') then
    return body .. '"duration":' .. text .. '}'
  end
  return body .. ',"duration":' .. text .. '}'
end

-- Splits a held value into the event's JSON text, its timestamp and its duration offset.
local function split_held(value)
  local ts, at, start = string.match(value, '^{"ts":(%-?%d+),"at":(%d+),"event":()')
  if ts then
    return string.sub(value, start, -2), tonumber(ts), tonumber(at)
  end
  -- The seed's own layout, as OpenPanel writes it.
  local json, seed_ts = string.match(value, '^{"event":(.*),"ts":(%-?%d+)}$')
  if json then return json, tonumber(seed_ts), nil end
  -- Another producer's key order: decode as a last resort.
  local ok, decoded = pcall(cjson.decode, value)
  if ok and type(decoded) == 'table' and type(decoded.event) == 'table' then
    return cjson.encode(decoded.event), tonumber(decoded.ts), nil
  end
  -- Unreadable: queue it as it is, so the flusher dead-letters it with a reason.
  return value, nil, nil
end

local out = {}
local k = 4
for i = 5, #ARGV, 2 do
  local kind, payload = ARGV[i], ARGV[i + 1]
  if kind == 'e' then
    out[#out + 1] = payload
  elseif kind == 'v' or kind == 'V' then
    local previous = redis.call('SET', KEYS[k], payload, 'EX', held_ttl, 'GET')
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
    local visitors, heartbeat = KEYS[k], KEYS[k + 1]
    k = k + 2
    -- The heartbeat key is set with the full window as TTL, so a remaining TTL above
    -- window - refresh means some process refreshed it less than a refresh period ago.
    if redis.call('PTTL', heartbeat) <= window_ms - refresh_ms then
      redis.call('ZADD', visitors, now, payload)
      redis.call('SET', heartbeat, '1', 'PX', window_ms)
    end
  else
    return redis.error_reply('ERR enqueue.lua: unknown op kind ' .. tostring(kind))
  end
end

for i = 1, #out, 1000 do
  redis.call('RPUSH', KEYS[1], unpack(out, i, math.min(i + 999, #out)))
end
if #out > 0 then
  if redis.call('EXISTS', KEYS[2]) == 1 then
    redis.call('INCRBY', KEYS[2], #out)
  else
    redis.call('SET', KEYS[2], redis.call('LLEN', KEYS[1]))
  end
end
return #out
