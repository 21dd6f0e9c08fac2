-- 'recorded'; 'cancelled' when the job was revoked (its worker stops at once); 'lost' when it is no longer
-- the caller's (taken back by the reaper).
-- KEYS: job   ARGV: token, step, percent, revoked state, denoising (JSON or '')
if redis.call('HGET', KEYS[1], 'state') == ARGV[4] then return 'cancelled' end
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return 'lost' end
redis.call('HSET', KEYS[1], 'state', 'PROGRESS', 'progress_step', ARGV[2], 'progress', ARGV[3], 'denoising', ARGV[5])
return 'recorded'
