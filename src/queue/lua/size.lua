-- size.lua: the number of queued events, from the counter; when the counter is missing or
-- negative, counts the list and repairs the counter in the same step.
--
-- KEYS[1] queue list        KEYS[2] queue counter
-- Returns the queue size.

local counter = tonumber(redis.call('GET', KEYS[2]))
if counter and counter >= 0 then
  return counter
end
local length = redis.call('LLEN', KEYS[1])
redis.call('SET', KEYS[2], length)
return length
