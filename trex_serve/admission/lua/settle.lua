-- Settlement in one atomic call: release the lease, settle quota or credits from the admission
-- record, track velocity. Idempotent: the record is consumed, so a second call does nothing.
-- ARGV: 1 prefix, 2 request_id, 3 success (1|0), 4 tokens (actual, in+out), 5 charge_micro,
-- 6 now ('' = server clock), 7 velocity_window_s (0 = off), 8 velocity_max_micro,
-- 9 replay_ttl_s (0 = none): keep a mark of a successful settlement this long, so a replay of the
-- same request id (the front proxy retrying on another replica) is served without a second charge.
-- 10 ledger reason (text of the charge row), 11 the request's tokens by class (JSON, '' = none),
-- kept on the ledger row beside the charge. A key the charge takes over its velocity limit is
-- marked ({P}velstop:{key}) so that admit.lua refuses it before its suspension reaches SQL.
-- A charge is appended to the ledger stream ({P}stream:ledger) in this same atomic step, and counted
-- in {P}unbooked:{account} until a drainer has committed it to SQL (billing/durable_streams.py): a charge settled
-- here reaches the SQL ledger even if this replica dies the next moment.
-- Returns {settled, billing, charged, refunded, balance_after(-1 = n/a), velocity_exceeded,
--          velocity_micro}
local rid = ARGV[2]
local success = ARGV[3] == '1'
local tokens, charge = tonumber(ARGV[4]), tonumber(ARGV[5])
local vw, vmax = tonumber(ARGV[7]), tonumber(ARGV[8])

local r = release(rid, success, tokens, charge)
if not r then return {0, '', 0, 0, -1, 0, 0} end
local replay_ttl = tonumber(ARGV[9] or '0') or 0
if success and replay_ttl > 0 then
  local mark = 'q'
  if r[1] == 'credits' then mark = 'c' end
  redis.call('SET', P .. 'done:' .. rid, mark, 'EX', I(replay_ttl))
end
local charged = r[2]
if charged > 0 then
  redis.call('XADD', P .. 'stream:ledger', '*', 'a', r[6], 'k', r[5], 'r', rid, 'amt', I(charged),
    'why', ARGV[10] or '', 'ms', I(math.floor(now_from(ARGV[6]) * 1000)), 'u', ARGV[11] or '')
  redis.call('INCRBY', P .. 'unbooked:' .. r[6], I(charged))
end
local exceeded, vsum = 0, 0
if vw > 0 and vmax >= 0 and charged > 0 then
  -- Rolling window per key: a sorted set of 'request_id|amount' scored by time (ms) and a running
  -- sum, so each call only touches the entries that fall out of the window.
  local now_ms = math.floor(now_from(ARGV[6]) * 1000)
  local zk, sk = P .. 'vel:' .. r[5], P .. 'velsum:' .. r[5]
  local cutoff = now_ms - vw * 1000
  local old = redis.call('ZRANGEBYSCORE', zk, '-inf', I(cutoff))
  if #old > 0 then
    local gone = 0
    for _, m in ipairs(old) do gone = gone + (tonumber(string.match(m, '|(%d+)$')) or 0) end
    redis.call('ZREMRANGEBYSCORE', zk, '-inf', I(cutoff))
    if redis.call('EXISTS', sk) == 1 then incr_floor0(sk, -gone) end
  end
  if redis.call('ZCARD', zk) == 0 then redis.call('DEL', sk) end
  redis.call('ZADD', zk, I(now_ms), rid .. '|' .. I(charged))
  vsum = redis.call('INCRBY', sk, I(charged))
  redis.call('PEXPIRE', zk, I(vw * 1000 + 1000))
  redis.call('PEXPIRE', sk, I(vw * 1000 + 1000))
  if vsum > vmax then
    exceeded = 1
    -- admit.lua refuses the key from now on; the gateway lifts this once the suspension is in SQL
    -- and announced (the expiry bounds it if that never happens)
    redis.call('SET', P .. 'velstop:' .. r[5], '1', 'EX', 30)
  end
end
return {1, r[1], charged, r[3], r[4], exceeded, vsum}
