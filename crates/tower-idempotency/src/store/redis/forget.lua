-- forget: drop the record under KEYS[1] for an operator; a lease only when forced, waking its
-- waiters.
-- KEYS[1]  the record key
-- KEYS[2]  the key's notification channel (same hash slot)
-- KEYS[3]  the index of leases, on a standalone Redis only
-- ARGV[1]  '1' to drop a lease too, '0' otherwise
-- ARGV[2]  PUBLISH, or SPUBLISH on a Redis Cluster
-- Returns 1 when a completed record went, 3 when a lease went (forced), 0 when there was
-- none, 2 for a lease left in place.
local v = redis.call('GET', KEYS[1])
if not v then
  return 0
end
local lease = string.sub(v, 1, 1) == 'L'
if lease and ARGV[1] ~= '1' then
  return 2
end
redis.call('DEL', KEYS[1])
if lease then
  if KEYS[3] then
    redis.call('ZREM', KEYS[3], KEYS[1])
  end
  redis.call(ARGV[2], KEYS[2], 'r')
  return 3
end
return 1
