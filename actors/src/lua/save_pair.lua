-- Creates a pair record unless the key is taken, so a pairing can never overwrite a live pair.
--
-- KEYS[1]  the pair record (a hash)
-- KEYS[2]  relay B only: the pair's replay bitmap, removed in case a stale one is left
-- ARGV[1]  time to live in milliseconds
-- ARGV[2..] field, value, field, value, ... of the record
--
-- Returns 1 when the record was created, 0 when the key already existed.
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
if KEYS[2] then
  redis.call('DEL', KEYS[2])
end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return 1
