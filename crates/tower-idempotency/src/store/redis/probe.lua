-- probe: how long the live lease under KEYS[1] still lives, in milliseconds; -2 when there is
-- no lease (no record, or a completed one); -1 for a lease without an expiry (not this store's).
-- Used by wait() after subscribing.
if redis.call('GETRANGE', KEYS[1], 0, 0) == 'L' then
  return redis.call('PTTL', KEYS[1])
end
return -2
