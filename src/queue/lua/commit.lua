-- commit.lua: retires the in-flight batch once every chunk is in the sink, and records the
-- entries that could not be flushed in the dead-letter list, in one step.
--
-- KEYS[1] flush lock        KEYS[2] in-flight list   KEYS[3] in-flight meta hash
-- KEYS[4] dead-letter list
-- ARGV[1] lock token        ARGV[2..] dead-letter records (JSON)
--
-- Returns the number of dead-letter records written (0 for a repeat), or a LOCKLOST error.

if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return redis.error_reply('LOCKLOST flush lock is not held by this flusher')
end
-- No batch in flight: this is a repeat of a commit that ran (a reply lost in a failover).
if redis.call('EXISTS', KEYS[3]) == 0 then
  return 0
end
redis.call('DEL', KEYS[2], KEYS[3])
for i = 2, #ARGV, 1000 do
  redis.call('RPUSH', KEYS[4], unpack(ARGV, i, math.min(i + 999, #ARGV)))
end
return #ARGV - 1
