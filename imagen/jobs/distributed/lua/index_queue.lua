-- Build the fair queue's index once (a Redis whose jobs were queued by a version without it): every
-- confirmed waiting job into its key's queue, then each key ranked. Returns how many jobs were indexed, or
-- -1 when the index was built already.
-- KEYS: indexed marker, waiting, unconfirmed, queue keys, queue sizes, key turns
-- ARGV: queue prefix, job prefix
if redis.call('EXISTS', KEYS[1]) == 1 then return -1 end
local index = queue_index(ARGV[1], KEYS[4], KEYS[5], KEYS[6])
local seen, count = {}, 0
local queued = redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')
for i = 1, #queued, 2 do
  local id, seq = queued[i], queued[i + 1]
  if not redis.call('ZSCORE', KEYS[3], id) then
    local key_name = redis.call('HGET', ARGV[2] .. id, 'key_name') or ''
    redis.call('ZADD', index.prefix .. key_name, seq, id)
    seen[key_name] = true
    count = count + 1
  end
end
for key_name in pairs(seen) do rerank(index, key_name) end
redis.call('SET', KEYS[1], '1')
return count
