-- sweep.lua: releases held screen views whose session has been quiet since ARGV[1], unchanged,
-- as a session_end would (the seed lets them expire and loses them).
--
-- KEYS[1] held-view index (zset: session key -> held at ms)
-- KEYS[2] queue list        KEYS[3] queue counter
-- ARGV[1] cutoff, epoch ms: views held at or before it are released
-- ARGV[2] most views to release in this call
-- ARGV[3] key prefix (to find the profile's view, which is forgotten when it is the same one)
--
-- Returns the number of views queued. Atomic: a view is either still held or queued, and a
-- screen view arriving for the session after this step starts a new hold.

local members = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
local out = {}
for _, session_key in ipairs(members) do
  redis.call('ZREM', KEYS[1], session_key)
  local value = redis.call('GETDEL', session_key)
  if value then
    local json = split_held(value)
    out[#out + 1] = json
    local ok, event = pcall(cjson.decode, json)
    if ok and type(event) == 'table' and type(event.project_id) == 'string'
        and type(event.profile_id) == 'string' and event.profile_id ~= '' then
      local profile_key = ARGV[3] .. 'event_buffer:last_screen_view:profile:'
        .. event.project_id .. ':' .. event.profile_id
      if redis.call('GET', profile_key) == value then
        redis.call('DEL', profile_key)
      end
    end
  end
end

push_queued(KEYS[2], KEYS[3], out)
return #out
