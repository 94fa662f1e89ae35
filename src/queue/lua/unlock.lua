-- unlock.lua: deletes the flush lock only if this flusher still holds it (compare-and-delete).
--
-- KEYS[1] flush lock        ARGV[1] lock token
-- Returns 1 when released, 0 when the lock had expired or belongs to another flusher.

if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
