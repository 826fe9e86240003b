-- release: drop the caller's lease so the next attempt runs, and wake the waiters.
-- KEYS[1]  the record key
-- KEYS[2]  the key's notification channel (same hash slot)
-- KEYS[3]  the index of leases, on a standalone Redis only
-- ARGV[1]  'L' .. owner token (16 bytes): the caller's lease prefix
-- ARGV[2]  PUBLISH, or SPUBLISH on a Redis Cluster
-- Returns 1, or 0 (changing nothing) when the caller no longer owns a live lease.
if redis.call('GETRANGE', KEYS[1], 0, 16) ~= ARGV[1] then
  return 0
end
redis.call('DEL', KEYS[1])
if KEYS[3] then
  redis.call('ZREM', KEYS[3], KEYS[1])
end
redis.call(ARGV[2], KEYS[2], 'r')
return 1
