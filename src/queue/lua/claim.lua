-- claim.lua: hands the lock holder a batch to flush: the abandoned in-flight batch if there is
-- one, else up to ARGV[2] events moved from the head of the queue into the in-flight list.
--
-- KEYS[1] queue list        KEYS[2] queue counter
-- KEYS[3] in-flight list    KEYS[4] in-flight meta hash (batch_id, chunks_done)
-- KEYS[5] flush lock
-- ARGV[1] lock token        ARGV[2] max events      ARGV[3] id for a new batch
--
-- Returns {batch_id, chunks_done, entries}; an empty batch_id means the queue is empty.
-- Atomicity: the move and the counter change happen together, so the counter always equals the
-- queue's length (in-flight events are counted separately) and no event is in both places.

if redis.call('GET', KEYS[5]) ~= ARGV[1] then
  return redis.error_reply('LOCKLOST flush lock is not held by this flusher')
end

if redis.call('EXISTS', KEYS[3]) == 1 then
  local meta = redis.call('HMGET', KEYS[4], 'batch_id', 'chunks_done')
  local batch_id = meta[1] or ARGV[3]
  if not meta[1] then
    redis.call('HSET', KEYS[4], 'batch_id', batch_id, 'chunks_done', 0)
  end
  return {batch_id, tonumber(meta[2] or '0'), redis.call('LRANGE', KEYS[3], 0, -1)}
end

local entries = redis.call('LRANGE', KEYS[1], 0, tonumber(ARGV[2]) - 1)
if #entries == 0 then
  return {'', 0, {}}
end
redis.call('LTRIM', KEYS[1], #entries, -1)
if redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('DECRBY', KEYS[2], #entries)
end
for i = 1, #entries, 1000 do
  redis.call('RPUSH', KEYS[3], unpack(entries, i, math.min(i + 999, #entries)))
end
redis.call('HSET', KEYS[4], 'batch_id', ARGV[3], 'chunks_done', 0)
return {ARGV[3], 0, entries}
