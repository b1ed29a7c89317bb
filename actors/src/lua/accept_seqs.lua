-- Checks sequence numbers of relay B against a pair's replay window and marks them, in one
-- atomic step, so two relay B processes can never both accept the same number. The numbers are
-- checked in the order given, and each gets its own outcome, exactly as one call per number
-- would.
--
-- The window is the highest accepted number (field `highest` of the pair record) plus a bitmap
-- of `size` bits used as a ring: bit `seq % size` stands for `seq`. A number above `highest`
-- moves the window forward and clears the bits of the numbers it skipped. A number at or below
-- `highest` is accepted if it is less than `size` below it and its bit is clear. This matches
-- the in-memory ReplayWindow of the protocol crate.
--
-- If the bitmap is missing while `highest` is set (evicted under memory pressure), nothing is
-- known any more about the numbers up to `highest`. The field `floor` then records `highest`,
-- and every number up to `floor` is rejected as stale from then on.
--
-- Single bits are collected in `pending` and written together at the end, because each
-- redis.call costs about 1 µs on top of its command (measured), more than a SETBIT itself. Whole
-- bytes are cleared at once with SETRANGE.
--
-- Lua numbers are doubles: the caller rejects numbers above 2^53 before calling.
--
-- KEYS[1]  the pair record (a hash)
-- KEYS[2]  the pair's replay bitmap (a string)
-- ARGV[1]  window size in bits, a multiple of 8
-- ARGV[2]  time to live in milliseconds, set on both keys
-- ARGV[3..] the sequence numbers, each at least 1
--
-- Returns one outcome per number: 1 accepted, 0 replayed, -1 stale. Returns the single number
-- -2 when there is no such pair.
-- Every pair record has the field `version`, so a missing one means there is no such pair.
local fields = redis.call('HMGET', KEYS[1], 'highest', 'floor', 'version')
if not fields[3] then
  return -2
end
local size = tonumber(ARGV[1])
-- Numbers are written back as the decimal text they arrived in, because Lua would print a large
-- double in exponent form.
local highest_text = fields[1] or '0'
local highest = tonumber(highest_text)
local floor = tonumber(fields[2] or '0')

if highest > floor and redis.call('EXISTS', KEYS[2]) == 0 then
  floor = highest
  redis.call('HSET', KEYS[1], 'floor', highest_text)
end

-- Bits this call writes, by ring position (1 or 0). Reads look here before the stored bitmap.
local pending = {}

-- Drops the pending bits of bytes `first` to `last`, which SETRANGE has just cleared.
local function drop_pending(first, last)
  for position in pairs(pending) do
    local byte = math.floor(position / 8)
    if byte >= first and byte <= last then
      pending[position] = nil
    end
  end
end

-- Clears `count` ring positions, starting at the one of number `first`: single bits up to a
-- byte boundary, then whole bytes with one SETRANGE, then single bits again.
local function clear(first, count)
  while count > 0 do
    local position = first % size
    local stop = position + math.min(count, size - position)
    local bit = position
    while bit < stop and bit % 8 ~= 0 do
      pending[bit] = 0
      bit = bit + 1
    end
    local bytes = math.floor((stop - bit) / 8)
    if bytes > 0 then
      redis.call('SETRANGE', KEYS[2], bit / 8, string.rep('\0', bytes))
      drop_pending(bit / 8, bit / 8 + bytes - 1)
      bit = bit + bytes * 8
    end
    while bit < stop do
      pending[bit] = 0
      bit = bit + 1
    end
    count = count - (stop - position)
    first = first + (stop - position)
  end
end

-- Returns the bit at ring position `position` as this call has left it so far.
local function bit_at(position)
  local bit = pending[position]
  if bit == nil then
    bit = redis.call('GETBIT', KEYS[2], position)
  end
  return bit
end

-- Checks and marks one number, given as decimal text, and returns its outcome.
local function check(text)
  local seq = tonumber(text)
  if seq <= floor then
    return -1
  elseif seq > highest then
    if seq - highest >= size then
      redis.call('DEL', KEYS[2])
      pending = {}
    else
      clear(highest + 1, seq - highest - 1)
    end
    pending[seq % size] = 1
    highest = seq
    highest_text = text
    return 1
  elseif highest - seq >= size then
    return -1
  elseif bit_at(seq % size) == 1 then
    return 0
  end
  pending[seq % size] = 1
  return 1
end

local outcomes = {}
local before = highest
for i = 3, #ARGV do
  outcomes[#outcomes + 1] = check(ARGV[i])
end

-- Writes the pending bits. Numbers that arrive in order leave their bits in a few neighbouring
-- bytes. When there are at least MIN_MERGED bits and they span at most MAX_SPAN bytes, one
-- GETRANGE reads those bytes, the bits are merged in Lua, and one SETRANGE writes them back.
-- Otherwise BITFIELD sets them, 256 bits per call, which keeps unpack within Lua's stack.
-- BITFIELD takes each position as a number, and Redis turns every Lua number argument into text,
-- which is slow. With 12 bits given as numbers (measured on Redis 7.0), the call took 5.5 µs, and
-- the command itself took 1.2 µs of that. With one or two bits, one BITFIELD call costs no more
-- than GETRANGE and SETRANGE together.
local MIN_MERGED = 3
local MAX_SPAN = 64
local count = 0
local first, last
for position in pairs(pending) do
  count = count + 1
  local byte = math.floor(position / 8)
  if first == nil or byte < first then
    first = byte
  end
  if last == nil or byte > last then
    last = byte
  end
end
if count >= MIN_MERGED and last - first < MAX_SPAN then
  local stored = redis.call('GETRANGE', KEYS[2], first, last)
  local bytes = {}
  for i = 1, last - first + 1 do
    -- Bytes past the end of the stored string read as zero, as SETRANGE and GETBIT treat them.
    bytes[i] = string.byte(stored, i) or 0
  end
  for position, value in pairs(pending) do
    local index = math.floor(position / 8) - first + 1
    -- Bit 0 of a Redis bitmap is the most significant bit of its first byte.
    local mask = bit.rshift(0x80, position % 8)
    if value == 1 then
      bytes[index] = bit.bor(bytes[index], mask)
    else
      bytes[index] = bit.band(bytes[index], bit.bnot(mask))
    end
  end
  redis.call('SETRANGE', KEYS[2], first, string.char(unpack(bytes)))
elseif count > 0 then
  local args = {}
  for position, value in pairs(pending) do
    args[#args + 1] = 'SET'
    args[#args + 1] = 'u1'
    args[#args + 1] = position
    -- The bit goes in as text, which spares Redis turning a Lua number into text.
    args[#args + 1] = value == 1 and '1' or '0'
    if #args >= 1024 then
      redis.call('BITFIELD', KEYS[2], unpack(args))
      args = {}
    end
  end
  if #args > 0 then
    redis.call('BITFIELD', KEYS[2], unpack(args))
  end
end

if highest ~= before then
  redis.call('HSET', KEYS[1], 'highest', highest_text)
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
return outcomes
