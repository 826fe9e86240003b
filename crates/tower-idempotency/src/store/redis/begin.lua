-- begin: find the completed record, report the request in flight, or grant a lease.
-- KEYS[1]  the record key
-- KEYS[2]  the index of leases (a sorted set of record keys), on a standalone Redis only; a
--          Redis Cluster keeps its index apart, as it lives in other slots
-- ARGV[1]  'L' .. owner token (16 bytes) .. fingerprint (32 bytes)
-- ARGV[2]  the lease TTL in milliseconds
-- A lease is stored as ARGV[1] followed by '<granted, ms since the epoch by Redis's clock>,
-- <renewals>' for operators.
-- Returns nil when the lease was granted, 'C' .. record when completed, 'L' .. fingerprint
-- when another owner holds a live lease (the owner's token never leaves Redis), or 'E' for a
-- lease without an expiry: not one this store wrote (each of its leases has a TTL), so nobody
-- would ever release it.
local v = redis.call('GET', KEYS[1])
if v then
  if string.sub(v, 1, 1) == 'L' then
    if redis.call('PTTL', KEYS[1]) < 0 then
      return 'E'
    end
    return 'L' .. string.sub(v, 18, 49)
  end
  return v
end
local t = redis.call('TIME')
local granted = string.format('%d', t[1] * 1000 + math.floor(t[2] / 1000))
redis.call('SET', KEYS[1], ARGV[1] .. granted .. ',0', 'PX', ARGV[2])
if KEYS[2] then
  redis.call('ZADD', KEYS[2], 0, KEYS[1])
end
return false
