"""The checkpoint store on Redis.

Layout: every key of one run shares the hash tag ``{run_id}`` so one commit
stays inside one slot on Redis Cluster. The run index (``ud:index``, a hash
run -> status, and ``ud:state:<status>`` sets) and the cluster-wide counters
(``ud:counters``) are global keys updated by the same script; on Redis Cluster
they would need to move out of the commit (see docs/DESIGN-NOTES.md).

  ud:{R}:meta     hash: epoch, step, status, snap_step, snap_bytes,
                  journal_bytes, journal_len, agent, parent, created, updated,
                  reason
  ud:{R}:snap     the latest full snapshot
  ud:{R}:journal  list of step deltas since that snapshot
  ud:{R}:events   stream of step events (history, live watch)
  ud:{R}:inbox    stream of messages to the run (durable inbox)
  ud:{R}:outbox   hash message id -> envelope, committed but not yet relayed
  ud:{R}:seen     set of inbox message ids already applied (dedup)
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from ._errors import (
    Fenced,
    Quarantined,
    RunExists,
    RunNotFound,
    StepConflict,
    StoreUnavailable,
)
from ._store import (
    STATUSES,
    Commit,
    CommitResult,
    EventEntry,
    InboxEntry,
    Loaded,
    RunInfo,
)

T = TypeVar("T")

INDEX = "ud:index"
COUNTERS = "ud:counters"


def _k(run_id: str, part: str) -> str:
    return f"ud:{{{run_id}}}:{part}"


def _state_key(status: str) -> str:
    return f"ud:state:{status}"


# KEYS: meta snap journal events outbox seen index counters
# ARGV: epoch step status now run_id delta snapshot n_events n_outbox n_seen nonce
#       events... (outbox id, envelope)... seen...
_COMMIT = """
local meta = KEYS[1]
local cur = tonumber(redis.call('HGET', meta, 'epoch') or '-1')
if cur == -1 then return {'NOTFOUND', 0} end
if cur ~= tonumber(ARGV[1]) then return {'FENCED', cur} end
local reason = redis.call('HGET', meta, 'reason')
if reason and reason ~= '' then return {'QUARANTINED', reason} end
local stored = tonumber(redis.call('HGET', meta, 'step') or '0')
local step = tonumber(ARGV[2])
if step ~= stored + 1 then return {'STEP', stored, redis.call('HGET', meta, 'nonce') or ''} end
local delta, snapshot = ARGV[6], ARGV[7]
local nbytes = 0
if snapshot ~= '' then
  redis.call('SET', KEYS[2], snapshot)
  redis.call('DEL', KEYS[3])
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
redis.call('HSET', meta, 'step', step, 'status', status, 'updated', ARGV[4], 'nonce', ARGV[11])
if old ~= status then
  redis.call('SREM', 'ud:state:' .. old, ARGV[5])
  redis.call('SADD', 'ud:state:' .. status, ARGV[5])
  redis.call('HSET', KEYS[7], ARGV[5], status)
end
local ne, no, ns = tonumber(ARGV[8]), tonumber(ARGV[9]), tonumber(ARGV[10])
local i = 12
for _ = 1, ne do
  redis.call('XADD', KEYS[4], '*', 'e', ARGV[i]); i = i + 1
end
for _ = 1, no do
  redis.call('HSET', KEYS[5], ARGV[i], ARGV[i + 1]); i = i + 2
end
for _ = 1, ns do
  redis.call('SADD', KEYS[6], ARGV[i]); i = i + 1
end
redis.call('HINCRBY', KEYS[8], 'steps_total', 1)
redis.call('HINCRBY', KEYS[8], 'commit_bytes_total', nbytes)
return {'OK', tonumber(redis.call('HGET', meta, 'journal_bytes')),
        tonumber(redis.call('HGET', meta, 'snap_bytes')),
        tonumber(redis.call('HGET', meta, 'journal_len'))}
"""

# KEYS: meta snap inbox index  ARGV: run_id agent parent now snapshot first_message
_CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 'EXISTS' end
redis.call('HSET', KEYS[1], 'epoch', 0, 'step', 0, 'status', 'pending', 'snap_step', 0,
           'snap_bytes', #ARGV[5], 'journal_bytes', 0, 'journal_len', 0, 'agent', ARGV[2],
           'parent', ARGV[3], 'created', ARGV[4], 'updated', ARGV[4], 'reason', '')
redis.call('SET', KEYS[2], ARGV[5])
if ARGV[6] ~= '' then redis.call('XADD', KEYS[3], '*', 'm', ARGV[6]) end
redis.call('HSET', KEYS[4], ARGV[1], 'pending')
redis.call('SADD', 'ud:state:pending', ARGV[1])
return 'OK'
"""

# KEYS: meta
_CLAIM = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {'NOTFOUND', ''} end
local reason = redis.call('HGET', KEYS[1], 'reason')
if reason and reason ~= '' then return {'QUARANTINED', reason} end
return {'OK', redis.call('HINCRBY', KEYS[1], 'epoch', 1)}
"""

# KEYS: meta inbox  ARGV: message
_SEND = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {'NOTFOUND', ''} end
return {'OK', redis.call('XADD', KEYS[2], '*', 'm', ARGV[1])}
"""

# KEYS: meta index  ARGV: run_id reason now
_QUARANTINE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 'NOTFOUND' end
local old = redis.call('HGET', KEYS[1], 'status')
redis.call('HSET', KEYS[1], 'status', 'quarantined', 'reason', ARGV[2], 'updated', ARGV[3])
redis.call('SREM', 'ud:state:' .. old, ARGV[1])
redis.call('SADD', 'ud:state:quarantined', ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], 'quarantined')
return 'OK'
"""

# KEYS: meta lease leases  ARGV: run_id epoch owner ttl_ms now_ms
# A lease is renewed only by the current epoch: a zombie learns here that it is
# superseded even when it has nothing to commit.
_RENEW = """
local cur = tonumber(redis.call('HGET', KEYS[1], 'epoch') or '-1')
if cur == -1 then return {'NOTFOUND', 0} end
if cur ~= tonumber(ARGV[2]) then return {'FENCED', cur} end
redis.call('SET', KEYS[2], ARGV[3], 'PX', ARGV[4])
redis.call('ZADD', KEYS[3], tonumber(ARGV[5]) + tonumber(ARGV[4]), ARGV[1])
return {'OK', cur}
"""

# KEYS: meta lease leases  ARGV: run_id epoch done
# done=1: the run ended here, nobody needs to watch it; done=0: expire now, so the
# supervisor restarts the run at once instead of waiting out the lease.
_RELEASE = """
local cur = tonumber(redis.call('HGET', KEYS[1], 'epoch') or '-1')
if cur ~= tonumber(ARGV[2]) then return 0 end
redis.call('DEL', KEYS[2])
if ARGV[3] == '1' then redis.call('ZREM', KEYS[3], ARGV[1])
else redis.call('ZADD', KEYS[3], 0, ARGV[1]) end
return 1
"""

LEASES = "ud:leases"

# KEYS: ledger nonces  ARGV: field nonce
_LEDGER = """
if redis.call('SADD', KEYS[2], ARGV[2]) == 0 then
  return tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
end
return redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
"""

_RUN_PARTS = ("meta", "snap", "journal", "events", "inbox", "outbox", "seen", "ledger",
              "ledger_nonces", "lease", "restarts")


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


class RedisStore:
    """`CheckpointStore` on one Redis server (standalone, replica or Sentinel primary).

    Connection errors are retried with back-off for up to ``unavailable_s``
    seconds, so a Redis restart pauses runs instead of failing them. A commit
    whose reply was lost is retried; the script then sees its own step
    already stored under the same epoch and that is taken as success.
    """

    def __init__(self, url: str, *, unavailable_s: float = 60.0,
                 on_write: Callable[[str], None] | None = None) -> None:
        self.url = url
        self.unavailable_s = unavailable_s
        self.on_write = on_write
        # Any: redis-py's overloads type every reply as bytes | str | Awaitable
        self.r: Any = redis.Redis.from_url(
            url,
            socket_timeout=10,
            socket_connect_timeout=2,
            health_check_interval=0,
            retry=Retry(ExponentialBackoff(cap=0.5, base=0.02), 3),
            retry_on_error=[redis.ConnectionError, redis.TimeoutError],
        )
        self._commit = self.r.register_script(_COMMIT)
        self._create = self.r.register_script(_CREATE)
        self._claim = self.r.register_script(_CLAIM)
        self._send = self.r.register_script(_SEND)
        self._quarantine = self.r.register_script(_QUARANTINE)
        self._renew = self.r.register_script(_RENEW)
        self._ledger = self.r.register_script(_LEDGER)
        self._release = self.r.register_script(_RELEASE)

    # -- plumbing ---------------------------------------------------------

    def _retry(self, fn: Callable[[], T]) -> T:
        deadline = time.monotonic() + self.unavailable_s
        delay = 0.02
        while True:
            try:
                return fn()
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                if time.monotonic() >= deadline:
                    raise StoreUnavailable(self._safe_url(), str(exc)) from None
                time.sleep(delay)
                delay = min(delay * 2, 0.5)
            except redis.ResponseError as exc:
                # a restarted server still loading its AOF answers LOADING: wait for it
                if "LOADING" in str(exc) and time.monotonic() < deadline:
                    time.sleep(delay)
                    delay = min(delay * 2, 0.5)
                    continue
                raise

    def _safe_url(self) -> str:
        # never print a password
        kw = self.r.connection_pool.connection_kwargs
        return f"{kw.get('host', '?')}:{kw.get('port', '?')}"

    def _wrote(self, what: str) -> None:
        if self.on_write is not None:
            self.on_write(what)

    def ping(self) -> bool:
        return bool(self._retry(self.r.ping))

    def close(self) -> None:
        self.r.close()

    # -- checkpoints --------------------------------------------------------

    def create(self, run_id: str, snapshot: bytes, *, agent: str, parent: str = "",
               first_message: bytes = b"") -> None:
        now = str(int(time.time() * 1000))
        res = self._retry(lambda: self._create(
            keys=[_k(run_id, "meta"), _k(run_id, "snap"), _k(run_id, "inbox"), INDEX],
            args=[run_id, agent, parent, now, snapshot, first_message]))
        if _s(res) == "EXISTS":
            raise RunExists(run_id)
        self._wrote("create")

    def load(self, run_id: str) -> Loaded:
        def read() -> list[Any]:
            p = self.r.pipeline(transaction=True)
            p.hgetall(_k(run_id, "meta"))
            p.get(_k(run_id, "snap"))
            p.lrange(_k(run_id, "journal"), 0, -1)
            p.smembers(_k(run_id, "seen"))
            p.hgetall(_k(run_id, "outbox"))
            return p.execute()

        meta_raw, snap, journal, seen, outbox = self._retry(read)
        if not meta_raw:
            raise RunNotFound(run_id)
        meta = {_s(k): _s(v) for k, v in meta_raw.items()}
        if meta.get("reason"):
            raise Quarantined(run_id, meta["reason"])
        return Loaded(
            run_id=run_id,
            epoch=int(meta["epoch"]),
            step=int(meta["step"]),
            status=meta["status"],
            snapshot=snap or b"",
            snapshot_step=int(meta.get("snap_step", 0)),
            deltas=tuple(journal),
            journal_bytes=int(meta.get("journal_bytes", 0)),
            snapshot_bytes=int(meta.get("snap_bytes", 0)),
            seen=frozenset(_s(x) for x in seen),
            outbox=tuple(sorted((_s(k), v) for k, v in outbox.items())),
            agent=meta.get("agent", ""),
            parent=meta.get("parent", ""),
        )

    def commit(self, run_id: str, c: Commit) -> CommitResult:
        if c.status not in STATUSES:
            raise ValueError(f"run {run_id!r}: unknown status {c.status!r}")
        nonce = uuid.uuid4().hex
        args: list[Any] = [c.epoch, c.step, c.status, str(int(time.time() * 1000)), run_id,
                           c.delta, c.snapshot, len(c.events), len(c.outbox), len(c.seen),
                           nonce]
        args.extend(c.events)
        for mid, env in c.outbox:
            args.extend((mid, env))
        args.extend(c.seen)
        keys = [_k(run_id, p) for p in ("meta", "snap", "journal", "events", "outbox", "seen")]
        keys += [INDEX, COUNTERS]
        res = self._retry(lambda: self._commit(keys=keys, args=args))
        tag = _s(res[0])
        if tag == "OK":
            self._wrote("commit")
            return CommitResult(int(res[1]), int(res[2]), int(res[3]))
        if tag == "FENCED":
            raise Fenced(run_id, c.epoch, int(res[1]))
        if tag == "STEP":
            if int(res[1]) == c.step and _s(res[2]) == nonce:
                # this very commit, applied before its reply was lost and then retried
                meta = self._retry(lambda: self.r.hmget(
                    _k(run_id, "meta"), "journal_bytes", "snap_bytes", "journal_len"))
                self._wrote("commit")
                return CommitResult(*(int(x or 0) for x in meta))
            raise StepConflict(run_id, c.step, int(res[1]))
        if tag == "QUARANTINED":
            raise Quarantined(run_id, _s(res[1]))
        raise RunNotFound(run_id)

    def claim_epoch(self, run_id: str) -> int:
        res = self._retry(lambda: self._claim(keys=[_k(run_id, "meta")]))
        tag = _s(res[0])
        if tag == "NOTFOUND":
            raise RunNotFound(run_id)
        if tag == "QUARANTINED":
            raise Quarantined(run_id, _s(res[1]))
        self._wrote("claim")
        return int(res[1])

    def info(self, run_id: str) -> RunInfo:
        meta_raw = self._retry(lambda: self.r.hgetall(_k(run_id, "meta")))
        if not meta_raw:
            raise RunNotFound(run_id)
        return _info(run_id, {_s(k): _s(v) for k, v in meta_raw.items()})

    def list_runs(self, status: str | None = None) -> list[RunInfo]:
        if status is None:
            index = self._retry(lambda: self.r.hgetall(INDEX))
            ids = sorted(_s(k) for k in index)
        else:
            ids = sorted(_s(x) for x in self._retry(lambda: self.r.smembers(_state_key(status))))
        if not ids:
            return []

        def read() -> list[Any]:
            p = self.r.pipeline(transaction=False)
            for rid in ids:
                p.hgetall(_k(rid, "meta"))
            return p.execute()

        out = []
        for rid, meta_raw in zip(ids, self._retry(read), strict=True):
            if meta_raw:
                out.append(_info(rid, {_s(k): _s(v) for k, v in meta_raw.items()}))
        return out

    def quarantine(self, run_id: str, reason: str) -> None:
        now = str(int(time.time() * 1000))
        res = self._retry(lambda: self._quarantine(
            keys=[_k(run_id, "meta"), INDEX], args=[run_id, reason[:2000], now]))
        if _s(res) == "NOTFOUND":
            raise RunNotFound(run_id)
        self._wrote("quarantine")

    def delete(self, run_id: str) -> None:
        def do() -> None:
            status = self.r.hget(_k(run_id, "meta"), "status")
            p = self.r.pipeline(transaction=True)
            p.delete(*(_k(run_id, part) for part in _RUN_PARTS))
            p.hdel(INDEX, run_id)
            p.zrem(LEASES, run_id)
            if status is not None:
                p.srem(_state_key(_s(status)), run_id)
            p.execute()

        self._retry(do)
        self._wrote("delete")

    # -- messages -----------------------------------------------------------

    def send(self, run_id: str, message: bytes) -> str:
        res = self._retry(lambda: self._send(
            keys=[_k(run_id, "meta"), _k(run_id, "inbox")], args=[message]))
        if _s(res[0]) == "NOTFOUND":
            raise RunNotFound(run_id)
        return _s(res[1])

    def read_inbox(self, run_id: str, after: str, count: int = 100) -> list[InboxEntry]:
        rows = self._retry(lambda: self.r.xrange(_k(run_id, "inbox"), f"({after}", "+", count))
        return [InboxEntry(_s(eid), fields[b"m"]) for eid, fields in rows]

    def mark_relayed(self, run_id: str, message_id: str) -> None:
        self._retry(lambda: self.r.hdel(_k(run_id, "outbox"), message_id))

    # -- history ------------------------------------------------------------

    def read_events(self, run_id: str, after: str = "0-0", count: int = 1000,
                    block_ms: int | None = None) -> list[EventEntry]:
        key = _k(run_id, "events")
        if block_ms is None:
            rows = self._retry(lambda: self.r.xrange(key, f"({after}", "+", count))
            return [EventEntry(_s(eid), f[b"e"]) for eid, f in rows]
        res = self._retry(lambda: self.r.xread({key: after}, count=count, block=block_ms))
        if not res:
            return []
        return [EventEntry(_s(eid), f[b"e"]) for eid, f in res[0][1]]

    # -- leases ---------------------------------------------------------------

    def renew_lease(self, run_id: str, epoch: int, owner: str, ttl_ms: int) -> None:
        """Hold or extend the run's lease for this epoch; `Fenced` if superseded."""
        now = int(time.time() * 1000)
        res = self._retry(lambda: self._renew(
            keys=[_k(run_id, "meta"), _k(run_id, "lease"), LEASES],
            args=[run_id, epoch, owner, ttl_ms, now]))
        tag = _s(res[0])
        if tag == "FENCED":
            raise Fenced(run_id, epoch, int(res[1]))
        if tag == "NOTFOUND":
            raise RunNotFound(run_id)

    def release_lease(self, run_id: str, epoch: int, *, done: bool) -> bool:
        res = self._retry(lambda: self._release(
            keys=[_k(run_id, "meta"), _k(run_id, "lease"), LEASES],
            args=[run_id, epoch, "1" if done else "0"]))
        return bool(res)

    def lease_owner(self, run_id: str) -> str | None:
        v = self._retry(lambda: self.r.get(_k(run_id, "lease")))
        return None if v is None else _s(v)

    def expired_leases(self, now_ms: int | None = None, count: int = 1000) -> list[tuple[str, int]]:
        """Runs whose lease expired by ``now_ms``: (run id, expiry ms)."""
        now = int(time.time() * 1000) if now_ms is None else now_ms
        rows = self._retry(lambda: self.r.zrangebyscore(LEASES, 0, now, start=0, num=count,
                                                        withscores=True))
        return [(_s(m), int(sc)) for m, sc in rows]

    def leases(self) -> dict[str, int]:
        rows = self._retry(lambda: self.r.zrange(LEASES, 0, -1, withscores=True))
        return {_s(m): int(sc) for m, sc in rows}

    def forget_lease(self, run_id: str) -> None:
        self._retry(lambda: self.r.zrem(LEASES, run_id))

    # -- supervision records (restart times survive the supervisor) -------------

    def record_restart(self, run_id: str, at: float, event: bytes = b"") -> None:
        """Remember a restart (for the crash-loop window) and put it in the run's history."""
        def do() -> None:
            p = self.r.pipeline(transaction=True)
            p.rpush(_k(run_id, "restarts"), repr(at))
            p.ltrim(_k(run_id, "restarts"), -100, -1)
            if event:
                p.xadd(_k(run_id, "events"), {"e": event})
            p.hincrby(COUNTERS, "restarts_total", 1)
            p.execute()

        self._retry(do)

    def restarts(self, run_id: str) -> list[float]:
        return [float(_s(x)) for x in self._retry(lambda: self.r.lrange(_k(run_id, "restarts"), 0, -1))]

    # -- the tool ledger (counts real executions; not part of a checkpoint) ---

    def ledger_record(self, run_id: str, tool: str, key: str) -> int:
        # a nonce per execution: a retry after a lost reply does not count it twice
        nonce = uuid.uuid4().hex
        return int(self._retry(lambda: self._ledger(
            keys=[_k(run_id, "ledger"), _k(run_id, "ledger_nonces")],
            args=[f"{tool}|{key}", nonce])))

    def ledger(self, run_id: str) -> dict[str, int]:
        raw = self._retry(lambda: self.r.hgetall(_k(run_id, "ledger")))
        return {_s(k): int(v) for k, v in raw.items()}

    def counters(self) -> dict[str, int]:
        raw = self._retry(lambda: self.r.hgetall(COUNTERS))
        return {_s(k): int(v) for k, v in raw.items()}


def _info(run_id: str, meta: dict[str, str]) -> RunInfo:
    return RunInfo(
        run_id=run_id,
        status=meta.get("status", "?"),
        step=int(meta.get("step", 0)),
        epoch=int(meta.get("epoch", 0)),
        agent=meta.get("agent", ""),
        parent=meta.get("parent", ""),
        created_ms=int(meta.get("created", 0)),
        updated_ms=int(meta.get("updated", 0)),
        reason=meta.get("reason", ""),
    )
