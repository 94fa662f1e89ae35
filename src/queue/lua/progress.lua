-- progress.lua: records that the in-flight batch's first ARGV[2] chunks are in the sink, and
-- extends the flush lock, only while this flusher still holds it.
--
-- KEYS[1] flush lock        KEYS[2] in-flight meta hash
-- ARGV[1] lock token        ARGV[2] chunks done      ARGV[3] lock TTL, milliseconds
--
-- Returns 1, or a LOCKLOST error when another flusher owns the batch now.

if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return redis.error_reply('LOCKLOST flush lock is not held by this flusher')
end
redis.call('HSET', KEYS[2], 'chunks_done', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
