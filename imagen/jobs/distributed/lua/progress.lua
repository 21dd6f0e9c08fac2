-- KEYS: job   ARGV: token, step, percent
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'state', 'PROGRESS', 'progress_step', ARGV[2], 'progress', ARGV[3])
return 1
