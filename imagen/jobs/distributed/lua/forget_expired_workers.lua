-- Drop from the index of heartbeats (keys.WORKERS) the heartbeat keys that no longer exist; how many.
-- Checked here, not by the reader: a worker may beat again between the reader's MGET and this removal.
-- KEYS: heartbeat keys read as expired   ARGV: the index
local dropped = 0
for _, key in ipairs(KEYS) do
  if redis.call('EXISTS', key) == 0 then dropped = dropped + redis.call('SREM', ARGV[1], key) end
end
return dropped
