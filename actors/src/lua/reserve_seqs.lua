-- Reserves a block of sequence numbers of one pair for one relay A process.
--
-- The counter is the field `reserved` of the pair record itself, so nothing (expiry, eviction,
-- removal) can drop the counter and keep the keys: a lost counter would hand out old numbers.
--
-- KEYS[1]  the pair record (a hash)
-- ARGV[1]  block size
-- ARGV[2]  time to live in milliseconds, set on the record
--
-- Returns the last number of the block (the block is last - size + 1 .. last), or -1 when the
-- record does not exist.
if redis.call('EXISTS', KEYS[1]) == 0 then
  return -1
end
local last = redis.call('HINCRBY', KEYS[1], 'reserved', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return last
