-- Failed-authentication throttle per client address, fixed 60-s window, one call.
-- ARGV: 1 prefix, 2 address, 3 limit per minute, 4 now ('' = server clock), 5 mode ('hit' | 'check').
-- 'hit' counts one unknown-key attempt: blocked when the count is now above the limit.
-- 'check' counts nothing: blocked when one more unknown-key attempt would be above the limit.
-- Returns {blocked (1|0), retry_after (seconds to the window end, >= 1), count}
local P = ARGV[1]
local limit = tonumber(ARGV[3])
local now
if ARGV[4] ~= '' then
  now = tonumber(ARGV[4])
else
  if redis.replicate_commands then redis.replicate_commands() end
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local window = math.floor(now / 60)
local retry = math.ceil((window + 1) * 60 - now)
if retry < 1 then retry = 1 end
local key = P .. 'authfail:' .. ARGV[2] .. ':' .. string.format('%d', window)
local count
if ARGV[5] == 'hit' then
  count = redis.call('INCR', key)
  if count == 1 then redis.call('EXPIRE', key, 120) end
  if count > limit then return {1, retry, count} end
  return {0, retry, count}
end
count = tonumber(redis.call('GET', key) or '0')
if count + 1 > limit then return {1, retry, count} end
return {0, retry, count}
