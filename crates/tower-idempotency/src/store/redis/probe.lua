-- probe: how long the live lease under KEYS[1] still lives, in milliseconds, or -2 when there
-- is no lease (no record, or a completed one). Used by wait() after subscribing.
if redis.call('GETRANGE', KEYS[1], 0, 0) == 'L' then
  return redis.call('PTTL', KEYS[1])
end
return -2
