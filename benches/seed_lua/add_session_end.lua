-- The reference's addSessionEnd script (OpenPanel's EventBuffer, seed-event-buffer.ts),
-- copied verbatim as a baseline for benches/end_to_end.rs. spillway does not use it.
--
-- KEYS[1] = last screen_view key (by session)
-- KEYS[2] = last screen_view key (by profile, may be empty)
-- KEYS[3] = queue key
-- KEYS[4] = buffer counter key
-- ARGV[1] = session_end event JSON
local sessionKey = KEYS[1]
local profileKey = KEYS[2]
local queueKey = KEYS[3]
local counterKey = KEYS[4]
local sessionEndJson = ARGV[1]

local previousEventData = redis.call("GETDEL", sessionKey)
local added = 0

if previousEventData then
  local prev = cjson.decode(previousEventData)
  redis.call("RPUSH", queueKey, cjson.encode(prev.event))
  redis.call("INCR", counterKey)
  added = added + 1
end

redis.call("RPUSH", queueKey, sessionEndJson)
redis.call("INCR", counterKey)
added = added + 1

if profileKey and profileKey ~= "" then
  redis.call("DEL", profileKey)
end

return added
