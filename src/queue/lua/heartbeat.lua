-- heartbeat.lua: refreshes the heartbeats of one project's visitors, throttled across all
-- processes. On a sharded queue heartbeats are not part of enqueue.lua's call: a project's
-- visitor keys live in their own slot ({<project>} hash tag on a cluster).
--
-- KEYS[1]   visitors zset             live:visitors:<project>
-- KEYS[2..] heartbeat key per profile live:visitor:<project>:<profile>, in ARGV order
-- ARGV[1]   live-visitor window, seconds
-- ARGV[2]   heartbeat refresh period, seconds
-- ARGV[3]   now, epoch milliseconds
-- ARGV[4..] profile ids
-- (heartbeat is in held.lua, loaded with this script)

local window_ms = tonumber(ARGV[1]) * 1000
local refresh_ms = tonumber(ARGV[2]) * 1000
for i = 4, #ARGV do
  heartbeat(KEYS[1], KEYS[i - 2], ARGV[i], ARGV[3], window_ms, refresh_ms)
end
return #ARGV - 3
