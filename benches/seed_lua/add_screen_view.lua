-- The reference's addScreenView script (OpenPanel's EventBuffer, seed-event-buffer.ts),
-- copied verbatim as a baseline for benches/end_to_end.rs. spillway does not use it.
--
-- KEYS[1] = last screen_view key (by session)
-- KEYS[2] = last screen_view key (by profile, may be empty)
-- KEYS[3] = queue key
-- KEYS[4] = buffer counter key
-- ARGV[1] = new event with timestamp as JSON: {"event": {...}, "ts": 123456}
-- ARGV[2] = TTL for last screen_view (1 hour)
local sessionKey = KEYS[1]
local profileKey = KEYS[2]
local queueKey = KEYS[3]
local counterKey = KEYS[4]
local newEventData = ARGV[1]
local ttl = tonumber(ARGV[2])

local previousEventData = redis.call("GETDEL", sessionKey)

redis.call("SET", sessionKey, newEventData, "EX", ttl)

if profileKey and profileKey ~= "" then
  redis.call("SET", profileKey, newEventData, "EX", ttl)
end

if previousEventData then
  local prev = cjson.decode(previousEventData)
  local curr = cjson.decode(newEventData)

  if prev.ts and curr.ts then
    prev.event.duration = math.max(0, curr.ts - prev.ts)
  end

  redis.call("RPUSH", queueKey, cjson.encode(prev.event))
  redis.call("INCR", counterKey)
  return 1
end

return 0
