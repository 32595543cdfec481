-- A lifecycle change that invalidated a cache entry and then rolled back
-- puts the version it replaced back, if no later change raised it meanwhile.
-- KEYS[1] the version key; ARGV[1] the version the change wrote,
-- ARGV[2] the one it replaced (0: none), ARGV[3] the version's TTL.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
if tonumber(ARGV[2]) == 0 then
  redis.call('DEL', KEYS[1])
else
  redis.call('SET', KEYS[1], ARGV[2], 'EX', tonumber(ARGV[3]))
end
return 1
