-- Shared by the edge and limiter scripts (prepended to them when loaded).
-- GCRA (the generic cell rate algorithm, a token bucket kept as one
-- timestamp): `limit` requests per `period_ms`, bursts up to `limit`.
-- State is one key holding the "theoretical arrival time"; O(1) memory.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

-- GCRA: `limit` requests per `period_ms`, bursts up to `limit`; a request
-- weighs `cost` (default 1) of them. Without `consume` nothing is used up.
-- Returns allowed, remaining, reset_ms (until the bucket is full again), retry_after_ms.
local function gcra(key, limit, period_ms, consume, cost)
  local interval = period_ms / limit
  local tat = tonumber(redis.call('GET', key) or now)
  if tat < now then tat = now end
  local new_tat = tat + interval * (cost or 1)
  local allow_at = new_tat - period_ms
  if allow_at > now then
    return false, 0, math.ceil(tat - now), math.ceil(allow_at - now)
  end
  if consume then
    redis.call('SET', key, new_tat, 'PX', math.ceil(new_tat - now) + 1000)
  end
  local remaining = math.floor((now - allow_at) / interval)
  return true, remaining, math.ceil(new_tat - now), 0
end

