-- KEYS: waiting, unconfirmed   ARGV: job_prefix
return sweep_unconfirmed(KEYS[1], KEYS[2], ARGV[1])
