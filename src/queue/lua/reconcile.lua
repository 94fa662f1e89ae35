-- reconcile.lua: sets the queue counter to the queue's length and returns the drift found
-- (counter - length; 0 when they agreed). Other writers of the same keys (an OpenPanel
-- deployment sharing this Redis) may let them drift; spillway's own scripts keep them equal.
--
-- KEYS[1] queue list        KEYS[2] queue counter

local length = redis.call('LLEN', KEYS[1])
local counter = tonumber(redis.call('GET', KEYS[2]) or '') or length
if counter ~= length then
  redis.call('SET', KEYS[2], length)
end
return counter - length
