-- Add a PENDING job, unconfirmed: its record expires after ARGV[6] ms unless `confirm` (or a claim) keeps it.
-- KEYS: waiting, seq, job, unconfirmed   ARGV: id, task, output_name, now, max_queue, confirm_ms, job_prefix
if redis.call('EXISTS', KEYS[3]) == 1 then  -- the same submission sent twice (a client retry)
  local rank = redis.call('ZRANK', KEYS[1], ARGV[1])
  return {1, rank and rank + 1 or 1}
end
sweep_unconfirmed(KEYS[1], KEYS[4], ARGV[7])
local waiting = redis.call('ZCARD', KEYS[1])
if waiting >= tonumber(ARGV[5]) then return {0, waiting} end
local seq = redis.call('INCR', KEYS[2])
redis.call('HSET', KEYS[3], 'state', 'PENDING', 'task', ARGV[2], 'output_name', ARGV[3], 'attempts', 0,
           'seq', seq, 'created_at', ARGV[4], 'unconfirmed', 1)
redis.call('PEXPIRE', KEYS[3], ARGV[6])
redis.call('ZADD', KEYS[1], seq, ARGV[1])
redis.call('ZADD', KEYS[4], seq, ARGV[1])
return {1, redis.call('ZRANK', KEYS[1], ARGV[1]) + 1}
