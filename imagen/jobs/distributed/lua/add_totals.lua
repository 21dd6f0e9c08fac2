-- Add to the cluster's job totals (totals.py): one call for a job's whole event (a finished job adds to some
-- forty histogram fields; as separate commands they cost more than the job's own claim and completion).
-- KEYS: the totals hash   ARGV: field, increment, field, increment, ...
for i = 1, #ARGV, 2 do
  redis.call('HINCRBYFLOAT', KEYS[1], ARGV[i], ARGV[i + 1])
end
return #ARGV / 2
