-- An API replica says it is alive for ARGV[2] ms more (its copies count until then).
-- KEYS: replicas   ARGV: replica id, ttl_ms
redis.call('ZADD', KEYS[1], now_ms() + tonumber(ARGV[2]), ARGV[1])
return 1
