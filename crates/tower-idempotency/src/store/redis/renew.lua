-- renew: extend the caller's lease, and tell the waiters its new lifetime so that they keep
-- waiting instead of waking at the old expiry.
-- KEYS[1]  the record key
-- KEYS[2]  the key's notification channel (same hash slot)
-- KEYS[3]  the index of leases, on a standalone Redis only: the lease is filed again, so that
--          an entry the listing dropped while the key changed hands comes back
-- ARGV[1]  'L' .. owner token (16 bytes): the caller's lease prefix
-- ARGV[2]  the new lease TTL in milliseconds
-- ARGV[3]  PUBLISH, or SPUBLISH on a Redis Cluster
-- Returns 1, or 0 (changing nothing) when the caller no longer owns a live lease.
local v = redis.call('GET', KEYS[1])
if not v or string.sub(v, 1, 17) ~= ARGV[1] then
  return 0
end
local granted, renewals = string.match(string.sub(v, 50), '^(%d+),(%d+)$')
if granted then
  redis.call('SET', KEYS[1], string.sub(v, 1, 49) .. granted .. ',' .. (tonumber(renewals) + 1), 'PX', ARGV[2])
else
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
if KEYS[3] then
  redis.call('ZADD', KEYS[3], 0, KEYS[1])
end
redis.call(ARGV[3], KEYS[2], 'n' .. ARGV[2])
return 1
