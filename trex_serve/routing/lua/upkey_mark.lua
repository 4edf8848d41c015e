-- Record what an upstream said about one managed key. ARGV: 1 prefix, 2 provider, 3 key id,
-- 4 op, 5 value, 6 member.
--   cool   value = ms: the key answered 429; it cools at least that long (never shortened).
--          Returns 1 when the key was not cooling before (the replica that saw it first reports it).
--   out    value = ms: the key answered 401/403; it is out that long. Returns 1 for the first caller.
--   tokens value = tokens the request really used: replaces its estimate in the key's TPM log.
local P, prov, id, op = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local value = tonumber(ARGV[5])
local K = P .. 'uk:' .. prov .. ':' .. id .. ':'
if op == 'cool' then
  local left = redis.call('PTTL', K .. 'cool')
  if left < value then redis.call('SET', K .. 'cool', '1', 'PX', value) end
  if left > 0 then return 0 end
  return 1
elseif op == 'out' then
  if redis.call('SET', K .. 'out', '1', 'NX', 'PX', value) then return 1 end
  return 0
elseif op == 'tokens' then
  local before = redis.call('HGET', K .. 'tpmv', ARGV[6])
  if not before then return 0 end  -- already out of the window
  redis.call('HSET', K .. 'tpmv', ARGV[6], string.format('%d', value))
  redis.call('INCRBY', K .. 'tpms', string.format('%d', value - tonumber(before)))
  return 1
end
return redis.error_reply('upkey_mark: unknown op ' .. tostring(op))
