-- replay.lua: moves up to ARGV[1] dead-letter records back to the queue (their `entry`, as it
-- was queued), oldest first, in one step. An entry still invalid is dead-lettered again by the
-- next flush, with a fresh record.
--
-- KEYS[1] dead-letter list  KEYS[2] queue list  KEYS[3] queue counter
-- (push_queued is in held.lua, loaded with this script)
-- Returns the number of entries queued again.

local records = redis.call('LRANGE', KEYS[1], 0, tonumber(ARGV[1]) - 1)
local entries = {}
for _, record in ipairs(records) do
  local ok, decoded = pcall(cjson.decode, record)
  if ok and type(decoded) == 'table' and type(decoded.entry) == 'string' then
    entries[#entries + 1] = decoded.entry
  else
    entries[#entries + 1] = record
  end
end
if #records == 0 then
  return 0
end
redis.call('LTRIM', KEYS[1], #records, -1)
push_queued(KEYS[2], KEYS[3], entries)
return #entries
