"""The Lua scripts of the Redis scheduler (``redis_backend.py``): each one atomic step
on the shared queue, slots, leases and worker records, so that a request costs as few
round trips as its path allows.  Key names are in the docstring of ``redis_backend``."""

# Taking the slot of a queued task on a worker: the task must be at the head of its
# model's queue and the worker must have room.  Shared by the admission (a task that
# is at the head as it arrives takes its slot in the same round trip) and the dispatch.
_TAKE = """
local function take(q, task, w, qlen, leases, id, lease_ms, worker)
  if redis.call('ZRANGE', q, 0, 0)[1] ~= id then return 0 end
  local info = redis.call('HMGET', w, 'outstanding', 'capacity')
  if not info[2] or tonumber(info[1] or '0') >= tonumber(info[2]) then return -1 end
  local t = redis.call('TIME')
  local now = t[1] * 1000 + math.floor(t[2] / 1000)
  redis.call('ZREM', q, id)
  redis.call('DECR', qlen)
  redis.call('HINCRBY', w, 'outstanding', 1)
  redis.call('HSET', task, 'worker', worker)
  redis.call('ZADD', leases, now + tonumber(lease_ms), id)
  return 1
end
"""

ADMIT = (
    _TAKE
    + """
-- KEYS: qlen, q:<model>, task:<id>, seq, wait:<id>, w:<worker>, leases
-- ARGV: id, model, owner, priority, max, wait_ms, lease_ms, worker ('' = none free)
-- 0 full, 1 queued, 2 adopted (a retry of a waiting task), 3 exists and is not
-- waiting, 4 queued and its slot taken at once.
if redis.call('EXISTS', KEYS[3]) == 1 then
  if redis.call('ZSCORE', KEYS[2], ARGV[1]) then
    redis.call('HSET', KEYS[3], 'owner', ARGV[3])
    redis.call('SET', KEYS[5], ARGV[3], 'PX', ARGV[6])
    return 2
  end
  return 3
end
if tonumber(redis.call('GET', KEYS[1]) or '0') >= tonumber(ARGV[5]) then return 0 end
local score = (100 - tonumber(ARGV[4])) * 1099511627776 + redis.call('INCR', KEYS[4])
redis.call('ZADD', KEYS[2], score, ARGV[1])
redis.call('HSET', KEYS[3], 'model', ARGV[2], 'owner', ARGV[3], 'score', score)
redis.call('INCR', KEYS[1])
if ARGV[8] ~= '' and take(KEYS[2], KEYS[3], KEYS[6], KEYS[1], KEYS[7], ARGV[1], ARGV[7], ARGV[8]) == 1 then
  return 4
end
redis.call('SET', KEYS[5], ARGV[3], 'PX', ARGV[6])
return 1
"""
)

CLAIM = (
    _TAKE
    + """
-- KEYS: q:<model>, task:<id>, w:<worker>, qlen, leases   ARGV: id, lease_ms, worker
return take(KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], ARGV[1], ARGV[2], ARGV[3])
"""
)

RELEASE = """
-- KEYS: w:<worker>, task:<id>, leases   ARGV: id, pump channel
if redis.call('ZREM', KEYS[3], ARGV[1]) == 1 and redis.call('EXISTS', KEYS[1]) == 1 then
  if redis.call('HINCRBY', KEYS[1], 'outstanding', -1) < 0 then
    redis.call('HSET', KEYS[1], 'outstanding', 0)
  end
end
redis.call('DEL', KEYS[2])
redis.call('PUBLISH', ARGV[2], '1')
return 1
"""

# The pool as a coordinator sees it, with the owners of fine-tuned models read in the
# same atomic step (see ``Scheduler.view``), and Redis's clock.
POOL = """
-- KEYS: workers, model_owners   ARGV: prefix
local ids = redis.call('SMEMBERS', KEYS[1])
local rows = {}
for i, id in ipairs(ids) do rows[i] = redis.call('HGETALL', ARGV[1] .. 'w:' .. id) end
local t = redis.call('TIME')
return {t[1], t[2], rows, redis.call('HGETALL', KEYS[2])}
"""

WITHDRAW = """
-- KEYS: q:<model>, task:<id>, qlen   ARGV: id
if redis.call('ZREM', KEYS[1], ARGV[1]) == 1 then
  redis.call('DECR', KEYS[3])
  redis.call('DEL', KEYS[2])
  return 1
end
return 0
"""

REAP = """
-- KEYS: leases, qlen   ARGV: prefix     Expired leases: back to the queue, slot freed.
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
for _, id in ipairs(expired) do
  redis.call('ZREM', KEYS[1], id)
  local task = ARGV[1] .. 'task:' .. id
  local f = redis.call('HMGET', task, 'model', 'score', 'worker')
  if f[1] then
    local w = ARGV[1] .. 'w:' .. (f[3] or '')
    if f[3] and redis.call('EXISTS', w) == 1 then
      if redis.call('HINCRBY', w, 'outstanding', -1) < 0 then redis.call('HSET', w, 'outstanding', 0) end
    end
    redis.call('HDEL', task, 'worker')
    redis.call('ZADD', ARGV[1] .. 'q:' .. f[1], f[2], id)
    redis.call('INCR', KEYS[2])
  end
end
return #expired
"""

DROP_ORPHAN = """
-- KEYS: q:<model>, qlen   ARGV: prefix, head   Drop the head task (still the one the
-- caller looked at) if nobody waits for it: its waiter's mark lapsed (its coordinator
-- died, or it came back from an expired lease and no retry adopted it).
local head = redis.call('ZRANGE', KEYS[1], 0, 0)[1]
if head ~= ARGV[2] then return 0 end
if redis.call('EXISTS', ARGV[1] .. 'wait:' .. head) == 1 then return 0 end
redis.call('ZREM', KEYS[1], head)
redis.call('DECR', KEYS[2])
redis.call('DEL', ARGV[1] .. 'task:' .. head)
return 1
"""

HEARTBEAT = """
-- KEYS: w:<worker>   ARGV: running, tokens
-- The progress rule is pool.progressed, applied here atomically with the write (two
-- coordinators record the same worker's beats); a contract test checks they agree.
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
if redis.call('HGET', KEYS[1], 'tokens') ~= ARGV[2] or ARGV[1] == '0' then
  redis.call('HSET', KEYS[1], 'progress', now)
end
redis.call('HSET', KEYS[1], 'hb', now, 'running', ARGV[1], 'tokens', ARGV[2])
return 1
"""


RENEW = """
-- KEYS: leases   ARGV: id, lease_ms
local t = redis.call('TIME')
return redis.call('ZADD', KEYS[1], 'XX', t[1] * 1000 + math.floor(t[2] / 1000) + tonumber(ARGV[2]), ARGV[1])
"""
