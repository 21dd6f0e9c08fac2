-- The fair queue's next confirmed job and its key: the oldest job of the first key of the index (jobs.fairness),
-- or nil when no confirmed job waits. Read in one step: the index never lists a key with no job waiting.
-- KEYS: queue keys   ARGV: queue prefix
local first = redis.call('ZRANGE', KEYS[1], 0, 0)[1]
if not first then return false end
local head = redis.call('ZRANGE', ARGV[1] .. first, 0, 0)[1]
if not head then return false end
return {head, first}
