-- Admission in one atomic call: RPM -> TPM -> concurrency lease -> quota | credits (+ spend caps).
-- The first failing check answers; a refused request changes nothing.
-- ARGV: 1 prefix, 2 request_id, 3 key_id, 4 account_id, 5 now ('' = server clock), 6 rpm (0 = none),
-- 7 tpm (0 = none), 8 tokens_estimate, 9 concurrency (0 = none), 10 burst_concurrency,
-- 11 lease_ttl_ms, 12 billing ('q' | 'c'), 13 quota_requests (-1 = none), 14 quota_tokens (-1),
-- 15 reserve_micro, 16..19 caps key-day, key-month, account-day, account-month (-1 = none),
-- 20 alert_at (0 = none), 21 record_ttl_s.
-- Returns {ok, code, retry_after, billing, slot, reserved, balance_after(-1), rpm_limit(0 = none),
--          rpm_remaining(-1 = n/a), rpm_reset, alerts{{scope, period, cap, spent}...},
--          cap_hit{scope, period, cap, spent} | {}, duplicate (1: admitted before, 2: settled before)}
local rid, kid, acct = ARGV[2], ARGV[3], ARGV[4]
local now = now_from(ARGV[5])
local now_ms = math.floor(now * 1000)
local rpm, tpm, est = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local conc, burst, ttl_ms = tonumber(ARGV[9]), tonumber(ARGV[10]), tonumber(ARGV[11])
local billing = ARGV[12]
local qreq, qtok, reserve = tonumber(ARGV[13]), tonumber(ARGV[14]), tonumber(ARGV[15])
local caps = {tonumber(ARGV[16]), tonumber(ARGV[17]), tonumber(ARGV[18]), tonumber(ARGV[19])}
local alert_at, rec_ttl = tonumber(ARGV[20]), tonumber(ARGV[21])

local window = math.floor(now / 60)
local reset = secs_until((window + 1) * 60, now)
local rpm_key = P .. 'rpm:' .. kid .. ':' .. I(window)
local lease_key = P .. 'lease:' .. kid
local rkey = P .. 'req:' .. rid

local function fail(code, retry, cap_hit, rpm_used)
  local remaining = -1
  if rpm > 0 then remaining = math.max(0, rpm - rpm_used) end
  return {0, code, retry, '', '', 0, -1, rpm, remaining, reset, {}, cap_hit or {}, 0}
end

-- A request the front proxy replayed after its first ingress replica died: if that first attempt
-- was already settled, serve it again without reserving or charging anything (never billed twice).
local done = redis.call('GET', P .. 'done:' .. rid)
if done then
  local b = 'quota'
  if done == 'c' then b = 'credits' end
  return {1, '', 0, b, 'base', 0, -1, rpm, -1, reset, {}, {}, 2}
end

-- A retried admission (client retry after a lost reply) returns the first answer: never twice.
local prior = redis.call('GET', rkey)
if prior then
  local r = cjson.decode(prior)
  local b = 'quota'
  if r.b == 'c' then b = 'credits' end
  return {1, '', 0, b, r.s, tonumber(r.r), -1, rpm, -1, reset, {}, {}, 1}
end

-- A key whose settlement just crossed its velocity limit (settle.lua) is refused here until its
-- suspension is in SQL and every replica's key cache: the answer that crossed the limit may reach
-- the client before that suspension is written, and its next request must not get in.
if redis.call('EXISTS', P .. 'velstop:' .. kid) == 1 then
  return fail('api_key_suspended', 0, nil, 0)
end

-- Reap leases whose holder died (expired): settle them as failed, so their quota and credit
-- reservations come back. Bounded per call; the rest are excluded from the count below anyway.
local expired = redis.call('ZRANGEBYSCORE', lease_key, '-inf', now_ms, 'LIMIT', 0, 32)
for _, id in ipairs(expired) do
  redis.call('ZREM', lease_key, id)
  release(id, false, 0, 0)
end

-- 1. RPM (fixed 60-s window)
local rpm_used = num(redis.call('GET', rpm_key))
if rpm > 0 and rpm_used + 1 > rpm then return fail('rate_limit_exceeded', reset, nil, rpm_used) end

-- 2. TPM (same window, the estimate)
local tpm_key = P .. 'tpm:' .. kid .. ':' .. I(window)
if tpm > 0 then
  local used = num(redis.call('GET', tpm_key))
  if used + est > tpm then return fail('rate_limit_exceeded', reset, nil, rpm_used) end
end

-- 3. Concurrency lease
local live = redis.call('ZCOUNT', lease_key, '(' .. I(now_ms), '+inf')
local slot = 'base'
if conc > 0 and live >= conc then
  if burst > conc and live < burst then
    slot = 'burst'
  else
    return fail('concurrency_limit_exceeded', 1, nil, rpm_used)
  end
end
if slot == 'burst' then billing = 'c' end

-- 4. Quota or credits
local day, month, day_end, month_end = periods(now)
local qkey = P .. 'quota:' .. acct .. ':' .. day
local bkey = P .. 'bal:' .. acct
local sc = scopes(kid, acct, day, month, day_end, month_end, caps)
local spent_now = {}
local balance
if billing == 'q' then
  local u = redis.call('HMGET', qkey, 'requests', 'tokens')
  local ur, ut = num(u[1]), num(u[2])
  if (qreq >= 0 and ur + 1 > qreq) or (qtok >= 0 and ut + est > qtok) then
    return fail('insufficient_quota', secs_until(day_end, now), nil, rpm_used)
  end
else
  local b = redis.call('GET', bkey)
  if not b then return fail('balance_missing', 0, nil, rpm_used) end
  balance = tonumber(b)
  if balance <= 0 or balance < reserve then return fail('insufficient_credits', 0, nil, rpm_used) end
  local hit, retry = nil, 0
  for i, s in ipairs(sc) do
    spent_now[i] = num(redis.call('GET', spent_key(s[1], s[2], s[3], s[4])))
    if s[6] >= 0 and spent_now[i] + reserve > s[6] then
      local r = secs_until(s[5], now)
      if r > retry then retry = r end
      if not hit then hit = {s[1], s[3], s[6], spent_now[i]} end
    end
  end
  if hit then return fail('spend_limit_exceeded', retry, hit, rpm_used) end
end

-- Every check passed: apply.
local rpm_after = redis.call('INCR', rpm_key)
if rpm_after == 1 then redis.call('EXPIRE', rpm_key, 120) end
local tpm_counted = '0'
if tpm > 0 and est > 0 then
  if redis.call('INCRBY', tpm_key, I(est)) == est then redis.call('EXPIRE', tpm_key, 120) end
  tpm_counted = '1'
end
redis.call('ZADD', lease_key, I(now_ms + ttl_ms), rid)

local alerts = {}
local out_billing, reserved, bal_after = 'quota', 0, -1
if billing == 'q' then
  redis.call('HINCRBY', qkey, 'requests', 1)
  redis.call('HINCRBY', qkey, 'tokens', I(est))
  redis.call('EXPIRE', qkey, I(secs_until(day_end + 2 * 86400, now)))
else
  out_billing, reserved = 'credits', reserve
  bal_after = redis.call('DECRBY', bkey, I(reserve))
  for i, s in ipairs(sc) do
    local k = spent_key(s[1], s[2], s[3], s[4])
    local after = redis.call('INCRBY', k, I(reserve))
    redis.call('EXPIRE', k, I(secs_until(s[5] + 86400, now)))
    local cap = s[6]
    if cap > 0 and alert_at > 0 and after >= alert_at * cap then
      -- once per period: the flag lives until the period is over
      local flag = P .. 'alert:' .. s[1] .. ':' .. s[2] .. ':' .. s[3] .. ':' .. s[4]
      if redis.call('SET', flag, '1', 'NX', 'EX', I(secs_until(s[5] + 86400, now))) then
        alerts[#alerts + 1] = {s[1], s[3], cap, after}
      end
    end
  end
end

redis.call('SET', rkey, cjson.encode({
  k = kid, a = acct, b = billing, s = slot, e = I(est), r = I(reserved), d = day, m = month,
  w = I(window), t = tpm_counted,
  c1 = I(caps[1]), c2 = I(caps[2]), c3 = I(caps[3]), c4 = I(caps[4]),
}), 'EX', I(rec_ttl))

local remaining = -1
if rpm > 0 then remaining = math.max(0, rpm - rpm_after) end
return {1, '', 0, out_billing, slot, reserved, bal_after, rpm, remaining, reset, alerts, {}, 0}
