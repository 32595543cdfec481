-- The edge's identity cache, written in version order.
-- KEYS[1] the entry (identity JSON, or "-" for a key that does not work)
-- KEYS[2] the highest version written for that key hash
-- ARGV[1] fill | set | invalidate
--   fill: an edge's cache miss; only when the entry is absent
--   set: a lifecycle change's refresh, after its commit
--   invalidate: before a lifecycle change commits; deletes the entry and
--               raises the version so a fill from a read older than the
--               commit is refused (the edge answers 503, retry, meanwhile)
-- ARGV[2] version (from api_keys.version; 0 for a hash with no key)
-- ARGV[3] value, ARGV[4] its TTL in seconds, ARGV[5] the version's TTL
-- Returns -1 when refused (an older version, or fill over an entry); else the
-- version known before this write (0: none), which invalidate's caller keeps
-- to give back if its change rolls back (identity_release.lua).
local known = tonumber(redis.call('GET', KEYS[2]) or '0')
local version = tonumber(ARGV[2])
if version < known then
  return -1
end
if ARGV[1] == 'invalidate' then
  redis.call('DEL', KEYS[1])
elseif ARGV[1] == 'fill' and redis.call('EXISTS', KEYS[1]) == 1 then
  return -1
else
  redis.call('SET', KEYS[1], ARGV[3], 'EX', tonumber(ARGV[4]))
end
-- version 0 (no such key) orders nothing: no version key for probes of unknown hashes
if version > 0 and (version > known or redis.call('TTL', KEYS[2]) < tonumber(ARGV[5])) then
  redis.call('SET', KEYS[2], version, 'EX', tonumber(ARGV[5]))
end
return known
