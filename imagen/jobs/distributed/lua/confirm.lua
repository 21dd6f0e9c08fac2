-- The job's message is published: keep the job (1), or 0 when it already expired unconfirmed (it is gone).
-- KEYS: job, waiting, unconfirmed   ARGV: id
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('ZREM', KEYS[2], ARGV[1])
  redis.call('ZREM', KEYS[3], ARGV[1])
  return 0
end
if redis.call('HDEL', KEYS[1], 'unconfirmed') == 1 then redis.call('PERSIST', KEYS[1]) end
redis.call('ZREM', KEYS[3], ARGV[1])
return 1
