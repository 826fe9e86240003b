-- inspect: the value under KEYS[1], its PTTL, and Redis's clock in milliseconds since the
-- epoch, for operators; nil when there is no record.
local v = redis.call('GET', KEYS[1])
if not v then
  return nil
end
local t = redis.call('TIME')
return {v, redis.call('PTTL', KEYS[1]), string.format('%d', t[1] * 1000 + math.floor(t[2] / 1000))}
