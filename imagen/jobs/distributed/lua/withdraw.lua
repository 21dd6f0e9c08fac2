-- Undo a submission whose message could not be published (only while it is still unconfirmed): the record,
-- its place in the queue and the owner of its output name.
-- KEYS: job, waiting, unconfirmed, output owners   ARGV: id
if redis.call('HGET', KEYS[1], 'unconfirmed') then
  local name = redis.call('HGET', KEYS[1], 'output_name')
  if name then redis.call('HDEL', KEYS[4], name) end
  redis.call('DEL', KEYS[1])
  redis.call('ZREM', KEYS[2], ARGV[1])
end
redis.call('ZREM', KEYS[3], ARGV[1])
return 1
