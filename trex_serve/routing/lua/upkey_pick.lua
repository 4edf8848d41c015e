-- Pick a managed upstream key for one request, atomically across every ingress replica.
-- ARGV: 1 prefix, 2 provider, 3 now ('' = server clock), 4 member (unique per request), 5 tokens
-- estimate, 6 n, then n triples (key id, rpm (0 = none), tpm (0 = none)) in the account's order.
-- The first key that is neither out (401/403) nor cooling (429) nor over a budget is taken and its
-- use counted in sliding 60-s logs (a provider counts a rolling minute: a fixed window would let
-- twice the budget through across a boundary).
-- Returns {index (0 = none), wait_ms (until the soonest skipped key is usable; -1 none), {skipped}},
-- skipped as 'id=out|cooling|rpm|tpm'.
local P, prov = ARGV[1], ARGV[2]
if redis.replicate_commands then redis.replicate_commands() end
local now
if ARGV[3] ~= '' then
  now = tonumber(ARGV[3])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local member, est, n = ARGV[4], tonumber(ARGV[5]), tonumber(ARGV[6])
local stamp, horizon = string.format('%.6f', now), string.format('%.6f', now - 60)
local skipped, wait = {}, -1

local function waited(ms)
  ms = math.ceil(ms)
  if ms < 1 then ms = 1 end
  if wait < 0 or ms < wait then wait = ms end
end

local function oldest_ms(zkey)
  local first = redis.call('ZRANGE', zkey, 0, 0, 'WITHSCORES')
  if first[2] then return (tonumber(first[2]) + 60 - now) * 1000 end
  return 1000
end

for i = 1, n do
  local base = 6 + (i - 1) * 3
  local id, rpm, tpm = ARGV[base + 1], tonumber(ARGV[base + 2]), tonumber(ARGV[base + 3])
  local K = P .. 'uk:' .. prov .. ':' .. id .. ':'
  local usable = true
  local out = redis.call('PTTL', K .. 'out')
  local cool = redis.call('PTTL', K .. 'cool')
  if out > 0 or out == -1 then
    usable = false; skipped[#skipped + 1] = id .. '=out'
    if out > 0 then waited(out) end
  elseif cool > 0 then
    usable = false; skipped[#skipped + 1] = id .. '=cooling'; waited(cool)
  end
  if usable and rpm > 0 then
    redis.call('ZREMRANGEBYSCORE', K .. 'rpm', '-inf', horizon)
    if redis.call('ZCARD', K .. 'rpm') >= rpm then
      usable = false; skipped[#skipped + 1] = id .. '=rpm'; waited(oldest_ms(K .. 'rpm'))
    end
  end
  if usable and tpm > 0 then
    -- The window's total is kept in 'tpms' (no scan of the log per pick): entries leaving the
    -- window are subtracted, in chunks that stay within Lua's stack for unpack().
    while true do
      local gone = redis.call('ZRANGEBYSCORE', K .. 'tpm', '-inf', horizon, 'LIMIT', 0, 500)
      if #gone == 0 then break end
      local freed = 0
      for _, v in ipairs(redis.call('HMGET', K .. 'tpmv', unpack(gone))) do freed = freed + (tonumber(v) or 0) end
      redis.call('HDEL', K .. 'tpmv', unpack(gone))
      redis.call('ZREM', K .. 'tpm', unpack(gone))
      if freed > 0 then redis.call('DECRBY', K .. 'tpms', freed) end
    end
    local used = tonumber(redis.call('GET', K .. 'tpms') or '0') or 0
    if used + est > tpm then
      usable = false; skipped[#skipped + 1] = id .. '=tpm'; waited(oldest_ms(K .. 'tpm'))
    end
  end
  if usable then
    if rpm > 0 then
      redis.call('ZADD', K .. 'rpm', stamp, member)
      redis.call('PEXPIRE', K .. 'rpm', 61000)
    end
    if tpm > 0 then
      redis.call('ZADD', K .. 'tpm', stamp, member)
      redis.call('HSET', K .. 'tpmv', member, string.format('%d', est))
      redis.call('INCRBY', K .. 'tpms', string.format('%d', est))
      for _, suffix in ipairs({'tpm', 'tpmv', 'tpms'}) do redis.call('PEXPIRE', K .. suffix, 61000) end
    end
    return {i, wait, skipped}
  end
end
return {0, wait, skipped}
