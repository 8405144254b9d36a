#!lua
-- shmstore replica upstream: every write of a dataset as one atomic step (see _redis.py).
--
-- KEYS: meta (hash), d (hash of records), s (the change stream); one hash tag.
-- ARGV: nonce, stream_max, now_ns, then per op 6 strings: kind, key, a, b, c, d; a
-- batch ("B", "", n, payload, "", "") is followed by its n ops, 4 strings each:
-- kind ("P"/"D"), key, value, expiry.
-- Reply: per op {status, id, value} (an incr's: {status, id, value, expiry}); status "ok"
-- or an shmstore error class name; then {the stream's tail before the call, TIME in ms}.
--
-- Invariant: nothing is written before every check that can refuse the whole call has
-- passed (types, meta vs stream tail), and no redis.call after the first write can
-- fail on data (the shebang makes Redis refuse the call up front when out of memory):
-- a script is not rolled back by an error, so an error must never come half way.
-- Versions are Lua numbers (exact below 2**53, Python keeps them there); expiries and
-- record versions are compared as decimal strings, never as doubles.

local meta, d, s = KEYS[1], KEYS[2], KEYS[3]
local nonce = ARGV[1]
local stream_max = ARGV[2]
local now = ARGV[3]

local function fmt(n)
  return string.format('%.0f', n)
end

local function idv(id)
  -- the version part of an entry id, or nil when it is not "<digits>-<digits>"
  local v = string.match(id, '^(%d+)%-%d+$')
  if v == nil or #v > 16 then return nil end
  return tonumber(v)
end

local function dle(a, b)
  -- a <= b for canonical decimal strings (19-digit ns are not exact as doubles)
  if #a ~= #b then return #a < #b end
  return a <= b
end

local function parse(rec)
  -- a record "<version> <expiry> <value>": version, expiry (strings), value; nil if bad
  if not rec then return nil end
  local i = string.find(rec, ' ', 1, true)
  if not i then return nil end
  local j = string.find(rec, ' ', i + 1, true)
  if not j then return nil end
  local ver, exp = string.sub(rec, 1, i - 1), string.sub(rec, i + 1, j - 1)
  if not string.match(ver, '^%d+$') or not string.match(exp, '^%d+$') then return nil end
  return ver, exp, string.sub(rec, j + 1)
end

local function expired(exp, at)
  return exp ~= '0' and dle(exp, at)
end

-- msgpack integers as two limbs: value = hi * 2**32 + lo, 0 <= lo < 2**32
local P32 = 4294967296

local function u(str, i, n)
  local x = 0
  for k = i, i + n - 1 do x = x * 256 + string.byte(str, k) end
  return x
end

local function int_decode(b)
  -- (hi, lo) of a value that is exactly one msgpack integer, else nil
  local n = #b
  if n == 0 then return nil end
  local c = string.byte(b, 1)
  local v
  if c <= 0x7f then
    if n ~= 1 then return nil end
    v = c
  elseif c >= 0xe0 then
    if n ~= 1 then return nil end
    v = c - 256
  elseif c == 0xcc then if n ~= 2 then return nil end v = u(b, 2, 1)
  elseif c == 0xcd then if n ~= 3 then return nil end v = u(b, 2, 2)
  elseif c == 0xce then if n ~= 5 then return nil end v = u(b, 2, 4)
  elseif c == 0xcf then if n ~= 9 then return nil end return u(b, 2, 4), u(b, 6, 4)
  elseif c == 0xd0 then if n ~= 2 then return nil end v = u(b, 2, 1) if v >= 128 then v = v - 256 end
  elseif c == 0xd1 then if n ~= 3 then return nil end v = u(b, 2, 2) if v >= 32768 then v = v - 65536 end
  elseif c == 0xd2 then if n ~= 5 then return nil end v = u(b, 2, 4) if v >= 2147483648 then v = v - P32 end
  elseif c == 0xd3 then
    if n ~= 9 then return nil end
    local hi = u(b, 2, 4)
    if hi >= 2147483648 then hi = hi - P32 end
    return hi, u(b, 6, 4)
  else
    return nil
  end
  local hi = math.floor(v / P32)
  return hi, v - hi * P32
end

local function be(x, n)
  -- x (0 <= x < 256**n) as n big-endian bytes
  local t = {}
  for k = n, 1, -1 do
    t[k] = x % 256
    x = math.floor(x / 256)
  end
  return string.char(unpack(t))
end

local function int_encode(hi, lo)
  -- the bytes msgspec.msgpack.encode gives the integer hi * 2**32 + lo
  if hi == 0 then
    if lo < 128 then return string.char(lo) end
    if lo < 256 then return '\204' .. be(lo, 1) end
    if lo < 65536 then return '\205' .. be(lo, 2) end
    return '\206' .. be(lo, 4)
  end
  if hi > 0 then return '\207' .. be(hi, 4) .. be(lo, 4) end
  if hi == -1 and lo >= 2147483648 then
    local v = lo - P32
    if v >= -32 then return string.char(v + 256) end
    if v >= -128 then return '\208' .. be(v + 256, 1) end
    if v >= -32768 then return '\209' .. be(v + 65536, 2) end
    return '\210' .. be(lo, 4)
  end
  return '\211' .. be(hi + P32, 4) .. be(lo, 4)
end

-- Checks that refuse the whole call (nothing written yet).
local function whole(status, msg)
  local out = {}
  local i, k = 4, 1
  while i <= #ARGV do
    out[k] = {status, '', msg}
    k = k + 1
    if ARGV[i] == 'B' then i = i + 6 + 4 * tonumber(ARGV[i + 2]) else i = i + 6 end
  end
  return out
end

for _, key in ipairs({meta, d, s}) do
  local t = redis.call('TYPE', key)['ok']
  local want = (key == s) and 'stream' or 'hash'
  if t ~= 'none' and t ~= want then
    return whole('CorruptionError', 'the upstream key ' .. key .. ' is a ' .. t .. ', not a ' .. want)
  end
end

local m = redis.call('HMGET', meta, 'v', 'last')
local tail = redis.call('XREVRANGE', s, '+', '-', 'COUNT', 1)
local tail_id = tail[1] and tail[1][1] or '0-0'
local v, last
if not m[1] and not m[2] then
  if tail[1] or redis.call('EXISTS', d) == 1 then
    return whole('CorruptionError', 'the upstream dataset has records or a stream but no ' .. meta)
  end
  v, last = 0, '0-0'
  local t = redis.call('TIME')
  redis.call('HSET', meta, 'v', '0', 'last', '0-0',
             'gen', string.sub(redis.sha1hex(nonce .. ':' .. t[1] .. ':' .. t[2]), 1, 16))
else
  last = m[2]
  v = m[1] and string.match(m[1], '^%d+$') and #m[1] <= 16 and tonumber(m[1])
  local lv = last and (last == '0-0' and 0 or idv(last))
  if not v or not lv or lv ~= v or last ~= tail_id then
    return whole('CorruptionError', 'the upstream ' .. meta .. ' (v ' .. tostring(m[1]) .. ', last '
                 .. tostring(m[2]) .. ') does not match the stream tail ' .. tail_id)
  end
end

local t = redis.call('TIME')
local tms = fmt(tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))

local function append(newv, ...)
  local id = fmt(newv) .. '-' .. nonce
  redis.call('XADD', s, 'MAXLEN', '~', stream_max, id, 'p', last, 't', tms, ...)
  v, last = newv, id
  return id
end

local function record(ver, exp, value)
  return fmt(ver) .. ' ' .. exp .. ' ' .. value
end

local function corrupt()
  return {'CorruptionError', '', 'record'}  -- Python names the key
end

local out = {}
local i = 4
while i <= #ARGV do
  local kind, key, a, b, c, dd = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4], ARGV[i + 5]
  i = i + 6
  local res
  if kind == 'P' then
    local id = append(v + 1, 'o', c)
    redis.call('HSET', d, key, record(v, b, a))
    res = {'ok', id, v}
  elseif kind == 'C' then
    local rec = redis.call('HGET', d, key)
    local cur = '0'
    if rec then
      local ver, exp = parse(rec)
      if not ver then
        res = corrupt()
      elseif not expired(exp, now) then
        cur = ver
      end
    end
    if res then
      -- a record that does not parse
    elseif cur ~= dd then
      res = {'VersionConflictError', '', cur}
    else
      local id = append(v + 1, 'o', c)
      redis.call('HSET', d, key, record(v, b, a))
      res = {'ok', id, v}
    end
  elseif kind == 'D' then
    local rec = redis.call('HGET', d, key)
    if not rec then
      res = {'ok', '', 0}
    else
      local ver, exp = parse(rec)
      if not ver then
        res = corrupt()
      else
        local id = append(v + 1, 'o', c)
        redis.call('HDEL', d, key)
        res = {'ok', id, expired(exp, now) and 0 or 1}
      end
    end
  elseif kind == 'I' then
    local rec = redis.call('HGET', d, key)
    local ver, exp, value = '0', '0', '\0'
    if rec then
      ver, exp, value = parse(rec)
      if not ver then
        res = corrupt()
      elseif expired(exp, now) then
        exp, value = '0', '\0'
      end
    end
    if not res then
      local hi, lo = int_decode(value)
      if not hi then
        res = {'ValueEncodingError', '', false}
      else
        lo = lo + tonumber(b)
        local carry = math.floor(lo / P32)
        lo = lo - carry * P32
        hi = hi + tonumber(a) + carry
        if hi < -2147483648 or hi >= P32 then
          res = {'ValueEncodingError', '', value}
        else
          local nb = int_encode(hi, lo)
          local id = append(v + 1, 'k', key, 'v', nb, 'x', exp)
          redis.call('HSET', d, key, record(v, exp, nb))
          res = {'ok', id, nb, exp}
        end
      end
    end
  elseif kind == 'B' then
    local n = tonumber(a)
    local ops = {}
    for k = 1, n do
      ops[k] = {ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]}
      i = i + 4
    end
    local id = append(v + n, 'o', b)
    local results = {}
    local ver = v - n
    for k = 1, n do
      local op = ops[k]
      ver = ver + 1
      if op[1] == 'P' then
        redis.call('HSET', d, op[2], record(ver, op[4], op[3]))
        results[k] = ver
      else
        results[k] = redis.call('HDEL', d, op[2])
      end
    end
    res = {'ok', id, results}
  elseif kind == 'E' then
    local rec = redis.call('HGET', d, key)
    res = {'ok', '', 0}
    if rec then
      local ver, exp = parse(rec)
      if not ver then
        res = corrupt()
      elseif expired(exp, b) then
        local id = append(v + 1, 'o', a)
        redis.call('HDEL', d, key)
        res = {'ok', id, 1}
      end
    end
  elseif kind == 'J' then
    local target = math.max(v + 1, tonumber(a))
    local id = append(target, 'j', '1')
    res = {'ok', id, v}
  else
    res = {'InvalidArgumentError', '', 'unknown op kind'}
  end
  out[#out + 1] = res
end

if last ~= m[2] then
  redis.call('HSET', meta, 'v', fmt(v), 'last', last)
end
-- Last: the stream's tail before this call and the entries' time, so that a replica
-- whose cursor was that tail can apply this call's entries without reading them back.
out[#out + 1] = {m[2] or '0-0', tms}
return out
