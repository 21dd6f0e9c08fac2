-- Prelude: the fair queue's index (keys.py). Each key's confirmed waiting jobs by queue order; the keys that
-- have some, ranked as jobs.fairness.key_rank ranks them (this repeats its formula: the key's last turn, or
-- for a key never served its oldest job's seq minus NEVER_SERVED_OFFSET); and how many each has waiting.
-- Every change costs O(log n): never a read of the whole queue.
local NEVER_SERVED_OFFSET = 4503599627370496  -- 2^52, fairness.NEVER_SERVED_OFFSET
local function queue_index(prefix, keys, sizes, turns)
  return {prefix = prefix, keys = keys, sizes = sizes, turns = turns}
end
-- A key's rank (jobs.fairness.key_rank): its last turn, or for a key never served its oldest job's seq
-- (``oldest_seq``, a function: read only then) minus NEVER_SERVED_OFFSET.
local function key_rank(turns, key_name, oldest_seq)
  local turn = tonumber(redis.call('HGET', turns, key_name) or '0')
  if turn > 0 then return turn end
  return oldest_seq() - NEVER_SERVED_OFFSET
end
-- Rank the key again after its jobs or its turn changed (or drop it when none of its jobs wait).
local function rerank(index, key_name)
  local queue = index.prefix .. key_name
  local size = redis.call('ZCARD', queue)
  if size == 0 then
    redis.call('ZREM', index.keys, key_name)
    redis.call('HDEL', index.sizes, key_name)
    return
  end
  local rank = key_rank(index.turns, key_name, function()
    return tonumber(redis.call('ZRANGE', queue, 0, 0, 'WITHSCORES')[2])
  end)
  redis.call('ZADD', index.keys, rank, key_name)
  redis.call('HSET', index.sizes, key_name, size)
end
local function enqueue(index, id, key_name, seq)
  redis.call('ZADD', index.prefix .. key_name, seq, id)
  rerank(index, key_name)
end
local function dequeue(index, id, key_name)
  if redis.call('ZREM', index.prefix .. key_name, id) == 1 then rerank(index, key_name) end
end
