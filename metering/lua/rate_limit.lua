-- (gcra.lua is prepended: it defines `now` and gcra())
-- Standalone rate limit check: KEYS[1] bucket; ARGV: limit, period_ms, cost (0 = peek).
-- Returns {allowed 0/1, remaining, reset_ms, retry_after_ms}.
local ok, remaining, reset, retry = gcra(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3] ~= '0')
return {ok and 1 or 0, remaining, reset, retry}
