-- unfile: drop record keys that hold no lease from the index of leases (standalone Redis),
-- in the same step as the look, so that a lease taken meanwhile stays filed.
-- KEYS[1]      the index of leases
-- KEYS[2..n]   record keys the listing found holding no lease
-- Returns how many were dropped.
local dropped = 0
for i = 2, #KEYS do
  if redis.call('GETRANGE', KEYS[i], 0, 0) ~= 'L' then
    dropped = dropped + redis.call('ZREM', KEYS[1], KEYS[i])
  end
end
return dropped
