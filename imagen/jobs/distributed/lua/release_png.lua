-- A replica copied PNG ARGV[1] (replica ARGV[2]; '' to only check): delete it once every live replica has a
-- copy. The first copy starts its expiry (ARGV[3]): a replica that is alive but does not copy it (its disk
-- full for long) holds it back that long at most, since another replica has it. A PNG no replica has copied
-- has no expiry. Returns 1 when the PNG is (now) gone from Redis.
-- KEYS: png, copies, replicas, png sizes, png order, png bytes, png uncopied, png uncopied bytes
-- ARGV: name, replica id, png_ttl_ms, png_prefix, copies_prefix
local name = ARGV[1]
local index = png_index(ARGV[4], ARGV[5], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8])
if redis.call('EXISTS', KEYS[1]) == 0 then
  drop_png(name, index)
  return 1
end
if ARGV[2] ~= '' then
  redis.call('SADD', KEYS[2], ARGV[2])
  if redis.call('ZREM', index.uncopied, name) == 1 then
    redis.call('DECRBY', index.uncopied_total, tonumber(redis.call('HGET', index.sizes, name) or '0'))
    redis.call('ZADD', index.order, now_ms(), name)
    redis.call('PEXPIRE', KEYS[1], ARGV[3])
    redis.call('PEXPIRE', KEYS[2], ARGV[3])
  end
end
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now_ms())
local live = redis.call('ZRANGE', KEYS[3], 0, -1)
if #live == 0 then return 0 end  -- no replica up: keep it for the next one
for _, replica in ipairs(live) do
  if redis.call('SISMEMBER', KEYS[2], replica) == 0 then return 0 end
end
drop_png(name, index)
return 1
