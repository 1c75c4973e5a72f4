"""`CheckpointStore` in process memory: for unit tests and examples, not for durability.

It follows the Redis store's semantics exactly (the same contract tests run
against both), so code tested against it behaves the same on Redis.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from ._errors import Fenced, Quarantined, RunExists, RunNotFound, StepConflict
from ._store import (
    STATUSES,
    TERMINAL,
    Activation,
    Claim,
    Commit,
    CommitResult,
    Delivery,
    EventEntry,
    InboxEntry,
    Loaded,
    RunInfo,
)


@dataclass
class _Run:
    meta: dict[str, str | int]
    snap: bytes = b""
    journal: list[bytes] = field(default_factory=list)
    events: list[tuple[str, bytes]] = field(default_factory=list)
    inbox: list[tuple[str, bytes]] = field(default_factory=list)
    outbox: dict[str, bytes] = field(default_factory=dict)
    seen: set[str] = field(default_factory=set)
    ledger: dict[str, int] = field(default_factory=dict)
    lease: str | None = None  # "ready" or "<epoch>|<owner>"; expiry in MemoryStore._leases
    fx: dict[str, str] = field(default_factory=dict)
    origin: bytes | None = None  # the first snapshot, once compaction replaced it
    segments: list[list[bytes]] = field(default_factory=list)  # journals before each snapshot


def _after(entries: list[tuple[str, bytes]], after: str) -> list[tuple[str, bytes]]:
    def key(eid: str) -> tuple[int, int]:
        a, b = eid.split("-")
        return int(a), int(b)

    bound = key(after)
    return [e for e in entries if key(e[0]) > bound]


class MemoryStore:
    def __init__(self) -> None:
        self._runs: dict[str, _Run] = {}
        self._lock = threading.RLock()
        self._ids = itertools.count(1)
        self._cond = threading.Condition(self._lock)
        self.counters_: dict[str, int] = {}
        self._leases: dict[str, tuple[str, int]] = {}  # run id -> (owner, expiry ms)
        self._restarts: dict[str, list[float]] = {}
        self.ready: list[str] = []
        self._taking: dict[str, list[str]] = {}
        self._own: dict[str, list[str]] = {}  # host -> runs queued for it first
        self.fx_due: dict[str, int] = {}  # "run|effect" -> due ms
        self._execsets: dict[str, set[str]] = {}
        self.timers: dict[str, int] = {}  # "run|timer" -> due ms
        self.approvals: dict[str, int] = {}  # "run|call" -> since ms
        self._hosts: dict[str, tuple[int, str]] = {}
        self._crashes: dict[str, str] = {}
        self.ended: dict[str, int] = {}  # root run -> when it ended (ms)
        self.metrics_: dict[str, float] = {}
        self.dispatch_timeout_ms = 10_000

    def _count(self, name: str, n: int = 1) -> None:
        self.counters_[name] = self.counters_.get(name, 0) + n

    def _lease_value(self, run_id: str, run: _Run) -> str | None:
        """The lease as Redis would hold it: an active lease vanishes when its TTL passes."""
        if run.lease is None or run.lease == "ready":
            return run.lease
        _, exp = self._leases.get(run_id, ("", 0))
        if exp and exp <= time.time() * 1000 and run.lease.count("|") >= 1:
            run.lease = None
        return run.lease

    def _set_status(self, run: _Run, status: str) -> None:
        run.meta["status"] = status

    def _new_id(self) -> str:
        return f"{int(time.time() * 1000)}-{next(self._ids)}"

    def _get(self, run_id: str) -> _Run:
        run = self._runs.get(run_id)
        if run is None:
            raise RunNotFound(run_id)
        return run

    def create(self, run_id: str, snapshot: bytes, *, agent: str, parent: str = "",
               first_message: bytes = b"") -> None:
        with self._lock:
            if run_id in self._runs:
                raise RunExists(run_id)
            now = int(time.time() * 1000)
            run = _Run(meta={"epoch": 0, "step": 0, "status": "pending", "snap_step": 0,
                             "snap_bytes": len(snapshot), "journal_bytes": 0, "journal_len": 0,
                             "agent": agent, "parent": parent, "created": now, "updated": now,
                             "reason": "", "clean": 1}, snap=snapshot)
            if first_message:
                run.inbox.append((self._new_id(), first_message))
                run.lease = "ready"
                self._enqueue(run_id, run)
            if parent:
                self._count("spawns_total")
            self._runs[run_id] = run

    def load(self, run_id: str) -> Loaded:
        with self._lock:
            run = self._get(run_id)
            m = run.meta
            if m["reason"]:
                raise Quarantined(run_id, str(m["reason"]))
            return Loaded(run_id=run_id, epoch=int(m["epoch"]), step=int(m["step"]),
                          status=str(m["status"]), snapshot=run.snap,
                          snapshot_step=int(m["snap_step"]), deltas=tuple(run.journal),
                          journal_bytes=int(m["journal_bytes"]),
                          snapshot_bytes=int(m["snap_bytes"]), seen=frozenset(run.seen),
                          outbox=tuple(sorted(run.outbox.items())), agent=str(m["agent"]),
                          parent=str(m["parent"]))

    def commit(self, run_id: str, c: Commit) -> CommitResult:
        if c.status not in STATUSES:
            raise ValueError(f"run {run_id!r}: unknown status {c.status!r}")
        with self._cond:
            run = self._get(run_id)
            m = run.meta
            if int(m["epoch"]) != c.epoch:
                self._count("fenced_commits_total")
                raise Fenced(run_id, c.epoch, int(m["epoch"]))
            if m["reason"]:
                raise Quarantined(run_id, str(m["reason"]))
            if c.step != int(m["step"]) + 1:
                raise StepConflict(run_id, c.step, int(m["step"]))
            if c.snapshot:
                if run.origin is None:
                    run.origin = run.snap
                run.segments.append([*run.journal, c.delta or c.snapshot])
                run.snap = c.snapshot
                run.journal = []
                m.update(snap_step=c.step, snap_bytes=len(c.snapshot), journal_bytes=0,
                         journal_len=0)
            elif c.delta:
                run.journal.append(c.delta)
                m["journal_bytes"] = int(m["journal_bytes"]) + len(c.delta)
                m["journal_len"] = int(m["journal_len"]) + 1
            old = str(m["status"])
            m.update(step=c.step, status=c.status, updated=int(time.time() * 1000))
            if c.status in TERMINAL and old not in TERMINAL:
                self._count(f"ended|{c.status}")
                if not m["parent"]:
                    self.ended[run_id] = int(m["updated"])
            for e in c.events:
                run.events.append((self._new_id(), e))
            run.outbox.update(dict(c.outbox))
            run.seen.update(c.seen)
            now = int(time.time() * 1000)
            if c.status in TERMINAL:
                for eid in run.fx:
                    self.fx_due.pop(f"{run_id}|{eid}", None)
                run.fx.clear()
            else:
                for eid, attempt in c.effects:
                    run.fx[eid] = f"{attempt}|q"
                    self.fx_due[f"{run_id}|{eid}"] = now + self.dispatch_timeout_ms
            for tid, at in c.timers:
                self.timers[f"{run_id}|{tid}"] = at
            for call_id, waiting in c.approvals:
                if waiting:
                    self.approvals[f"{run_id}|{call_id}"] = now
                else:
                    self.approvals.pop(f"{run_id}|{call_id}", None)
            self.counters_["steps_total"] = self.counters_.get("steps_total", 0) + 1
            if c.kind:
                self._count(f"steps|{c.kind}")
            died = m.pop("recovering", None)
            self._cond.notify_all()
            return CommitResult(int(m["journal_bytes"]), int(m["snap_bytes"]),
                                int(m["journal_len"]),
                                -1 if died is None else now - int(died))

    def claim_epoch(self, run_id: str) -> int:
        with self._lock:
            run = self._get(run_id)
            if run.meta["reason"]:
                raise Quarantined(run_id, str(run.meta["reason"]))
            run.meta["epoch"] = int(run.meta["epoch"]) + 1
            return int(run.meta["epoch"])

    def info(self, run_id: str) -> RunInfo:
        with self._lock:
            m = self._get(run_id).meta
            return RunInfo(run_id=run_id, status=str(m["status"]), step=int(m["step"]),
                           epoch=int(m["epoch"]), agent=str(m["agent"]),
                           parent=str(m["parent"]), created_ms=int(m["created"]),
                           updated_ms=int(m["updated"]), reason=str(m["reason"]))

    def list_runs(self, status: str | None = None) -> list[RunInfo]:
        with self._lock:
            infos = [self.info(r) for r in sorted(self._runs)]
        return [i for i in infos if status is None or i.status == status]

    def quarantine(self, run_id: str, reason: str) -> None:
        with self._lock:
            run = self._get(run_id)
            run.meta.update(status="quarantined", reason=reason[:2000])
            run.lease = None
            self._leases.pop(run_id, None)

    def delete(self, run_id: str) -> None:
        with self._lock:
            run = self._runs.pop(run_id, None)
            self._leases.pop(run_id, None)
            for eid in (run.fx if run else {}):
                self.fx_due.pop(f"{run_id}|{eid}", None)

    def send(self, run_id: str, message: bytes) -> str:
        return self.deliver(run_id, message).entry_id

    def deliver(self, run_id: str, message: bytes) -> Delivery:
        with self._cond:
            run = self._get(run_id)
            d = self._deliver(run_id, run, message)
            self._cond.notify_all()
            return d

    def _deliver(self, run_id: str, run: _Run, message: bytes) -> Delivery:
        if run.meta["status"] in TERMINAL:
            return Delivery("", "ended")
        eid = self._new_id()
        run.inbox.append((eid, message))
        if self._lease_value(run_id, run) is not None:
            return Delivery(eid, "active")
        run.lease = "ready"
        self._enqueue(run_id, run)
        return Delivery(eid, "queued")

    def _enqueue(self, run_id: str, run: _Run) -> None:
        """The host that held the run last first, if alive and not behind (as the Redis
        store does)."""
        host = str(run.meta.get("host", ""))
        own = self._own.setdefault(host, []) if host and host in self._hosts else None
        if own is not None and len(own) < 2:
            own.append(run_id)
        else:
            self.ready.append(run_id)

    def read_inbox(self, run_id: str, after: str, count: int = 100) -> list[InboxEntry]:
        with self._lock:
            run = self._runs.get(run_id)
            rows = _after(run.inbox, after)[:count] if run else []
        return [InboxEntry(eid, data) for eid, data in rows]

    def mark_relayed(self, run_id: str, message_id: str) -> None:
        with self._lock:
            self._get(run_id).outbox.pop(message_id, None)

    def read_events(self, run_id: str, after: str = "0-0", count: int = 1000,
                    block_ms: int | None = None) -> list[EventEntry]:
        with self._cond:
            run = self._runs.get(run_id)
            if run is None:
                return []
            rows = _after(run.events, after)[:count]
            if not rows and block_ms:
                self._cond.wait(block_ms / 1000)
                rows = _after(run.events, after)[:count]
        return [EventEntry(eid, data) for eid, data in rows]

    def renew_lease(self, run_id: str, epoch: int, owner: str, ttl_ms: int) -> None:
        with self._lock:
            run = self._get(run_id)
            cur = int(run.meta["epoch"])
            if cur != epoch:
                raise Fenced(run_id, epoch, cur)
            if self._lease_value(run_id, run) != f"{epoch}|{owner}":
                return  # given up (passivated) meanwhile: never bring it back
            self._leases[run_id] = (run.lease or "", int(time.time() * 1000) + ttl_ms)

    def release_lease(self, run_id: str, epoch: int, *, done: bool) -> bool:
        with self._lock:
            run = self._get(run_id)
            if int(run.meta["epoch"]) != epoch:
                return False
            run.lease = None
            if done:
                self._leases.pop(run_id, None)
                run.meta["clean"] = 1
            else:
                self._leases[run_id] = ("", 0)
            return True

    def lease_owner(self, run_id: str) -> str | None:
        with self._lock:
            run = self._runs.get(run_id)
            if run is None:
                return None
            v = self._lease_value(run_id, run)
            return None if v in (None, "ready") else v

    def expired_leases(self, now_ms: int | None = None, count: int = 1000) -> list[tuple[str, int]]:
        now = int(time.time() * 1000) if now_ms is None else now_ms
        with self._lock:
            rows = sorted((exp, rid) for rid, (_, exp) in self._leases.items() if exp <= now)
        return [(rid, exp) for exp, rid in rows[:count]]

    def leases(self) -> dict[str, int]:
        with self._lock:
            return {rid: exp for rid, (_, exp) in self._leases.items()}

    def held_by(self, host: str) -> list[tuple[str, int]]:
        with self._lock:
            out = []
            for run_id in list(self._leases):
                run = self._runs.get(run_id)
                v = self._lease_value(run_id, run) if run else None
                fields = (v or "").split("|")
                if len(fields) >= 2 and (fields[1] == host or
                                         (host.endswith("#") and fields[1].startswith(host))):
                    out.append((run_id, int(fields[0])))
            return out

    def forget_lease(self, run_id: str) -> None:
        with self._lock:
            self._leases.pop(run_id, None)

    # -- activation ------------------------------------------------------------

    def take(self, host: str, timeout_s: float) -> str | None:
        with self._cond:
            own = self._own.setdefault(host, [])
            if not own and not self.ready and timeout_s > 0:
                self._cond.wait(timeout_s)
            queue = own if own else self.ready
            if not queue:
                return None
            run_id = queue.pop(0)
            self._taking.setdefault(host, []).append(run_id)
            return run_id

    def activate(self, run_id: str, host: str, owner: str, ttl_ms: int) -> Activation | None:
        with self._lock:
            taking = self._taking.get(host, [])
            if run_id in taking:
                taking.remove(run_id)
            run = self._get(run_id)
            if run.meta["reason"]:
                raise Quarantined(run_id, str(run.meta["reason"]))
            cur = self._lease_value(run_id, run)
            if cur is not None and cur != "ready":
                return None
            epoch = int(run.meta["epoch"]) + 1
            run.meta["epoch"] = epoch
            run.lease = f"{epoch}|{owner}"
            self._leases[run_id] = (run.lease, int(time.time() * 1000) + ttl_ms)
            clean = bool(int(run.meta.get("clean", 1)))
            run.meta["clean"] = 0
            status = str(run.meta["status"])
            if status not in TERMINAL:
                status = "running"
                self._set_status(run, status)
            self._count("activations_total")
            return Activation(run_id, epoch, status, clean, int(run.meta["step"]))

    def passivate(self, run_id: str, epoch: int, cursor: str, host: str = "") -> str:
        with self._lock:
            run = self._get(run_id)
            if int(run.meta["epoch"]) != epoch:
                raise Fenced(run_id, epoch, int(run.meta["epoch"]))
            if run.outbox:
                return "outbox"
            status = str(run.meta["status"])
            if status not in TERMINAL and _after(run.inbox, cursor):
                return "more"
            run.lease = None
            self._leases.pop(run_id, None)
            run.meta["clean"] = 1
            run.meta["host"] = host
            if status not in TERMINAL:
                self._set_status(run, "waiting")
            self._count("passivations_total")
            return "ok"

    def requeue(self, run_id: str, *, force: bool = False) -> str:
        with self._cond:
            run = self._get(run_id)
            cur = self._lease_value(run_id, run)
            if cur is not None and cur != "ready" and not force:
                return "busy"
            run.lease = "ready"
            self._leases.pop(run_id, None)
            run.meta["host"] = ""  # the host that held it may be the one that died
            self.ready.append(run_id)
            self._cond.notify_all()
            return "ok"

    def is_queued(self, run_id: str) -> bool:
        with self._lock:
            run = self._runs.get(run_id)
            return run is not None and run.lease == "ready"

    def census(self, prefix: str, statuses: Iterable[str] = STATUSES) -> dict[str, list[int]]:
        with self._lock:
            out = {s: [0, 0] for s in statuses}
            for run_id, run in self._runs.items():
                if run_id.startswith(prefix) and str(run.meta["status"]) in out:
                    out[str(run.meta["status"])][1 if "." in run_id[len(prefix):] else 0] += 1
            return out

    def note_crash(self, run_id: str, reason: str) -> None:
        with self._lock:
            self._crashes[run_id] = reason[:500]

    def last_crash(self, run_id: str, *, clear: bool = False) -> str:
        with self._lock:
            return self._crashes.pop(run_id, "") if clear else self._crashes.get(run_id, "")

    def ready_len(self) -> int:
        return len(self.ready) + sum(len(q) for q in self._own.values())

    def host_heartbeat(self, host: str, record: str) -> None:
        with self._lock:
            self._hosts[host] = (int(time.time() * 1000), record)

    def hosts(self) -> dict[str, tuple[int, str]]:
        with self._lock:
            return dict(self._hosts)

    def forget_host(self, host: str) -> int:
        with self._cond:
            taken = self._taking.pop(host, []) + self._own.pop(host, [])
            self.ready.extend(taken)
            self._hosts.pop(host, None)
            self._cond.notify_all()
            return len(taken)

    # -- dispatch records -----------------------------------------------------------

    def fx_claim(self, run_id: str, effect_id: str, attempt: int, executor: str,
                 lease_ms: int, incarnation: str = "") -> Claim:
        with self._lock:
            run = self._runs.get(run_id)
            member = f"{run_id}|{effect_id}"
            if run is None or run.meta["status"] in TERMINAL:
                if run is not None:
                    run.fx.pop(effect_id, None)
                self.fx_due.pop(member, None)
                return Claim("gone")
            cur = run.fx.get(effect_id)
            if cur == f"{attempt}|c|{executor}#{incarnation}":
                return Claim("ok")  # its own claim (see FX_CLAIM in _lua.py)
            if cur != f"{attempt}|q":
                return Claim("skip", cur or "")
            run.fx[effect_id] = f"{attempt}|c|{executor}#{incarnation}"
            self.fx_due[member] = int(time.time() * 1000) + lease_ms
            self._execsets.setdefault(executor, set()).add(
                f"{run_id}|{effect_id}|{attempt}|{incarnation}")
            return Claim("ok")

    def fx_start(self, run_id: str, effect_id: str, attempt: int) -> bool:
        with self._lock:
            run = self._get(run_id)
            cur = run.fx.get(effect_id, "")
            if not cur.startswith(f"{attempt}|c|"):
                return False
            run.fx[effect_id] = f"{attempt}|s|{cur[len(str(attempt)) + 3:]}"
            return True

    def fx_complete(self, run_id: str, effect_id: str, attempt: int, executor: str,
                    message: bytes, incarnation: str = "") -> Delivery:
        with self._cond:
            self._execsets.get(executor, set()).discard(
                f"{run_id}|{effect_id}|{attempt}|{incarnation}")
            run = self._get(run_id)
            cur = run.fx.get(effect_id)
            if cur is not None and cur.startswith(f"{attempt}|"):
                del run.fx[effect_id]
                self.fx_due.pop(f"{run_id}|{effect_id}", None)
            d = self._deliver(run_id, run, message)
            self._cond.notify_all()
            return d

    def fx_heartbeat(self, members: Iterable[str], lease_ms: int) -> int:
        with self._lock:
            until = int(time.time() * 1000) + lease_ms
            n = 0
            for m in members:
                if m in self.fx_due:
                    self.fx_due[m] = until
                    n += 1
            return n

    def fx_records(self, run_id: str) -> dict[str, str]:
        with self._lock:
            run = self._runs.get(run_id)
            return dict(run.fx) if run else {}

    def fx_overdue(self, now_ms: int | None = None, count: int = 500) -> list[tuple[str, str, str]]:
        now = int(time.time() * 1000) if now_ms is None else now_ms
        with self._lock:
            rows = sorted((due, m) for m, due in self.fx_due.items() if due <= now)[:count]
            out = []
            for _, m in rows:
                run_id, _, eid = m.rpartition("|")
                run = self._runs.get(run_id)
                out.append((run_id, eid, (run.fx.get(eid) if run else None) or ""))
            return out

    def fx_drop(self, run_id: str, effect_ids: Iterable[str]) -> None:
        with self._lock:
            run = self._runs.get(run_id)
            for eid in effect_ids:
                if run is not None:
                    run.fx.pop(eid, None)
                self.fx_due.pop(f"{run_id}|{eid}", None)

    def fx_postpone(self, run_id: str, effect_id: str, until_ms: int) -> None:
        with self._lock:
            self.fx_due[f"{run_id}|{effect_id}"] = until_ms

    def fx_forget(self, run_id: str, effect_id: str) -> None:
        with self._lock:
            self.fx_due.pop(f"{run_id}|{effect_id}", None)

    def executor_claims(self, executor: str) -> list[tuple[str, str, int, str]]:
        with self._lock:
            out = []
            for m in self._execsets.get(executor, set()):
                run_id, eid, attempt, inc = m.rsplit("|", 3)
                out.append((run_id, eid, int(attempt), inc))
            return out

    def executor_forget(self, executor: str, claims: Iterable[tuple[str, str, int, str]]) -> None:
        with self._lock:
            s = self._execsets.get(executor, set())
            for r, e, a, i in claims:
                s.discard(f"{r}|{e}|{a}|{i}")

    def timers_due(self, now_ms: int | None = None, count: int = 500) -> list[tuple[str, str]]:
        now = int(time.time() * 1000) if now_ms is None else now_ms
        with self._lock:
            rows = sorted((at, m) for m, at in self.timers.items() if at <= now)[:count]
        return [(r, t) for r, _, t in (m.rpartition("|") for _, m in rows)]

    def timer_done(self, run_id: str, timer_id: str) -> None:
        with self._lock:
            self.timers.pop(f"{run_id}|{timer_id}", None)

    def record_restart(self, run_id: str, at: float, event: bytes = b"") -> None:
        with self._lock:
            run = self._get(run_id)
            self._restarts.setdefault(run_id, []).append(at)
            if event:
                run.events.append((self._new_id(), event))

    def restarts(self, run_id: str) -> list[float]:
        with self._lock:
            return list(self._restarts.get(run_id, []))

    def ledger_record(self, run_id: str, tool: str, key: str) -> int:
        with self._lock:
            led = self._get(run_id).ledger
            led[f"{tool}|{key}"] = led.get(f"{tool}|{key}", 0) + 1
            return led[f"{tool}|{key}"]

    def ledger(self, run_id: str) -> dict[str, int]:
        with self._lock:
            return dict(self._get(run_id).ledger)

    def approvals_pending(self) -> list[tuple[str, str, int]]:
        with self._lock:
            return [(*m.rsplit("|", 1), at) for m, at in sorted(self.approvals.items())]  # type: ignore[misc]

    def counters(self) -> dict[str, int]:
        return dict(self.counters_)

    # -- history, forks, retention, metrics (see _redis_history) ----------------------------

    def add_metrics(self, incs: dict[str, float]) -> None:
        with self._lock:
            for k, v in incs.items():
                self.metrics_[k] = self.metrics_.get(k, 0) + v

    def read_metrics(self) -> dict[str, float]:
        with self._lock:
            return dict(self.metrics_)

    def mark_recovering(self, run_id: str, since_ms: int) -> None:
        with self._lock:
            run = self._runs.get(run_id)
            if run is not None:
                run.meta.setdefault("recovering", since_ms)

    def history_records(self, run_id: str, upto_step: int) -> tuple[dict[str, str], int, bytes,
                                                                     list[bytes]]:
        with self._lock:
            run = self._get(run_id)
            meta = {k: str(v) for k, v in run.meta.items()}
            base = int(run.meta.get("origin_step", 0))
            origin = run.origin if run.origin is not None else run.snap
            rows = [r for seg in run.segments for r in seg] + run.journal
            return meta, base, origin, rows[:max(0, upto_step - base)]

    def create_fork(self, run_id: str, snapshot: bytes, *, agent: str, step: int, status: str,
                    forked_from: str, event: bytes,
                    outbox: tuple[tuple[str, bytes], ...] = (),
                    effects: tuple[tuple[str, int], ...] = (),
                    timers: tuple[tuple[str, int], ...] = (), now_ms: int) -> None:
        with self._cond:
            if run_id in self._runs:
                raise RunExists(run_id)
            run = _Run(meta={"epoch": 0, "step": step, "status": status, "snap_step": step,
                             "snap_bytes": len(snapshot), "journal_bytes": 0, "journal_len": 0,
                             "agent": agent, "parent": "", "created": now_ms,
                             "updated": now_ms, "reason": "", "clean": 0, "origin_step": step,
                             "forked_from": forked_from, "forked_at": step}, snap=snapshot)
            run.events.append((self._new_id(), event))
            run.outbox.update(dict(outbox))
            for eid, attempt in effects:
                run.fx[eid] = f"{attempt}|q"
                self.fx_due[f"{run_id}|{eid}"] = now_ms + self.dispatch_timeout_ms
            for tid, at in timers:
                self.timers[f"{run_id}|{tid}"] = at
            run.lease = "ready"
            self.ready.append(run_id)
            self._runs[run_id] = run
            self._count("forks_total")
            self._cond.notify_all()

    def read_events_multi(self, cursors: dict[str, str], count: int = 100,
                          block_ms: int | None = None) -> list[tuple[str, EventEntry]]:
        def rows() -> list[tuple[str, EventEntry]]:
            out: list[tuple[str, EventEntry]] = []
            for rid, after in cursors.items():
                run = self._runs.get(rid)
                if run is not None:
                    out.extend((rid, EventEntry(e, d)) for e, d in _after(run.events, after)[:count])
            return out

        with self._cond:
            found = rows()
            if not found and block_ms:
                self._cond.wait(block_ms / 1000)
                found = rows()
            return found

    def ended_before(self, before_ms: int, count: int = 1000) -> list[tuple[str, int]]:
        with self._lock:
            return sorted(((r, t) for r, t in self.ended.items() if t <= before_ms),
                          key=lambda x: (x[1], x[0]))[:count]

    def descendants(self, run_id: str) -> list[str]:
        with self._lock:
            return sorted(r for r in self._runs if r.startswith(run_id + "."))

    def index_items(self) -> Iterator[tuple[str, str]]:
        with self._lock:
            items = [(r, str(run.meta["status"])) for r, run in self._runs.items()]
        yield from items

    def remove_ended(self, run_id: str, why: str = "gc") -> str:
        with self._lock:
            run = self._runs.get(run_id)
            if run is None:
                self.ended.pop(run_id, None)
                return "gone"
            if run.meta["status"] not in TERMINAL:
                return "active"
            if self._lease_value(run_id, run) is not None:
                return "held"
            if run.outbox:
                return "outbox"
            self.delete(run_id)
            self.ended.pop(run_id, None)
            self.timers.pop(f"{run_id}|deadline", None)
            self._count(f"removed|{why}")
            return "ok"

    def ping(self) -> bool:
        return True

    def close(self) -> None:
        pass
