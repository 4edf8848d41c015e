-- A response-cache hit's admission in one atomic call: it counts as a request against RPM and
-- nothing else (no tokens against TPM or the daily quota, no concurrency lease, no credits: nothing
-- goes upstream). A key stopped by its velocity limit (settle.lua) is refused as in admit.lua.
-- ARGV: 1 prefix, 2 key_id, 3 now ('' = server clock), 4 rpm (0 = none).
-- Returns {ok, code, retry_after, rpm_limit (0 = none), rpm_remaining (-1 = n/a), rpm_reset}
local kid = ARGV[2]
local now = now_from(ARGV[3])
local rpm = tonumber(ARGV[4])
local window = math.floor(now / 60)
local reset = secs_until((window + 1) * 60, now)
if redis.call('EXISTS', P .. 'velstop:' .. kid) == 1 then
  return {0, 'api_key_suspended', 0, rpm, -1, reset}
end
local rpm_key = P .. 'rpm:' .. kid .. ':' .. I(window)
local used = num(redis.call('GET', rpm_key))
if rpm > 0 and used + 1 > rpm then return {0, 'rate_limit_exceeded', reset, rpm, 0, reset} end
local after = redis.call('INCR', rpm_key)
if after == 1 then redis.call('EXPIRE', rpm_key, 120) end
local remaining = -1
if rpm > 0 then remaining = math.max(0, rpm - after) end
return {1, '', 0, rpm, remaining, reset}
