-- begin: find the completed record, report the request in flight, or grant a lease.
-- KEYS[1]  the record key
-- ARGV[1]  the lease value: 'L' .. owner token (16 bytes) .. fingerprint (32 bytes)
-- ARGV[2]  the lease TTL in milliseconds
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
    return 'L' .. string.sub(v, 18)
  end
  return v
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return false
