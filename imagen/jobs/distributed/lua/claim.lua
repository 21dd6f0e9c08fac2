-- Start an attempt, if the record is still what the caller read (else 'conflict': read it again).
-- The caller decided from that record that the job may start here (see RedisJobStore.claim).
-- KEYS: job, lock, running, waiting, unconfirmed
-- ARGV: id, token, now, lock_ttl_ms, expected state, expected owner, expected attempts, expected lock holder
local id = ARGV[1]
if redis.call('HGET', KEYS[1], 'state') ~= ARGV[5]
   or (redis.call('HGET', KEYS[1], 'owner') or '') ~= ARGV[6]
   or (redis.call('HGET', KEYS[1], 'attempts') or '0') ~= ARGV[7]
   or (redis.call('GET', KEYS[2]) or '') ~= ARGV[8] then
  return {'conflict'}
end
local attempts = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('HSET', KEYS[1], 'state', 'STARTED', 'owner', ARGV[2], 'started_at', ARGV[3])
redis.call('HDEL', KEYS[1], 'progress_step', 'progress')
-- A worker holds the message, so it was published: the job is confirmed whatever the API heard.
if redis.call('HDEL', KEYS[1], 'unconfirmed') == 1 then redis.call('PERSIST', KEYS[1]) end
redis.call('ZREM', KEYS[5], id)
redis.call('ZREM', KEYS[4], id)
redis.call('SADD', KEYS[3], id)
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[4])
return {'claimed', attempts}
