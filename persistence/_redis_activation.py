"""Who hosts a run, and what it waits for: the activation half of the Redis store.

A run is *active* while a host holds its lease, *queued* while its id waits in
the ready queue, *passivated* otherwise (it holds no process). Hosts take runs
from the ready queue with BLMOVE into a list of their own, so a host that dies
between taking a run and activating it loses nothing: the supervisor moves
that list back. Model and tool calls are recorded per dispatch (effect id and
attempt) with the checkpoint that asked for them; an executor claims a
dispatch before running it and drops the record with the result, in the step
that stores the result in the run's inbox. A record nobody claimed or renewed
in time names a lost call.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import redis

from ._errors import Fenced, Quarantined, RunNotFound
from ._keys import (
    BELL,
    FX_DUE,
    HOSTS,
    LEASES,
    READY,
    TIMERS,
    _execset,
    _k,
    _own_bell,
    _own_ready,
    _s,
    _taking,
)
from ._store import STATUSES, Activation, Claim, Delivery, InboxEntry

T = TypeVar("T")


def _now_ms() -> int:
    return int(time.time() * 1000)


def delivery(run_id: str, res: Any) -> Delivery:
    tag = _s(res[0])
    if tag == "NOTFOUND":
        raise RunNotFound(run_id)
    return Delivery(_s(res[1]), {"QUEUED": "queued", "ACTIVE": "active"}.get(tag, "ended"))


class RedisActivation:
    # provided by RedisStore
    r: Any
    url: str
    _retry: Callable[..., Any]
    _activate: Any
    _passivate: Any
    _requeue: Any
    _renew: Any
    _release: Any
    _fx_claim: Any
    _fx_complete: Any
    _fx_heartbeat: Any
    _fx_start: Any
    _take: Any
    _blocking: Any

    # -- the ready queue and activation ----------------------------------------

    def take(self, host: str, timeout_s: float) -> str | None:
        """A run to activate: this host's own queue first (runs it held last), then the
        global one; moved into this host's taking list. Waits up to ``timeout_s`` on the
        doorbells that come with every queued run (0: do not wait)."""
        def take_now() -> str | None:
            got = self._take(keys=[_own_ready(host), READY, _taking(host)])
            return None if got is None else _s(got)

        if timeout_s > 0:
            if self._blocking is None:
                self._blocking = redis.Redis.from_url(self.url, socket_timeout=timeout_s + 10,
                                                      socket_connect_timeout=2)
            try:
                # a doorbell says a run was queued; a lost one (its host died) costs at most
                # one timeout, since the queues themselves are the truth
                self._blocking.blpop([_own_bell(host), BELL], timeout_s)
            except (redis.ConnectionError, redis.TimeoutError):
                time.sleep(min(timeout_s, 0.5))  # the store is down: the caller asks again
                return None
        return self._retry(take_now)  # type: ignore[no-any-return]

    def activate(self, run_id: str, host: str, owner: str, ttl_ms: int) -> Activation | None:
        """Take the run's lease with a new epoch; None if another host holds it."""
        res = self._retry(lambda: self._activate(
            keys=[_k(run_id, "meta"), _k(run_id, "lease"), LEASES, _taking(host),
                  "ud:counters", "ud:index"],
            args=[run_id, owner, ttl_ms, _now_ms()]))
        tag = _s(res[0])
        if tag == "BUSY":
            return None
        if tag == "NOTFOUND":
            raise RunNotFound(run_id)
        if tag == "QUARANTINED":
            raise Quarantined(run_id, _s(res[1]))
        return Activation(run_id, int(res[1]), _s(res[3]), _s(res[2]) == "1", int(res[4] or 0))

    def wait_inbox(self, run_id: str, after: str, host: str,
                   timeout_ms: int) -> list[InboxEntry]:
        """Linger before passivating: wait up to ``timeout_ms`` for messages after ``after``
        in the run's inbox, unless a run is already queued for this host (or for any host),
        which this one should take instead. Returns what arrived (up to 100), in order.

        Nothing is written: a short wait for a fast call's result saves the passivation,
        the wake-up and the activation it would otherwise cost (three fsynced writes)."""
        def queued() -> bool:
            pipe = self.r.pipeline(transaction=False)
            pipe.llen(_own_ready(host))
            pipe.llen(READY)
            return any(n > 0 for n in pipe.execute())

        if self._retry(queued):
            return []
        if self._blocking is None:
            self._blocking = redis.Redis.from_url(self.url, socket_timeout=10,
                                                  socket_connect_timeout=2)
        try:
            got = self._blocking.xread({_k(run_id, "inbox"): after}, count=100,
                                       block=max(1, int(timeout_ms)))
        except (redis.ConnectionError, redis.TimeoutError):
            return []  # the store is down: passivating will say so
        return [InboxEntry(_s(eid), fields[b"m"]) for _, rows in got for eid, fields in rows]

    def passivate(self, run_id: str, epoch: int, cursor: str, host: str = "") -> str:
        """Give the run's process back: "ok", or "more" / "outbox" (keep going), or raises.
        ``host``: where its next wake-up should go first (its state is warm there)."""
        res = _s(self._retry(lambda: self._passivate(
            keys=[_k(run_id, "meta"), _k(run_id, "lease"), LEASES, _k(run_id, "inbox"),
                  _k(run_id, "outbox"), "ud:index", "ud:counters"],
            args=[run_id, epoch, cursor, host])))
        if res == "FENCED":
            raise Fenced(run_id, epoch, -1)
        if res == "NOTFOUND":
            raise RunNotFound(run_id)
        return res.lower()

    def requeue(self, run_id: str, *, force: bool = False) -> str:
        """Queue the run for activation: "ok", or "busy" when a host holds it (without force)."""
        res = _s(self._retry(lambda: self._requeue(
            keys=[_k(run_id, "meta"), _k(run_id, "lease"), LEASES, READY],
            args=[run_id, "1" if force else "0"])))
        if res == "NOTFOUND":
            raise RunNotFound(run_id)
        return res.lower()

    def is_queued(self, run_id: str) -> bool:
        return self._retry(lambda: self.r.get(_k(run_id, "lease"))) == b"ready"

    def ready_len(self) -> int:
        """Runs queued for activation, in the global queue and every host's own."""
        def count() -> int:
            n = int(self.r.llen(READY))
            for key in self.r.scan_iter(match=f"{READY}:*", count=1000):
                n += int(self.r.llen(key))
            return n

        return int(self._retry(count))

    # -- leases ------------------------------------------------------------------

    def renew_lease(self, run_id: str, epoch: int, owner: str, ttl_ms: int) -> None:
        """Hold or extend the run's lease for this epoch; `Fenced` if superseded."""
        res = self._retry(lambda: self._renew(
            keys=[_k(run_id, "meta"), _k(run_id, "lease"), LEASES],
            args=[run_id, epoch, owner, ttl_ms, _now_ms()]))
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
        """The active lease's value ("<epoch>|<host>|<node>|<pid>"), or None."""
        v = self._retry(lambda: self.r.get(_k(run_id, "lease")))
        if v is None or _s(v) == "ready":
            return None
        return _s(v)

    def expired_leases(self, now_ms: int | None = None, count: int = 1000) -> list[tuple[str, int]]:
        """Runs whose lease expired by ``now_ms``: (run id, expiry ms)."""
        now = _now_ms() if now_ms is None else now_ms
        rows = self._retry(lambda: self.r.zrangebyscore(LEASES, 0, now, start=0, num=count,
                                                        withscores=True))
        return [(_s(m), int(sc)) for m, sc in rows]

    def leases(self) -> dict[str, int]:
        rows = self._retry(lambda: self.r.zrange(LEASES, 0, -1, withscores=True))
        return {_s(m): int(sc) for m, sc in rows}

    def held_by(self, host: str) -> list[tuple[str, int]]:
        """Runs whose active lease this host holds: (run id, epoch). A host id ending in
        '#' (a pool actor's name) matches every incarnation of it."""
        runs = [_s(m) for m in self._retry(lambda: self.r.zrange(LEASES, 0, -1))]
        if not runs:
            return []

        def read() -> list[Any]:
            p = self.r.pipeline(transaction=False)
            for run_id in runs:
                p.get(_k(run_id, "lease"))
            return p.execute()

        out = []
        for run_id, v in zip(runs, self._retry(read), strict=True):
            fields = _s(v).split("|") if v is not None else []
            if len(fields) >= 2 and (fields[1] == host or
                                     (host.endswith("#") and fields[1].startswith(host))):
                out.append((run_id, int(fields[0])))
        return out

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
            p.hincrby("ud:counters", "restarts_total", 1)
            p.execute()

        self._retry(do)

    def restarts(self, run_id: str) -> list[float]:
        return [float(_s(x)) for x in self._retry(lambda: self.r.lrange(_k(run_id, "restarts"), 0, -1))]

    def note_crash(self, run_id: str, reason: str) -> None:
        """Why the run's last activation died (the supervisor's restart names it)."""
        self._retry(lambda: self.r.set(_k(run_id, "crash"), reason[:500], ex=3600))

    def last_crash(self, run_id: str, *, clear: bool = False) -> str:
        key = _k(run_id, "crash")
        v = self._retry(lambda: self.r.getdel(key) if clear else self.r.get(key))
        return "" if v is None else _s(v)

    def census(self, prefix: str, statuses: Iterable[str] = STATUSES) -> dict[str, list[int]]:
        """Runs whose id starts with ``prefix`` by status: [roots, sub-agents] (a sub-agent's
        id is its parent's id, a dot, the parent's step...). For progress displays: ask for
        the live statuses only, and the cost is that of the runs in flight, not of every
        run ever ended."""
        found: dict[str, str] = {}  # run -> status
        for status in statuses:
            for m in self.r.sscan_iter(f"ud:state:{status}", match=f"{prefix}*", count=1000):
                # the sets are read one after another: a run that moved meanwhile is seen
                # twice, and is counted once (in the status read last)
                found[_s(m)] = status
        out = {status: [0, 0] for status in statuses}
        for run, status in found.items():
            out[status][1 if "." in run[len(prefix):] else 0] += 1
        return out

    # -- hosts -------------------------------------------------------------------

    def host_heartbeat(self, host: str, record: str) -> None:
        self._retry(lambda: self.r.hset(HOSTS, host, f"{_now_ms()}|{record}"))

    def hosts(self) -> dict[str, tuple[int, str]]:
        """Host id -> (last heartbeat ms, "node|pid|run|epoch")."""
        raw = self._retry(lambda: self.r.hgetall(HOSTS))
        out = {}
        for k, v in raw.items():
            at, _, rest = _s(v).partition("|")
            out[_s(k)] = (int(at or 0), rest)
        return out

    def forget_host(self, host: str) -> int:
        """Put back every run queued for the host or taken by it and not activated; drop the
        host. Returns how many."""
        def do() -> int:
            n = 0
            self.r.hdel(HOSTS, host)  # first: nothing is queued for it from now on
            for src in (_taking(host), _own_ready(host)):
                while self.r.lmove(src, READY, "LEFT", "RIGHT") is not None:
                    self.r.rpush(BELL, 1)
                    n += 1
            self.r.delete(_own_bell(host))
            return n

        return int(self._retry(do))

    # -- dispatch records of model and tool calls -----------------------------------

    def fx_claim(self, run_id: str, effect_id: str, attempt: int, executor: str,
                 lease_ms: int, incarnation: str = "") -> Claim:
        member = f"{run_id}|{effect_id}|{attempt}|{incarnation}"
        res = self._retry(lambda: self._fx_claim(
            keys=[_k(run_id, "meta"), _k(run_id, "fx"), FX_DUE, _execset(executor)],
            args=[run_id, effect_id, attempt, f"{executor}#{incarnation}", lease_ms, _now_ms(),
                  member]))
        return Claim(_s(res[0]).lower(), _s(res[1]))

    def fx_start(self, run_id: str, effect_id: str, attempt: int) -> bool:
        return bool(self._retry(lambda: self._fx_start(keys=[_k(run_id, "fx")],
                                                       args=[effect_id, attempt])))

    def fx_complete(self, run_id: str, effect_id: str, attempt: int, executor: str,
                    message: bytes, incarnation: str = "") -> Delivery:
        member = f"{run_id}|{effect_id}|{attempt}|{incarnation}"
        res = self._retry(lambda: self._fx_complete(
            keys=[_k(run_id, "meta"), _k(run_id, "inbox"), _k(run_id, "lease"), READY,
                  _k(run_id, "fx"), FX_DUE, _execset(executor)],
            args=[run_id, message, effect_id, attempt, member]))
        return delivery(run_id, res)

    def fx_heartbeat(self, members: Iterable[str], lease_ms: int) -> int:
        """Renew claimed dispatches ("run|effect"); returns how many were still recorded."""
        items = list(members)
        n = 0
        for i in range(0, len(items), 500):
            chunk = items[i:i + 500]
            n += int(self._retry(lambda c=chunk: self._fx_heartbeat(
                keys=[FX_DUE], args=[_now_ms() + lease_ms, *c])))
        return n

    def fx_records(self, run_id: str) -> dict[str, str]:
        raw = self._retry(lambda: self.r.hgetall(_k(run_id, "fx")))
        return {_s(k): _s(v) for k, v in raw.items()}

    def fx_overdue(self, now_ms: int | None = None, count: int = 500) -> list[tuple[str, str, str]]:
        """Dispatches not claimed or renewed in time: (run id, effect id, record or "")."""
        now = _now_ms() if now_ms is None else now_ms
        rows = self._retry(lambda: self.r.zrangebyscore(FX_DUE, 0, now, start=0, num=count))
        out: list[tuple[str, str, str]] = []
        pairs = [_s(m).rpartition("|") for m in rows]
        if not pairs:
            return out

        def read() -> list[Any]:
            p = self.r.pipeline(transaction=False)
            for run_id, _, eid in pairs:
                p.hget(_k(run_id, "fx"), eid)
            return p.execute()

        for (run_id, _, eid), rec in zip(pairs, self._retry(read), strict=True):
            out.append((run_id, eid, "" if rec is None else _s(rec)))
        return out

    def fx_drop(self, run_id: str, effect_ids: Iterable[str]) -> None:
        """Forget dispatch records of calls the run no longer waits for."""
        ids = list(effect_ids)

        def do() -> None:
            p = self.r.pipeline(transaction=True)
            p.hdel(_k(run_id, "fx"), *ids)
            p.zrem(FX_DUE, *(f"{run_id}|{e}" for e in ids))
            p.execute()

        if ids:
            self._retry(do)

    def fx_postpone(self, run_id: str, effect_id: str, until_ms: int) -> None:
        self._retry(lambda: self.r.zadd(FX_DUE, {f"{run_id}|{effect_id}": until_ms}))

    def fx_forget(self, run_id: str, effect_id: str) -> None:
        self._retry(lambda: self.r.zrem(FX_DUE, f"{run_id}|{effect_id}"))

    def executor_claims(self, executor: str) -> list[tuple[str, str, int, str]]:
        """Dispatches an executor claimed and did not complete: (run, effect, attempt, incarnation)."""
        out = []
        for m in self._retry(lambda: self.r.smembers(_execset(executor))):
            run_id, eid, attempt, inc = _s(m).rsplit("|", 3)
            out.append((run_id, eid, int(attempt), inc))
        return out

    def executor_forget(self, executor: str, claims: Iterable[tuple[str, str, int, str]]) -> None:
        members = [f"{r}|{e}|{a}|{i}" for r, e, a, i in claims]
        if members:
            self._retry(lambda: self.r.srem(_execset(executor), *members))

    # -- timers -------------------------------------------------------------------

    def timers_due(self, now_ms: int | None = None, count: int = 500) -> list[tuple[str, str]]:
        now = _now_ms() if now_ms is None else now_ms
        rows = self._retry(lambda: self.r.zrangebyscore(TIMERS, 0, now, start=0, num=count))
        return [(r, t) for r, _, t in (_s(m).rpartition("|") for m in rows)]

    def timer_done(self, run_id: str, timer_id: str) -> None:
        self._retry(lambda: self.r.zrem(TIMERS, f"{run_id}|{timer_id}"))
