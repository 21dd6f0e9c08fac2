-- Apply the cancel rule (lifecycle.cancel_verdict, decided in Python from the state read) if the job is still
-- in that state; else 'conflict' (read it again). A waiting job leaves the queue: a message that still
-- arrives for it is dropped by the claim (the job is over). A running job loses its owner: its worker's next
-- progress write answers 'cancelled' and it stops there. The lock expires on its own.
-- KEYS: job, waiting, running, queue keys, queue sizes, key turns
-- ARGV: id, expected state, new state (REVOKED), error, now, ttl_ms, queue prefix
if redis.call('HGET', KEYS[1], 'state') ~= ARGV[2] then return 'conflict' end
redis.call('HSET', KEYS[1], 'state', ARGV[3], 'error', ARGV[4], 'finished_at', ARGV[5])
redis.call('HDEL', KEYS[1], 'owner', 'progress_step', 'progress')
redis.call('PEXPIRE', KEYS[1], ARGV[6])
redis.call('ZREM', KEYS[2], ARGV[1])
dequeue(queue_index(ARGV[7], KEYS[4], KEYS[5], KEYS[6]), ARGV[1], redis.call('HGET', KEYS[1], 'key_name') or '')
redis.call('SREM', KEYS[3], ARGV[1])
return 'applied'
