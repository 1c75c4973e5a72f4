"""The server-side scripts of the Redis store: each is one atomic step.

Keys of one run share the hash tag ``{run_id}``. The global keys some scripts
also touch (the run index, counters, the ready queue, the lease and dispatch
indexes) are what keeps this layout off Redis Cluster for now: there they
would move out of the scripts (see docs/DESIGN-NOTES.md).
"""

from __future__ import annotations

# A lease value: "ready" (queued for activation) or "<epoch>|<host>|<node>|<pid>" (active).
# Run statuses that end a run:
_TERMINAL = """
local TERMINAL = {finished=true, failed=true, cancelled=true, quarantined=true}
"""

# KEYS: meta snap journal events outbox seen index counters fx fxdue timers approvals
#       origin history ended
# ARGV: epoch step status now run_id delta snapshot n_events n_outbox n_seen nonce
#       n_fx n_timers fx_timeout_ms n_approvals kind
#       events... (outbox id, envelope)... seen... (effect id, attempt)... (timer id, at)...
#       (call id, 1 now waiting for approval | 0 no longer)...
COMMIT = _TERMINAL + """
local meta = KEYS[1]
local cur = tonumber(redis.call('HGET', meta, 'epoch') or '-1')
if cur == -1 then return {'NOTFOUND', 0} end
if cur ~= tonumber(ARGV[1]) then
  redis.call('HINCRBY', KEYS[8], 'fenced_commits_total', 1)  -- a zombie's write, refused
  return {'FENCED', cur}
end
local reason = redis.call('HGET', meta, 'reason')
if reason and reason ~= '' then return {'QUARANTINED', reason} end
local stored = tonumber(redis.call('HGET', meta, 'step') or '0')
local step = tonumber(ARGV[2])
if step ~= stored + 1 then return {'STEP', stored, redis.call('HGET', meta, 'nonce') or ''} end
local delta, snapshot = ARGV[6], ARGV[7]
local nbytes = 0
if snapshot ~= '' then
  -- history (fork from any step) at no cost per step: the run's first snapshot stays as its
  -- origin, and the journal, with this step's delta, becomes a history segment (a RENAME)
  -- instead of being deleted; `hist` lists the segments by the step they end at
  if redis.call('EXISTS', KEYS[13]) == 0 and redis.call('EXISTS', KEYS[2]) == 1 then
    redis.call('RENAME', KEYS[2], KEYS[13])
  end
  redis.call('RPUSH', KEYS[3], delta ~= '' and delta or snapshot)
  redis.call('RENAME', KEYS[3], KEYS[14] .. ':' .. step)
  redis.call('RPUSH', KEYS[14], step)
  redis.call('SET', KEYS[2], snapshot)
  redis.call('HSET', meta, 'snap_step', step, 'snap_bytes', #snapshot,
             'journal_bytes', 0, 'journal_len', 0)
  nbytes = #snapshot
  redis.call('HINCRBY', KEYS[8], 'snapshots_total', 1)
elseif delta ~= '' then
  redis.call('RPUSH', KEYS[3], delta)
  redis.call('HINCRBY', meta, 'journal_bytes', #delta)
  redis.call('HINCRBY', meta, 'journal_len', 1)
  nbytes = #delta
end
local old = redis.call('HGET', meta, 'status')
local status = ARGV[3]
local run = ARGV[5]
local now = tonumber(ARGV[4])
redis.call('HSET', meta, 'step', step, 'status', status, 'updated', ARGV[4], 'nonce', ARGV[11])
if old ~= status then
  redis.call('SREM', 'ud:state:' .. old, run)
  redis.call('SADD', 'ud:state:' .. status, run)
  redis.call('HSET', KEYS[7], run, status)
  if TERMINAL[status] and not TERMINAL[old] then
    redis.call('HINCRBY', KEYS[8], 'ended|' .. status, 1)
    if (redis.call('HGET', meta, 'parent') or '') == '' then
      redis.call('ZADD', KEYS[15], now, run)  -- a root ended: retention counts from here
    end
  end
end
local ne, no, ns = tonumber(ARGV[8]), tonumber(ARGV[9]), tonumber(ARGV[10])
local nf, nt, na = tonumber(ARGV[12]), tonumber(ARGV[13]), tonumber(ARGV[15])
local i = 17
for _ = 1, ne do
  redis.call('XADD', KEYS[4], '*', 'e', ARGV[i]); i = i + 1
end
for _ = 1, no do
  redis.call('HSET', KEYS[5], ARGV[i], ARGV[i + 1]); i = i + 2
end
for _ = 1, ns do
  redis.call('SADD', KEYS[6], ARGV[i]); i = i + 1
end
if TERMINAL[status] then
  -- calls still out can no longer matter: forget their dispatch records
  for _, eid in ipairs(redis.call('HKEYS', KEYS[9])) do
    redis.call('ZREM', KEYS[10], run .. '|' .. eid)
  end
  redis.call('DEL', KEYS[9])
  i = i + 2 * nf
else
  local due = now + tonumber(ARGV[14])
  for _ = 1, nf do
    redis.call('HSET', KEYS[9], ARGV[i], ARGV[i + 1] .. '|q')
    redis.call('ZADD', KEYS[10], due, run .. '|' .. ARGV[i]); i = i + 2
  end
end
for _ = 1, nt do
  redis.call('ZADD', KEYS[11], tonumber(ARGV[i + 1]), run .. '|' .. ARGV[i]); i = i + 2
end
for _ = 1, na do
  if ARGV[i + 1] == '1' then redis.call('ZADD', KEYS[12], now, run .. '|' .. ARGV[i])
  else redis.call('ZREM', KEYS[12], run .. '|' .. ARGV[i]) end
  i = i + 2
end
redis.call('HINCRBY', KEYS[8], 'steps_total', 1)
redis.call('HINCRBY', KEYS[8], 'commit_bytes_total', nbytes)
if ARGV[16] ~= '' then redis.call('HINCRBY', KEYS[8], 'steps|' .. ARGV[16], 1) end
-- the first step after the supervisor restarted the run: its recovery time
local recovered = -1
local died = redis.call('HGET', meta, 'recovering')
if died then
  redis.call('HDEL', meta, 'recovering')
  recovered = now - tonumber(died)
end
return {'OK', tonumber(redis.call('HGET', meta, 'journal_bytes')),
        tonumber(redis.call('HGET', meta, 'snap_bytes')),
        tonumber(redis.call('HGET', meta, 'journal_len')), recovered}
"""

# Queue a run for activation, preferring the host that last held it (its state may still be
# warm there) when that host is alive and not already behind; a doorbell goes with it, so
# the host blocked on its bells wakes up. Global keys built here: see the module docstring.
_ENQUEUE = """
local function enqueue(run, meta)
  local h = redis.call('HGET', meta, 'host')
  if h and h ~= '' and redis.call('HEXISTS', 'ud:hosts', h) == 1
     and redis.call('LLEN', 'ud:ready:' .. h) < 2 then
    redis.call('RPUSH', 'ud:ready:' .. h, run)
    redis.call('RPUSH', 'ud:bell:' .. h, 1)
  else
    redis.call('RPUSH', 'ud:ready', run)
    redis.call('RPUSH', 'ud:bell', 1)
  end
end
"""

# KEYS: own-ready global-ready taking
# A host takes a run: its own queue first, then the global one; into its taking list, so
# a host that dies before activating it loses nothing.
TAKE = """
local run = redis.call('LMOVE', KEYS[1], KEYS[3], 'LEFT', 'RIGHT')
if not run then run = redis.call('LMOVE', KEYS[2], KEYS[3], 'LEFT', 'RIGHT') end
return run
"""

# KEYS: meta snap inbox index lease ready  ARGV: run_id agent parent now snapshot first_message
# A new run with a first message is queued for activation in the same step.
CREATE = _ENQUEUE + """
if redis.call('EXISTS', KEYS[1]) == 1 then return 'EXISTS' end
redis.call('HSET', KEYS[1], 'epoch', 0, 'step', 0, 'status', 'pending', 'snap_step', 0,
           'snap_bytes', #ARGV[5], 'journal_bytes', 0, 'journal_len', 0, 'agent', ARGV[2],
           'parent', ARGV[3], 'created', ARGV[4], 'updated', ARGV[4], 'reason', '', 'clean', 1)
redis.call('SET', KEYS[2], ARGV[5])
redis.call('HSET', KEYS[4], ARGV[1], 'pending')
redis.call('SADD', 'ud:state:pending', ARGV[1])
if ARGV[6] ~= '' then
  redis.call('XADD', KEYS[3], '*', 'm', ARGV[6])
  redis.call('SET', KEYS[5], 'ready')
  enqueue(ARGV[1], KEYS[1])
end
if ARGV[3] ~= '' then redis.call('HINCRBY', 'ud:counters', 'spawns_total', 1) end
return 'OK'
"""

# KEYS: meta
CLAIM = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {'NOTFOUND', ''} end
local reason = redis.call('HGET', KEYS[1], 'reason')
if reason and reason ~= '' then return {'QUARANTINED', reason} end
return {'OK', redis.call('HINCRBY', KEYS[1], 'epoch', 1)}
"""

# KEYS: meta inbox lease ready  ARGV: run_id message
# The message is stored, and a passivated run queued for activation, in one step: a host
# that passivates the run checks the inbox in one step too, so either it sees the message
# or the run is queued; a message is never left unread.
_DELIVER_BODY = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return {'NOTFOUND', ''} end
if TERMINAL[status] then return {'ENDED', ''} end
local id = redis.call('XADD', KEYS[2], '*', 'm', ARGV[2])
if redis.call('EXISTS', KEYS[3]) == 1 then return {'ACTIVE', id} end
redis.call('SET', KEYS[3], 'ready')
enqueue(ARGV[1], KEYS[1])
return {'QUEUED', id}
"""
DELIVER = _TERMINAL + _ENQUEUE + _DELIVER_BODY

# KEYS: meta lease leases taking counters index
# ARGV: run_id owner ttl_ms now_ms
ACTIVATE = _TERMINAL + """
redis.call('LREM', KEYS[4], 1, ARGV[1])
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return {'NOTFOUND'} end
local reason = redis.call('HGET', KEYS[1], 'reason')
if reason and reason ~= '' then return {'QUARANTINED', reason} end
local cur = redis.call('GET', KEYS[2])
if cur and cur ~= 'ready' then return {'BUSY', cur} end
local epoch = redis.call('HINCRBY', KEYS[1], 'epoch', 1)
redis.call('SET', KEYS[2], epoch .. '|' .. ARGV[2], 'PX', ARGV[3])
redis.call('ZADD', KEYS[3], tonumber(ARGV[4]) + tonumber(ARGV[3]), ARGV[1])
local clean = redis.call('HGET', KEYS[1], 'clean') or '1'
redis.call('HSET', KEYS[1], 'clean', 0)
if not TERMINAL[status] and status ~= 'running' then
  redis.call('SREM', 'ud:state:' .. status, ARGV[1])
  redis.call('SADD', 'ud:state:running', ARGV[1])
  redis.call('HSET', KEYS[6], ARGV[1], 'running')
  redis.call('HSET', KEYS[1], 'status', 'running')
  status = 'running'
end
redis.call('HINCRBY', KEYS[5], 'activations_total', 1)
return {'OK', epoch, clean, status, redis.call('HGET', KEYS[1], 'step')}
"""

# KEYS: meta lease leases inbox outbox index counters  ARGV: run_id epoch cursor host
# Give the run's process back, unless something arrived meanwhile (then keep going). The
# host is remembered: the run's next wake-up goes to it first, where its state is warm.
PASSIVATE = _TERMINAL + """
local cur = tonumber(redis.call('HGET', KEYS[1], 'epoch') or '-1')
if cur == -1 then return 'NOTFOUND' end
if cur ~= tonumber(ARGV[2]) then return 'FENCED' end
if redis.call('HLEN', KEYS[5]) > 0 then return 'OUTBOX' end
local status = redis.call('HGET', KEYS[1], 'status')
if not TERMINAL[status] and #redis.call('XRANGE', KEYS[4], '(' .. ARGV[3], '+', 'COUNT', 1) > 0 then
  return 'MORE'
end
redis.call('DEL', KEYS[2])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('HSET', KEYS[1], 'clean', 1, 'host', ARGV[4] or '')
if not TERMINAL[status] and status ~= 'waiting' then
  redis.call('SREM', 'ud:state:' .. status, ARGV[1])
  redis.call('SADD', 'ud:state:waiting', ARGV[1])
  redis.call('HSET', KEYS[6], ARGV[1], 'waiting')
  redis.call('HSET', KEYS[1], 'status', 'waiting')
end
redis.call('HINCRBY', KEYS[7], 'passivations_total', 1)
return 'OK'
"""

# KEYS: meta lease leases ready  ARGV: run_id force
# Queue a run for activation: a restart by the supervisor, or `undying resume`. An active
# lease is taken over only with force (the supervisor decided its host is dead); the next
# activation's new epoch fences that host if it is only paused.
REQUEUE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 'NOTFOUND' end
local cur = redis.call('GET', KEYS[2])
if cur and cur ~= 'ready' and ARGV[2] ~= '1' then return 'BUSY' end
redis.call('SET', KEYS[2], 'ready')
redis.call('ZREM', KEYS[3], ARGV[1])
-- the host that last held it may be the one that died: no preference here
redis.call('HSET', KEYS[1], 'host', '')
redis.call('RPUSH', KEYS[4], ARGV[1])
redis.call('RPUSH', 'ud:bell', 1)
return 'OK'
"""

# KEYS: meta lease leases  ARGV: run_id epoch owner ttl_ms now_ms
# A lease is renewed only by the current epoch: a zombie learns here that it is
# superseded even when it has nothing to commit.
RENEW = """
local cur = tonumber(redis.call('HGET', KEYS[1], 'epoch') or '-1')
if cur == -1 then return {'NOTFOUND', 0} end
if cur ~= tonumber(ARGV[2]) then return {'FENCED', cur} end
-- extend only a lease still held: a renewal racing the host's own passivation must not
-- bring back a lease it gave up (a message delivered then would find the run "active")
if redis.call('GET', KEYS[2]) ~= ARGV[2] .. '|' .. ARGV[3] then return {'GONE', cur} end
redis.call('PEXPIRE', KEYS[2], ARGV[4])
redis.call('ZADD', KEYS[3], tonumber(ARGV[5]) + tonumber(ARGV[4]), ARGV[1])
return {'OK', cur}
"""

# KEYS: meta lease leases  ARGV: run_id epoch done
# done=1: the run ended here, nobody needs to watch it; done=0: expire now, so the
# supervisor restarts the run at once instead of waiting out the lease (a drain).
RELEASE = """
local cur = tonumber(redis.call('HGET', KEYS[1], 'epoch') or '-1')
if cur ~= tonumber(ARGV[2]) then return 0 end
redis.call('DEL', KEYS[2])
if ARGV[3] == '1' then
  redis.call('ZREM', KEYS[3], ARGV[1])
  redis.call('HSET', KEYS[1], 'clean', 1)
else redis.call('ZADD', KEYS[3], 0, ARGV[1]) end
return 1
"""

# KEYS: meta fx fxdue execset  ARGV: run_id effect_id attempt executor lease_ms now_ms member
# An executor claims one dispatch (effect id + attempt) before running it: a re-sent
# dispatch, or one superseded by a newer attempt, is refused here, so each attempt runs
# at most once, and only while the run still waits for it.
FX_CLAIM = _TERMINAL + """
local status = redis.call('HGET', KEYS[1], 'status')
local member = ARGV[1] .. '|' .. ARGV[2]
if not status or TERMINAL[status] then
  redis.call('HDEL', KEYS[2], ARGV[2])
  redis.call('ZREM', KEYS[3], member)
  return {'GONE', ''}
end
local cur = redis.call('HGET', KEYS[2], ARGV[2])
-- its own claim: a retry after a lost reply (a second copy of a dispatch sent to the same
-- executor is refused by the executor, which knows what it is running)
if cur == ARGV[3] .. '|c|' .. ARGV[4] then return {'OK', ''} end
if cur ~= ARGV[3] .. '|q' then return {'SKIP', cur or ''} end
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3] .. '|c|' .. ARGV[4])
redis.call('ZADD', KEYS[3], tonumber(ARGV[6]) + tonumber(ARGV[5]), member)
redis.call('SADD', KEYS[4], ARGV[7])
return {'OK', ''}
"""

# KEYS: fx  ARGV: effect_id attempt
# An at-most-once call is about to happen: from here on, losing its executor leaves it in doubt.
FX_START = """
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if not cur or string.sub(cur, 1, #ARGV[2] + 3) ~= ARGV[2] .. '|c|' then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. '|s|' .. string.sub(cur, #ARGV[2] + 4))
return 1
"""

# KEYS: meta inbox lease ready fx fxdue execset  ARGV: run_id message effect_id attempt member
# The result goes to the run's inbox and the dispatch record is dropped in one step.
FX_COMPLETE = _TERMINAL + _ENQUEUE + """
redis.call('SREM', KEYS[7], ARGV[5])
local cur = redis.call('HGET', KEYS[5], ARGV[3])
if cur and string.sub(cur, 1, #ARGV[4] + 1) == ARGV[4] .. '|' then
  redis.call('HDEL', KEYS[5], ARGV[3])
  redis.call('ZREM', KEYS[6], ARGV[1] .. '|' .. ARGV[3])
end
""" + _DELIVER_BODY

# KEYS: fxdue  ARGV: until_ms members...
FX_HEARTBEAT = """
local n = 0
for i = 2, #ARGV do
  n = n + redis.call('ZADD', KEYS[1], 'XX', 'CH', tonumber(ARGV[1]), ARGV[i])
end
return n
"""

# KEYS: ledger nonces  ARGV: field nonce
LEDGER = """
if redis.call('SADD', KEYS[2], ARGV[2]) == 0 then
  return tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
end
return redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
"""

# KEYS: meta index lease leases  ARGV: run_id reason now
QUARANTINE = _TERMINAL + """
if redis.call('EXISTS', KEYS[1]) == 0 then return 'NOTFOUND' end
redis.call('DEL', KEYS[3])
redis.call('ZREM', KEYS[4], ARGV[1])
local old = redis.call('HGET', KEYS[1], 'status')
if not TERMINAL[old] then redis.call('HINCRBY', 'ud:counters', 'ended|quarantined', 1) end
redis.call('HSET', KEYS[1], 'status', 'quarantined', 'reason', ARGV[2], 'updated', ARGV[3])
redis.call('SREM', 'ud:state:' .. old, ARGV[1])
redis.call('SADD', 'ud:state:quarantined', ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], 'quarantined')
return 'OK'
"""
