-- Add a PENDING job, unconfirmed: its record expires after ARGV[6] ms unless `confirm` (or a claim) keeps it.
-- The limits are checked first, in this order: max_queue (all waiting jobs; answer {0, waiting}), then the
-- per-key limit when one is given (the waiting jobs of this key; answer {2, waiting of the key}). Accepted:
-- {1}; the output files' owner is recorded for as long as the files may exist. The job's input images are
-- fields of its record ("input:<role>"), so they live and expire with it (never read by /status).
-- It enters the fair queue's index when it is confirmed (confirm.lua).
-- KEYS: waiting, seq, job, unconfirmed, output owners, queue sizes
-- ARGV: id, task, output_name, now, max_queue, confirm_ms, job_prefix, key_name, key_max_waiting ('': none),
--       all output names (space-separated), then role, png, role, png, ... (the input images)
if redis.call('EXISTS', KEYS[3]) == 1 then return {1} end  -- the same submission sent twice (a client retry)
sweep_unconfirmed(KEYS[1], KEYS[4], ARGV[7])
local waiting = redis.call('ZCARD', KEYS[1])
if waiting >= tonumber(ARGV[5]) then return {0, waiting} end
if ARGV[9] ~= '' then
  -- The key's confirmed waiting jobs (the fair queue's index), and its submissions not confirmed yet.
  local mine = tonumber(redis.call('HGET', KEYS[6], ARGV[8]) or '0')
  for _, id in ipairs(redis.call('ZRANGE', KEYS[4], 0, -1)) do
    if (redis.call('HGET', ARGV[7] .. id, 'key_name') or '') == ARGV[8] then mine = mine + 1 end
  end
  if mine >= tonumber(ARGV[9]) then return {2, mine} end
end
local seq = redis.call('INCR', KEYS[2])
redis.call('HSET', KEYS[3], 'state', 'PENDING', 'task', ARGV[2], 'output_name', ARGV[3], 'attempts', 0,
           'seq', seq, 'created_at', ARGV[4], 'key_name', ARGV[8], 'unconfirmed', 1)
-- Its model, read by the claims that prefer a worker's held models (jobs.affinity) without the whole task.
local model = cjson.decode(ARGV[2]).model
redis.call('HSET', KEYS[3], 'model', type(model) == 'string' and model or '')
redis.call('PEXPIRE', KEYS[3], ARGV[6])
redis.call('ZADD', KEYS[1], seq, ARGV[1])
redis.call('ZADD', KEYS[4], seq, ARGV[1])
for name in string.gmatch(ARGV[10], '%S+') do redis.call('HSET', KEYS[5], name, ARGV[8]) end
for i = 11, #ARGV - 1, 2 do redis.call('HSET', KEYS[3], 'input:' .. ARGV[i], ARGV[i + 1]) end
return {1}
