-- Start an attempt, if the record is still what the caller read (else 'conflict': read it again).
-- The caller decided from that record that the job may start here (see Attempts.claim), and which
-- waiting job is next (jobs.fairness, Attempts.claim_next). This records the job's key's new turn
-- (the fair queue's counter) and the broker message (ticket) that started the attempt.
-- The job leaves its key's queue in the fair queue's index, and the key is ranked by its new turn.
-- KEYS: job, lock, running, waiting, unconfirmed, key turns, turn counter, queue keys, queue sizes
-- ARGV: id, token, now, lock_ttl_ms, expected state, expected owner, expected attempts, expected lock holder,
--       ticket ('' : none), queue prefix
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
if ARGV[9] ~= '' then redis.call('HSET', KEYS[1], 'ticket', ARGV[9]) end
-- Workers pick confirmed jobs only; a job claimed by its id (a takeover) was confirmed when it first ran.
if redis.call('HDEL', KEYS[1], 'unconfirmed') == 1 then redis.call('PERSIST', KEYS[1]) end
redis.call('ZREM', KEYS[5], id)
redis.call('ZREM', KEYS[4], id)
redis.call('SADD', KEYS[3], id)
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[4])
local key_name = redis.call('HGET', KEYS[1], 'key_name') or ''
local index = queue_index(ARGV[10], KEYS[8], KEYS[9], KEYS[6])
redis.call('ZREM', index.prefix .. key_name, id)
redis.call('HSET', KEYS[6], key_name, redis.call('INCR', KEYS[7]))
rerank(index, key_name)
return {'claimed', attempts}
