-- A lifecycle change that invalidated a cache entry and then rolled back
-- gives the version back, if no later change raised it meanwhile.
-- KEYS[1] the version key, ARGV[1] the version the change had written.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
