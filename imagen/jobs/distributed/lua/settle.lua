-- Apply a verdict (decided in Python by lifecycle.AttemptPolicy) to a running job, if the record is still
-- what the caller read: same owner and attempts, and a lock as expected ('*': any, '': none, else its
-- holder). Returns 'applied' or 'conflict'. An uncounted verdict (a clean stop) takes the attempt back and
-- puts the job back at its own place in the queue (its submission's seq), not at the end.
-- A job back in the queue enters its key's queue in the fair queue's index.
-- KEYS: job, lock, running, waiting, seq, queue keys, queue sizes, key turns
-- ARGV: id, expected owner, expected attempts, lock guard, verdict state (PENDING|FAILURE), error, now, ttl_ms,
--       counted ('1' | '0'), queue prefix
local id = ARGV[1]
local state = redis.call('HGET', KEYS[1], 'state')
if (state ~= 'STARTED' and state ~= 'PROGRESS')
   or redis.call('HGET', KEYS[1], 'owner') ~= ARGV[2]
   or (redis.call('HGET', KEYS[1], 'attempts') or '0') ~= ARGV[3]
   or (ARGV[4] ~= '*' and (redis.call('GET', KEYS[2]) or '') ~= ARGV[4]) then
  return 'conflict'
end
redis.call('HSET', KEYS[1], 'state', ARGV[5], 'error', ARGV[6])
redis.call('HDEL', KEYS[1], 'owner', 'progress_step', 'progress')
redis.call('SREM', KEYS[3], id)
redis.call('DEL', KEYS[2])
local index = queue_index(ARGV[10], KEYS[6], KEYS[7], KEYS[8])
local key_name = redis.call('HGET', KEYS[1], 'key_name') or ''
if ARGV[5] == 'PENDING' and ARGV[9] == '0' then
  if tonumber(ARGV[3]) > 0 then redis.call('HINCRBY', KEYS[1], 'attempts', -1) end
  local seq = redis.call('HGET', KEYS[1], 'seq') or redis.call('INCR', KEYS[5])
  redis.call('ZADD', KEYS[4], seq, id)
  enqueue(index, id, key_name, seq)
elseif ARGV[5] == 'PENDING' then
  local seq = redis.call('INCR', KEYS[5])
  redis.call('ZADD', KEYS[4], seq, id)
  enqueue(index, id, key_name, seq)
else
  redis.call('HSET', KEYS[1], 'finished_at', ARGV[7])
  redis.call('PEXPIRE', KEYS[1], ARGV[8])
  redis.call('ZREM', KEYS[4], id)
  dequeue(index, id, key_name)
end
return 'applied'
