-- held.lua: functions shared by the scripts that queue events (enqueue.lua, sweep.lua,
-- replay.lua) or beat hearts (heartbeat.lua); prepended to each of them when it is loaded. Touches only the keys it is given.

-- Appends entries to the queue and keeps the counter equal to the queue's length (a missing
-- counter is set from the length rather than started at the batch size).
local function push_queued(queue_key, counter_key, entries)
  for i = 1, #entries, 1000 do
    redis.call('RPUSH', queue_key, unpack(entries, i, math.min(i + 999, #entries)))
  end
  if #entries > 0 then
    if redis.call('EXISTS', counter_key) == 1 then
      redis.call('INCRBY', counter_key, #entries)
    else
      redis.call('SET', counter_key, redis.call('LLEN', queue_key))
    end
  end
end

-- Refreshes a visitor's heartbeat unless some process did less than a refresh period ago. The
-- heartbeat key is set with the full window as TTL, so a remaining TTL above window - refresh
-- means a recent refresh.
local function heartbeat(visitors_key, heartbeat_key, profile, now, window_ms, refresh_ms)
  if redis.call('PTTL', heartbeat_key) <= window_ms - refresh_ms then
    redis.call('ZADD', visitors_key, now, profile)
    redis.call('SET', heartbeat_key, '1', 'PX', window_ms)
  end
end

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

