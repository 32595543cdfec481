-- Write committed daily totals for one (user, day) counter, never going back.
-- KEYS[1] counter hash; ARGV: requests, units, errors, throttled, rejected, expire_at (unix s).
-- Totals only grow, so "keep the larger" makes replays and races harmless:
-- an older total arriving late (rebalance, rebuild) cannot undo a newer one.
local current = tonumber(redis.call('HGET', KEYS[1], 'requests') or '-1')
if tonumber(ARGV[1]) > current then
  redis.call('HSET', KEYS[1], 'requests', ARGV[1], 'units', ARGV[2], 'errors', ARGV[3],
             'throttled', ARGV[4], 'rejected', ARGV[5])
end
redis.call('EXPIREAT', KEYS[1], ARGV[6])
return current
