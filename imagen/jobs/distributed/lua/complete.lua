-- SUCCESS: the record, the PNG (kept for the API replicas to copy) and its announcement, if still the owner.
-- Past max_bytes of PNGs, the oldest others go first (a replica that has not copied one by then answers 404).
-- KEYS: job, lock, running, waiting, png, stream, png sizes, png order, png bytes
-- ARGV: id, token, result, png, now, ttl_ms, png_ttl_ms, output_name, stream_maxlen, max_bytes, png_prefix,
--       copies_prefix, then name, png, name, png, ... (a num_images job's other images)
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], 'state', 'SUCCESS', 'result', ARGV[3], 'finished_at', ARGV[5])
redis.call('HDEL', KEYS[1], 'owner', 'progress_step', 'progress', 'error')
redis.call('PEXPIRE', KEYS[1], ARGV[6])
redis.call('DEL', KEYS[2])
redis.call('SREM', KEYS[3], ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[1])
local now = now_ms()
-- PNGs past their TTL are gone already; take them out of the index.
for _, old in ipairs(redis.call('ZRANGEBYSCORE', KEYS[8], '-inf', now - tonumber(ARGV[7]))) do
  drop_png(old, ARGV[11], ARGV[12], KEYS[7], KEYS[8], KEYS[9])
end
-- The job's images: (output_name, png), then the other images of a num_images job as name, png pairs.
local images = {{ARGV[8], ARGV[4]}}
for i = 13, #ARGV - 1, 2 do images[#images + 1] = {ARGV[i], ARGV[i + 1]} end
local max_bytes = tonumber(ARGV[10])
for _, image in ipairs(images) do
  local name, png = image[1], image[2]
  local size = string.len(png)
  if redis.call('HEXISTS', KEYS[7], name) == 1 then drop_png(name, ARGV[11], ARGV[12], KEYS[7], KEYS[8], KEYS[9]) end
  local total = tonumber(redis.call('GET', KEYS[9]) or '0')
  while total + size > max_bytes do
    local oldest = redis.call('ZRANGE', KEYS[8], 0, 0)[1]
    if not oldest then break end
    drop_png(oldest, ARGV[11], ARGV[12], KEYS[7], KEYS[8], KEYS[9])
    total = tonumber(redis.call('GET', KEYS[9]) or '0')
  end
  redis.call('SET', ARGV[11] .. name, png, 'PX', ARGV[7])
  redis.call('HSET', KEYS[7], name, size)
  redis.call('ZADD', KEYS[8], now, name)
  redis.call('INCRBY', KEYS[9], size)
  redis.call('XADD', KEYS[6], 'MAXLEN', '~', ARGV[9], '*', 'job_id', ARGV[1], 'output_name', name)
end
return 1
