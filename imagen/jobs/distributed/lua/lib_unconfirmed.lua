-- Prelude: a submission is "unconfirmed" until its broker message is published. Its record carries a short
-- Redis expiry until then; this drops the waiting-set entries of those that expired unconfirmed.
local function sweep_unconfirmed(waiting, unconfirmed, job_prefix)
  local removed = 0
  for _, id in ipairs(redis.call('ZRANGE', unconfirmed, 0, -1)) do
    if redis.call('EXISTS', job_prefix .. id) == 0 then
      redis.call('ZREM', waiting, id)
      redis.call('ZREM', unconfirmed, id)
      removed = removed + 1
    end
  end
  return removed
end
