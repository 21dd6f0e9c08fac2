-- A waiting job's place in the fair order (1 = next), or nil when it is not waiting: its index within its
-- key's queue plus, for each other key with jobs waiting, as many of that key's jobs as start before it (its
-- index, one more when that key ranks before the job's own, never more than it has waiting). Computed here,
-- not in the caller, so that a position sends no list of keys over the network: the loop is over the keys with
-- jobs waiting, never over the jobs. jobs.fairness states the rule; the store tests hold this to it.
-- A submission not confirmed yet is not in its key's queue: it gets the place it will have once confirmed.
-- KEYS: job, waiting, key turns, queue keys, queue sizes   ARGV: id, queue prefix, the waiting state
local fields = redis.call('HMGET', KEYS[1], 'state', 'key_name')
if fields[1] ~= ARGV[3] then return false end
local seq_text = redis.call('ZSCORE', KEYS[2], ARGV[1])
if not seq_text then return false end
local seq = tonumber(seq_text)
local key_name = fields[2] or ''
local queue = ARGV[2] .. key_name
local index = redis.call('ZCOUNT', queue, '-inf', '(' .. seq_text)
local oldest = seq
local head = redis.call('ZRANGE', queue, 0, 0, 'WITHSCORES')
if head[2] and tonumber(head[2]) < oldest then oldest = tonumber(head[2]) end
local rank = key_rank(KEYS[3], key_name, function() return oldest end)
local waiting = {}
local sizes = redis.call('HGETALL', KEYS[5])
for i = 1, #sizes, 2 do waiting[sizes[i]] = tonumber(sizes[i + 1]) end
local ahead = index
local ranked = redis.call('ZRANGE', KEYS[4], 0, -1, 'WITHSCORES')
for i = 1, #ranked, 2 do
  if ranked[i] ~= key_name then
    local before = index
    if tonumber(ranked[i + 1]) < rank then before = index + 1 end
    ahead = ahead + math.min(before, waiting[ranked[i]] or 0)
  end
end
return ahead + 1
