-- One round trip per request: failed-auth throttle, key lookup (cached
-- identity), expiry/rotation, IP allowlist, per-key rate limit (GCRA) and
-- daily quota. Standalone Redis (keys are derived inside the script).
--
-- Many checks per call (coalesced requests): ARGV is the count, then 8
-- arguments per check; the reply is one result per check, in order.
-- Per check: 1 prefix, 2 key hash ("" = no key, "!" = malformed key), 3 client ip as hex (8 or 32
--       nibbles), 4 the client's throttle bucket (the address; for IPv6 its
--       prefix), 5 UTC date YYYY-MM-DD, 6 anonymous requests per day,
--       7 failed authentications per minute per bucket, 8 "0" for a first
--       check; after the caller filled the cache on a miss, "r" if that miss
--       reserved a failure slot (the reply's 2nd field said "r"), else "f";
--       "x" when the lookup after a reserving miss never finished (a
--       database error, too many lookups waiting, a client gone): the slot
--       and the pending marker are given back, nothing else is checked
-- Returns {code, identity json, limit, remaining, reset_ms, retry_after_ms,
--          quota_used, quota_limit}; code is one of
--   ok | anon_ok | miss | unauthorized | forbidden_ip | forbidden_throttled |
--   rate_limited | quota_exceeded | anon_limited | auth_throttled
-- rate_limited / quota_exceeded with shadow mode are still returned as such
-- (the caller decides); a rate-limited request does not use up capacity.
--
-- The failed-authentication throttle guards what costs a lookup or proves a
-- guess wrong, never a key that works: a valid cached key passes whatever
-- its address's neighbours did (a shared NAT is not locked out). A cache
-- miss reserves a failure slot *before* the caller's database lookup (so a
-- burst of unknown keys costs at most the budget in lookups), once per key
-- hash while its lookup is pending (concurrent misses of one key share the
-- lookup and the slot), and the re-check after the fill gives it back when
-- the key turned out valid.

-- (gcra.lua is prepended: it defines `now` and gcra())

local function check(prefix, key_hash, ip_hex, bucket, day, anon_per_day, fails_per_min, after)
  local filled, reserved = after ~= '0', after == 'r'
  local fails_key = prefix .. ':authfail:' .. bucket
  local pending = prefix .. ':lookup:' .. key_hash .. ':' .. bucket
  local function give_back()
    local tat = tonumber(redis.call('GET', fails_key) or '0')
    local back = tat - 60000 / fails_per_min
    if back > now then
      redis.call('SET', fails_key, back, 'PX', math.ceil(back - now) + 1000)
    else
      redis.call('DEL', fails_key)
    end
  end
  if after == 'x' then
    redis.call('DEL', pending)
    give_back()
    return {'miss', '', 0, 0, 0, 0, 0, -1}
  end
  if reserved then  -- this caller's lookup is done
    redis.call('DEL', pending)
  end
  local function throttled()
    local ok_f, _, _, retry_f = gcra(fails_key, fails_per_min, 60000, false)
    if ok_f then return nil end
    return {'auth_throttled', '', fails_per_min, 0, retry_f, retry_f, 0, -1}
  end
  -- a key that does not work: counted, unless the miss before the fill reserved it
  local function refused()
    if not reserved then
      local t = throttled()
      if t then return t end
      gcra(fails_key, fails_per_min, 60000, true)
    end
    return {'unauthorized', '', 0, 0, 0, 0, 0, -1}
  end

  -- is ip_hex inside network (hex, prefix length)?
  local function in_net(net_hex, bits)
    if #net_hex ~= #ip_hex then return false end
    local full = math.floor(bits / 4)
    if string.sub(ip_hex, 1, full) ~= string.sub(net_hex, 1, full) then return false end
    local rest = bits - full * 4
    if rest == 0 then return true end
    local div = 2 ^ (4 - rest)
    local a = tonumber(string.sub(ip_hex, full + 1, full + 1), 16)
    local b = tonumber(string.sub(net_hex, full + 1, full + 1), 16)
    return math.floor(a / div) == math.floor(b / div)
  end

  -- 1. anonymous: a daily allowance per bucket
  if key_hash == '' then
    local ok, remaining, reset, retry = gcra(prefix .. ':rl:anon:' .. bucket, anon_per_day, 86400000, true)
    return {ok and 'anon_ok' or 'anon_limited', '', anon_per_day, remaining, reset, retry, 0, -1}
  end

  -- 2. a key that failed its checksum at the edge: a failure, no lookup
  if key_hash == '!' then
    return refused()
  end

  -- 3. identity from the cache; the caller fills it on a miss
  -- "id3": the entry format (metering.accounts.cache.ENTRY_FORMAT); a new
  -- format gets a new name, so entries of another version are simply misses
  local raw = redis.call('GET', prefix .. ':id3:' .. key_hash)
  if not raw then
    if filled then  -- the fill did not land (a newer change won meanwhile): retry later
      return {'miss', '', 0, 0, 0, 0, 0, -1}
    end
    -- a key that worked lately is no guess: its misses (its entry expired)
    -- cost no slot, whatever the address's other clients spent
    if redis.call('EXISTS', prefix .. ':good:' .. key_hash) == 1 then
      return {'miss', '', 0, 0, 0, 0, 0, -1}
    end
    if not redis.call('SET', pending, '1', 'NX', 'PX', 5000) then
      return {'miss', '', 0, 0, 0, 0, 0, -1}  -- its lookup is under way: share its slot
    end
    local ok_f, _, _, retry_f = gcra(fails_key, fails_per_min, 60000, true)
    if not ok_f then
      redis.call('DEL', pending)
      return {'auth_throttled', '', fails_per_min, 0, retry_f, retry_f, 0, -1}
    end
    return {'miss', 'r', 0, 0, 0, 0, 0, -1}
  end
  if raw == '-' then
    return refused()
  end
  local id = cjson.decode(raw)
  if (id.expires_at ~= cjson.null and id.expires_at * 1000 <= now)
      or (id.status == 'rotating' and id.rotates_at ~= cjson.null and id.rotates_at * 1000 <= now) then
    return refused()
  end
  if reserved then  -- the key works: give back the slot its miss reserved
    give_back()
  end
  if filled then  -- and remember for a day that it works
    redis.call('SET', prefix .. ':good:' .. key_hash, '1', 'EX', 86400)
  end

  -- 4. IP allowlist: entries are "hex/bits", precomputed when the cache was filled
  if id.allow_hex ~= nil and id.allow_hex ~= cjson.null then
    local inside = false
    for _, entry in ipairs(id.allow_hex) do
      local slash = string.find(entry, '/', 1, true)
      if in_net(string.sub(entry, 1, slash - 1), tonumber(string.sub(entry, slash + 1))) then
        inside = true
        break
      end
    end
    if not inside then
      -- refused, but still limited per key and client address: a leaked key
      -- used from outside its allowlist cannot flood through its 403s
      local ok_x, _, _, retry_x = gcra(prefix .. ':rl:forbidden:' .. id.key_id .. ':' .. bucket,
                                       id.rate_limit_per_minute, 60000, true)
      if not ok_x then
        return {'forbidden_throttled', raw, 0, 0, 0, retry_x, 0, -1}
      end
      return {'forbidden_ip', raw, 0, 0, 0, 0, 0, -1}
    end
  end

  -- 5. daily quota from the counters the stream keeps (committed usage),
  --    before the rate limit: a refused request uses up no capacity
  local limit = id.rate_limit_per_minute
  -- per user, or per key lineage, as the tier says (limit_key)
  local rl_key = prefix .. ':rl:' .. id.limit_key
  local quota = id.daily_quota
  -- quota use = requests served: requests the edge refused do not count
  -- ('rejected' from the workers of this version; 'throttled' before them)
  local counts = redis.call('HMGET', prefix .. ':usage:' .. id.user_id .. ':' .. day,
                            'requests', 'throttled', 'rejected')
  local used = tonumber(counts[1] or '0') - tonumber(counts[3] or counts[2] or '0')
  local has_quota = quota ~= cjson.null and quota ~= nil
  if has_quota and used >= quota then
    local _, remaining_q, reset_q = gcra(rl_key, limit, 60000, false)
    return {'quota_exceeded', raw, limit, remaining_q, reset_q, 0, used, quota}
  end

  -- 6. per-key rate limit
  local ok, remaining, reset, retry = gcra(rl_key, limit, 60000, true)
  if not ok then
    -- in shadow mode the caller lets it through (without using up capacity)
    return {'rate_limited', raw, limit, 0, reset, retry, 0, -1}
  end
  return {'ok', raw, limit, remaining, reset, 0, used, has_quota and quota or -1}
end

local n, out = tonumber(ARGV[1]), {}
for i = 0, n - 1 do
  local b = 1 + i * 8
  out[i + 1] = check(ARGV[b + 1], ARGV[b + 2], ARGV[b + 3], ARGV[b + 4], ARGV[b + 5],
                     tonumber(ARGV[b + 6]), tonumber(ARGV[b + 7]), ARGV[b + 8])
end
return out
