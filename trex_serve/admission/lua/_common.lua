-- Shared prelude of admit.lua and settle.lua (prepended at load time; one script each).
-- ARGV[1] is always the key prefix. Every key is derived from it inside the script because the
-- periods (window, UTC day, month) come from the server clock: this store targets a single Redis
-- (or a primary), not Redis Cluster.
local P = ARGV[1]
-- Scripts read the clock (TIME) before writing: replicate effects (the default since Redis 5).
if redis.replicate_commands then redis.replicate_commands() end

-- Integers to strings without Lua's %.14g rounding (exact up to 2^53 micro-credits).
local function I(x) return string.format('%d', x) end
local function num(v) if v == false or v == nil then return 0 end return tonumber(v) or 0 end

local function now_from(arg)
  if arg ~= nil and arg ~= '' then return tonumber(arg) end
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end

-- days since 1970-01-01 -> civil date (H. Hinnant's algorithm), and back.
local function civil(z)
  z = z + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524)
    - math.floor(doe / 146096)) / 365)
  local y = yoe + era * 400
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local d = doy - math.floor((153 * mp + 2) / 5) + 1
  local m
  if mp < 10 then m = mp + 3 else m = mp - 9 end
  if m <= 2 then y = y + 1 end
  return y, m, d
end

local function days_from_civil(y, m, d)
  if m <= 2 then y = y - 1 end
  local era = math.floor(y / 400)
  local yoe = y - era * 400
  local mp
  if m > 2 then mp = m - 3 else mp = m + 9 end
  local doy = math.floor((153 * mp + 2) / 5) + d - 1
  local doe = yoe * 365 + math.floor(yoe / 4) - math.floor(yoe / 100) + doy
  return era * 146097 + doe - 719468
end

-- yyyymmdd, yyyymm, epoch of next UTC midnight, epoch of the first of next month (UTC).
local function periods(now)
  local days = math.floor(now / 86400)
  local y, m, d = civil(days)
  local ny, nm = y, m + 1
  if nm > 12 then ny = y + 1; nm = 1 end
  return string.format('%04d%02d%02d', y, m, d), string.format('%04d%02d', y, m),
    (days + 1) * 86400, days_from_civil(ny, nm, 1) * 86400
end

local function secs_until(t, now)
  local s = math.ceil(t - now)
  if s < 1 then s = 1 end
  return s
end

local function spent_key(scope, id, per, period)
  return P .. 'spent:' .. scope .. ':' .. id .. ':' .. per .. ':' .. period
end

-- The four spend scopes of a request, in check order: key day, key month, account day, account month.
local function scopes(kid, acct, day, month, day_end, month_end, caps)
  return {
    {'key', kid, 'd', day, day_end, caps[1]},
    {'key', kid, 'm', month, month_end, caps[2]},
    {'account', acct, 'd', day, day_end, caps[3]},
    {'account', acct, 'm', month, month_end, caps[4]},
  }
end

local function hincr_floor0(key, field, delta)
  if delta == 0 then return end
  local v = redis.call('HINCRBY', key, field, I(delta))
  if v < 0 then redis.call('HSET', key, field, '0') end
end

local function incr_floor0(key, delta)
  if delta == 0 then return end
  local v = redis.call('INCRBY', key, I(delta))
  if v < 0 then redis.call('SET', key, '0', 'KEEPTTL') end
end

-- Settle (or reap) one admitted request from its admission record. Returns nil when the request
-- is unknown or already settled, else
-- {billing, charged, refunded, balance_after(-1: n/a), key_id, account_id}.
local function release(rid, success, tokens, charge)
  local rkey = P .. 'req:' .. rid
  local raw = redis.call('GET', rkey)
  if not raw then return nil end
  redis.call('DEL', rkey)
  local r = cjson.decode(raw)
  redis.call('ZREM', P .. 'lease:' .. r.k, rid)
  local est = tonumber(r.e)
  if not success then tokens = 0; charge = 0 end
  if r.t == '1' then
    local tk = P .. 'tpm:' .. r.k .. ':' .. r.w
    if redis.call('EXISTS', tk) == 1 then incr_floor0(tk, tokens - est) end
  end
  if r.b == 'q' then
    local qk = P .. 'quota:' .. r.a .. ':' .. r.d
    if redis.call('EXISTS', qk) == 1 then
      if success then
        hincr_floor0(qk, 'tokens', tokens - est)
      else
        hincr_floor0(qk, 'requests', -1)
        hincr_floor0(qk, 'tokens', -est)
      end
    end
    return {'quota', 0, 0, -1, r.k, r.a}
  end
  local reserved = tonumber(r.r)
  local bk = P .. 'bal:' .. r.a
  local bal = redis.call('GET', bk)
  local keys = {
    {spent_key('key', r.k, 'd', r.d), tonumber(r.c1)},
    {spent_key('key', r.k, 'm', r.m), tonumber(r.c2)},
    {spent_key('account', r.a, 'd', r.d), tonumber(r.c3)},
    {spent_key('account', r.a, 'm', r.m), tonumber(r.c4)},
  }
  local charged, refunded, delta
  if charge <= reserved then
    charged = charge; refunded = reserved - charge; delta = charge - reserved
  else
    -- The upstream used more than estimated: take the extra only as far as the balance and
    -- every spend cap allow (balance >= 0 and spent <= cap always hold).
    local extra = charge - reserved
    local avail = num(bal)
    if avail < extra then extra = avail end
    for _, s in ipairs(keys) do
      if s[2] >= 0 then
        local room = s[2] - num(redis.call('GET', s[1]))
        if room < extra then extra = room end
      end
    end
    if extra < 0 then extra = 0 end
    charged = reserved + extra; refunded = 0; delta = extra
  end
  local after = -1
  if bal then
    if delta ~= 0 then
      after = redis.call('DECRBY', bk, I(delta))
    else
      after = tonumber(bal)
    end
  end
  if delta ~= 0 then
    for _, s in ipairs(keys) do
      if redis.call('EXISTS', s[1]) == 1 then incr_floor0(s[1], delta) end
    end
  end
  return {'credits', charged, refunded, after, r.k, r.a}
end
