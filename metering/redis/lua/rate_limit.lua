-- (gcra.lua is prepended: it defines `now` and gcra())
-- Rate limit checks, many per call (coalesced callers): ARGV is the count,
-- then per check: bucket key, limit, period_ms, cost (0 = peek: would one request pass?).
-- Returns one {allowed 0/1, remaining, reset_ms, retry_after_ms} per check.
local n, out = tonumber(ARGV[1]), {}
for i = 0, n - 1 do
  local b = 1 + i * 4
  local cost = tonumber(ARGV[b + 4])
  local ok, remaining, reset, retry = gcra(ARGV[b + 1], tonumber(ARGV[b + 2]),
                                           tonumber(ARGV[b + 3]), cost > 0, math.max(cost, 1))
  out[i + 1] = {ok and 1 or 0, remaining, reset, retry}
end
return out
