-- SUCCESS: the record, the PNGs (kept for the API replicas to copy) and their announcements, if still the owner.
-- A new PNG has no expiry: it stays until an API replica has copied it (release_png.lua). To make room past
-- max_bytes, the oldest PNGs that a replica has copied go first (another replica that lacks one answers 404
-- for it); a PNG that no replica has is never dropped. While those fill max_bytes, the API refuses new jobs
-- and workers start none (Pngs.backlog_full).
-- KEYS: job, lock, running, waiting, stream, png sizes, png order, png bytes, png uncopied, png uncopied bytes
-- ARGV: id, token, result, now, ttl_ms, stream_maxlen, max_bytes, png_prefix, copies_prefix, n, then n record
--       fields, then name, png, name, png, ... (the job's images, its output_name first)
-- Answers {0} when this worker no longer owns the job, else {1, the record's n fields as written}: what the
-- job's totals are counted from, without another round trip.
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[2] then return {0} end
local field_count = tonumber(ARGV[10])
redis.call('HSET', KEYS[1], 'state', 'SUCCESS', 'result', ARGV[3], 'finished_at', ARGV[4])
redis.call('HDEL', KEYS[1], 'owner', 'progress_step', 'progress', 'error')
redis.call('PEXPIRE', KEYS[1], ARGV[5])
redis.call('DEL', KEYS[2])
redis.call('SREM', KEYS[3], ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[1])
local index = png_index(ARGV[8], ARGV[9], KEYS[6], KEYS[7], KEYS[8], KEYS[9], KEYS[10])
local now = now_ms()
local max_bytes = tonumber(ARGV[7])
for i = 11 + field_count, #ARGV - 1, 2 do
  local name, png = ARGV[i], ARGV[i + 1]
  local size = string.len(png)
  if redis.call('HEXISTS', index.sizes, name) == 1 then drop_png(name, index) end
  local total = tonumber(redis.call('GET', index.total) or '0')
  while total + size > max_bytes do
    local oldest = redis.call('ZRANGE', index.order, 0, 0)[1]
    if not oldest then break end
    drop_png(oldest, index)
    total = tonumber(redis.call('GET', index.total) or '0')
  end
  redis.call('SET', index.png .. name, png)
  redis.call('HSET', index.sizes, name, size)
  redis.call('ZADD', index.uncopied, now, name)
  redis.call('INCRBY', index.total, size)
  redis.call('INCRBY', index.uncopied_total, size)
  redis.call('XADD', KEYS[5], 'MAXLEN', '~', ARGV[6], '*', 'job_id', ARGV[1], 'output_name', name)
end
local fields = {}
for i = 11, 10 + field_count do fields[#fields + 1] = ARGV[i] end
return {1, redis.call('HMGET', KEYS[1], unpack(fields))}
