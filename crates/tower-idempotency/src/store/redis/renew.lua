-- renew: extend the caller's lease, and tell the waiters its new lifetime so that they keep
-- waiting instead of waking at the old expiry.
-- KEYS[1]  the record key
-- KEYS[2]  the key's notification channel (same hash slot)
-- ARGV[1]  'L' .. owner token (16 bytes): the caller's lease prefix
-- ARGV[2]  the new lease TTL in milliseconds
-- ARGV[3]  PUBLISH, or SPUBLISH on a Redis Cluster
-- Returns 1, or 0 (changing nothing) when the caller no longer owns a live lease.
if redis.call('GETRANGE', KEYS[1], 0, 16) ~= ARGV[1] then
  return 0
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call(ARGV[3], KEYS[2], 'n' .. ARGV[2])
return 1
