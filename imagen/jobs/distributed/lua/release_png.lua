-- A replica copied PNG ARGV[1] (ARGV[2]; '' to only check): delete it once every live replica has, or when
-- it expired. Returns 1 when the PNG is (now) gone from Redis.
-- KEYS: png, copies, replicas, png sizes, png order, png bytes
-- ARGV: name, replica id, png_ttl_ms, png_prefix, copies_prefix
local name = ARGV[1]
if redis.call('EXISTS', KEYS[1]) == 0 then
  drop_png(name, ARGV[4], ARGV[5], KEYS[4], KEYS[5], KEYS[6])
  return 1
end
if ARGV[2] ~= '' then
  redis.call('SADD', KEYS[2], ARGV[2])
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
end
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now_ms())
local live = redis.call('ZRANGE', KEYS[3], 0, -1)
if #live == 0 then return 0 end  -- no replica up: keep it for the next one (until its TTL)
for _, replica in ipairs(live) do
  if redis.call('SISMEMBER', KEYS[2], replica) == 0 then return 0 end
end
drop_png(name, ARGV[4], ARGV[5], KEYS[4], KEYS[5], KEYS[6])
return 1
