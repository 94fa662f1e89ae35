-- progress.lua: records that the in-flight batch's first ARGV[2] chunks are done (in the sink,
-- or rows of them the sink rejected for their data, appended to the dead-letter list in the
-- same step), and extends the flush lock, only while this flusher still holds it.
--
-- KEYS[1] flush lock        KEYS[2] in-flight meta hash      KEYS[3] dead-letter list
-- ARGV[1] lock token        ARGV[2] chunks done      ARGV[3] lock TTL, milliseconds
-- ARGV[4..] dead-letter records (JSON) of the rows the sink rejected
--
-- Returns 1, or a LOCKLOST error when another flusher owns the batch now.

if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return redis.error_reply('LOCKLOST flush lock is not held by this flusher')
end
-- A repeat of a call that already ran (the client re-sends a command whose reply a failover
-- lost) must not dead-letter the same rows twice.
local done = tonumber(redis.call('HGET', KEYS[2], 'chunks_done') or '-1')
if done < tonumber(ARGV[2]) then
  redis.call('HSET', KEYS[2], 'chunks_done', ARGV[2])
  for i = 4, #ARGV, 1000 do
    redis.call('RPUSH', KEYS[3], unpack(ARGV, i, math.min(i + 999, #ARGV)))
  end
end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
