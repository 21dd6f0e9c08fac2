-- Undo a submission whose message could not be published (only while it is still unconfirmed).
-- KEYS: job, waiting, unconfirmed   ARGV: id
if redis.call('HGET', KEYS[1], 'unconfirmed') then
  redis.call('DEL', KEYS[1])
  redis.call('ZREM', KEYS[2], ARGV[1])
end
redis.call('ZREM', KEYS[3], ARGV[1])
return 1
