-- Removes relay A's pool record of one peer only if it is still the given one, so that a
-- process dropping an old generation of pairs never removes the newer pairs another process
-- stored meanwhile.
--
-- KEYS[1]  the pool record (a string)
-- ARGV[1]  the exact record text expected
--
-- Returns 1 when removed, 0 otherwise.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
