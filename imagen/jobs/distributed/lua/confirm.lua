-- The job's message is published: keep the job (1), or 0 when it already expired unconfirmed (it is gone).
-- A confirmed job enters its key's queue in the fair queue's index (one claimed by its own message before
-- this, confirmed by the claim, does not).
-- KEYS: job, waiting, unconfirmed, queue keys, queue sizes, key turns   ARGV: id, queue prefix
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('ZREM', KEYS[2], ARGV[1])
  redis.call('ZREM', KEYS[3], ARGV[1])
  return 0
end
if redis.call('HDEL', KEYS[1], 'unconfirmed') == 1 then
  redis.call('PERSIST', KEYS[1])
  local seq = redis.call('ZSCORE', KEYS[2], ARGV[1])
  if seq and redis.call('HGET', KEYS[1], 'state') == 'PENDING' then
    enqueue(queue_index(ARGV[2], KEYS[4], KEYS[5], KEYS[6]), ARGV[1], redis.call('HGET', KEYS[1], 'key_name') or '', seq)
  end
end
redis.call('ZREM', KEYS[3], ARGV[1])
return 1
