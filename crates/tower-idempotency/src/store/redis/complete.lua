-- complete: replace the caller's lease with the completed record and wake the waiters.
-- KEYS[1]  the record key
-- KEYS[2]  the key's notification channel (same hash slot)
-- KEYS[3]  the index of leases, on a standalone Redis only
-- ARGV[1]  'L' .. owner token (16 bytes): the caller's lease prefix
-- ARGV[2]  'C' .. encoded record
-- ARGV[3]  the record TTL in milliseconds
-- ARGV[4]  PUBLISH, or SPUBLISH on a Redis Cluster
-- Returns 1; 2 when exactly this record is stored already (a repeated completion whose first
-- attempt landed but whose answer was lost); or 0, changing nothing, when the caller no longer
-- owns a live lease.
local head = redis.call('GETRANGE', KEYS[1], 0, 16)
if head ~= ARGV[1] then
  if string.sub(head, 1, 1) == 'C' and redis.call('GET', KEYS[1]) == ARGV[2] then
    return 2
  end
  return 0
end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
if KEYS[3] then
  redis.call('ZREM', KEYS[3], KEYS[1])
end
redis.call(ARGV[4], KEYS[2], 'c')
return 1
