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
  ud:{R}:lease    who hosts the run: "ready" (queued) or "<epoch>|<host>|<node>|<pid>"
  ud:{R}:fx       hash effect id -> "<attempt>|q" (dispatched) or "<attempt>|c|<executor>"

Activation, the ready queue, dispatch records and timers are in
`_redis_activation.RedisActivation`; the scripts in `_lua`; key names in `_keys`.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from . import _lua as lua
from ._errors import (
    Fenced,
    Quarantined,
    RunExists,
    RunNotFound,
    StepConflict,
    StoreUnavailable,
)
from ._keys import APPROVALS, COUNTERS, ENDED, FX_DUE, INDEX, LEASES, READY, TIMERS, _k, _s, _state_key
from ._redis_activation import RedisActivation, delivery
from ._redis_history import RedisHistory
from ._store import (
    STATUSES,
    Commit,
    CommitResult,
    Delivery,
    EventEntry,
    InboxEntry,
    Loaded,
    RunInfo,
)

T = TypeVar("T")

_RUN_PARTS = ("meta", "snap", "journal", "events", "inbox", "outbox", "seen", "ledger",
              "ledger_nonces", "lease", "restarts", "fx", "crash", "origin", "hist")


class RedisStore(RedisActivation, RedisHistory):
    """`CheckpointStore` on one Redis server (standalone, replica or Sentinel primary).

    Connection errors are retried with back-off for up to ``unavailable_s``
    seconds, so a Redis restart pauses runs instead of failing them. A commit
    whose reply was lost is retried; the script then sees its own step
    already stored under the same epoch and that is taken as success.
    """

    def __init__(self, url: str, *, unavailable_s: float = 60.0,
                 on_write: Callable[[str], None] | None = None,
                 dispatch_timeout_ms: int = 10_000) -> None:
        self.url = url
        # a dispatched call no executor claimed within this is reported lost
        self.dispatch_timeout_ms = dispatch_timeout_ms
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
        self._commit = self.r.register_script(lua.COMMIT)
        self._create = self.r.register_script(lua.CREATE)
        self._claim = self.r.register_script(lua.CLAIM)
        self._deliver = self.r.register_script(lua.DELIVER)
        self._quarantine = self.r.register_script(lua.QUARANTINE)
        self._renew = self.r.register_script(lua.RENEW)
        self._ledger = self.r.register_script(lua.LEDGER)
        self._release = self.r.register_script(lua.RELEASE)
        self._activate = self.r.register_script(lua.ACTIVATE)
        self._passivate = self.r.register_script(lua.PASSIVATE)
        self._requeue = self.r.register_script(lua.REQUEUE)
        self._fx_claim = self.r.register_script(lua.FX_CLAIM)
        self._fx_complete = self.r.register_script(lua.FX_COMPLETE)
        self._fx_heartbeat = self.r.register_script(lua.FX_HEARTBEAT)
        self._fx_start = self.r.register_script(lua.FX_START)
        self._take = self.r.register_script(lua.TAKE)
        # BLMOVE blocks its connection: the ready queue gets a client of its own
        self._blocking: Any = None

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
            keys=[_k(run_id, "meta"), _k(run_id, "snap"), _k(run_id, "inbox"), INDEX,
                  _k(run_id, "lease"), READY],
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
                           nonce, len(c.effects), len(c.timers), self.dispatch_timeout_ms,
                           len(c.approvals), c.kind]
        args.extend(c.events)
        for mid, env in c.outbox:
            args.extend((mid, env))
        args.extend(c.seen)
        for eid, attempt in c.effects:
            args.extend((eid, attempt))
        for tid, at in c.timers:
            args.extend((tid, at))
        for call_id, waiting in c.approvals:
            args.extend((call_id, "1" if waiting else "0"))
        keys = [_k(run_id, p) for p in ("meta", "snap", "journal", "events", "outbox", "seen")]
        keys += [INDEX, COUNTERS, _k(run_id, "fx"), FX_DUE, TIMERS, APPROVALS,
                 _k(run_id, "origin"), _k(run_id, "hist"), ENDED]
        res = self._retry(lambda: self._commit(keys=keys, args=args))
        tag = _s(res[0])
        if tag == "OK":
            self._wrote("commit")
            return CommitResult(int(res[1]), int(res[2]), int(res[3]),
                                int(res[4]) if len(res) > 4 else -1)
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
            keys=[_k(run_id, "meta"), INDEX, _k(run_id, "lease"), LEASES],
            args=[run_id, reason[:2000], now]))
        if _s(res) == "NOTFOUND":
            raise RunNotFound(run_id)
        self._wrote("quarantine")

    def delete(self, run_id: str) -> None:
        def do() -> None:
            status = self.r.hget(_k(run_id, "meta"), "status")
            fx = self.r.hkeys(_k(run_id, "fx"))
            segments = self.r.lrange(_k(run_id, "hist"), 0, -1)
            p = self.r.pipeline(transaction=True)
            if fx:
                p.zrem(FX_DUE, *(f"{run_id}|{_s(e)}" for e in fx))
            for seg in segments:
                p.delete(_k(run_id, f"hist:{_s(seg)}"))
            p.delete(*(_k(run_id, part) for part in _RUN_PARTS))
            p.hdel(INDEX, run_id)
            p.zrem(LEASES, run_id)
            p.zrem(ENDED, run_id)
            if status is not None:
                p.srem(_state_key(_s(status)), run_id)
            p.execute()

        self._retry(do)
        self._wrote("delete")

    # -- messages -----------------------------------------------------------

    def send(self, run_id: str, message: bytes) -> str:
        """Store a message in the run's inbox (and queue the run if it is passivated)."""
        return self.deliver(run_id, message).entry_id

    def deliver(self, run_id: str, message: bytes) -> Delivery:
        res = self._retry(lambda: self._deliver(
            keys=[_k(run_id, "meta"), _k(run_id, "inbox"), _k(run_id, "lease"), READY],
            args=[run_id, message]))
        return delivery(run_id, res)

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

    def approvals_pending(self) -> list[tuple[str, str, int]]:
        """Tool calls waiting for someone's decision: (run id, call id, since ms)."""
        rows = self._retry(lambda: self.r.zrange(APPROVALS, 0, -1, withscores=True))
        return [(*_s(m).rsplit("|", 1), int(sc)) for m, sc in rows]  # type: ignore[misc]

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
