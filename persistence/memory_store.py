"""`CheckpointStore` in process memory: for unit tests and examples, not for durability.

It follows the Redis store's semantics exactly (the same contract tests run
against both), so code tested against it behaves the same on Redis.
"""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass, field

from ._errors import Fenced, Quarantined, RunExists, RunNotFound, StepConflict
from ._store import STATUSES, Commit, CommitResult, EventEntry, InboxEntry, Loaded, RunInfo


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
                             "reason": ""}, snap=snapshot)
            if first_message:
                run.inbox.append((self._new_id(), first_message))
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
                raise Fenced(run_id, c.epoch, int(m["epoch"]))
            if m["reason"]:
                raise Quarantined(run_id, str(m["reason"]))
            if c.step != int(m["step"]) + 1:
                raise StepConflict(run_id, c.step, int(m["step"]))
            if c.snapshot:
                run.snap = c.snapshot
                run.journal.clear()
                m.update(snap_step=c.step, snap_bytes=len(c.snapshot), journal_bytes=0,
                         journal_len=0)
            elif c.delta:
                run.journal.append(c.delta)
                m["journal_bytes"] = int(m["journal_bytes"]) + len(c.delta)
                m["journal_len"] = int(m["journal_len"]) + 1
            m.update(step=c.step, status=c.status, updated=int(time.time() * 1000))
            for e in c.events:
                run.events.append((self._new_id(), e))
            run.outbox.update(dict(c.outbox))
            run.seen.update(c.seen)
            self.counters_["steps_total"] = self.counters_.get("steps_total", 0) + 1
            self._cond.notify_all()
            return CommitResult(int(m["journal_bytes"]), int(m["snap_bytes"]),
                                int(m["journal_len"]))

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

    def delete(self, run_id: str) -> None:
        with self._lock:
            self._runs.pop(run_id, None)
            self._leases.pop(run_id, None)

    def send(self, run_id: str, message: bytes) -> str:
        with self._cond:
            run = self._get(run_id)
            eid = self._new_id()
            run.inbox.append((eid, message))
            self._cond.notify_all()
            return eid

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
            cur = int(self._get(run_id).meta["epoch"])
            if cur != epoch:
                raise Fenced(run_id, epoch, cur)
            self._leases[run_id] = (owner, int(time.time() * 1000) + ttl_ms)

    def release_lease(self, run_id: str, epoch: int, *, done: bool) -> bool:
        with self._lock:
            if int(self._get(run_id).meta["epoch"]) != epoch:
                return False
            if done:
                self._leases.pop(run_id, None)
            else:
                self._leases[run_id] = ("", 0)
            return True

    def lease_owner(self, run_id: str) -> str | None:
        with self._lock:
            owner, exp = self._leases.get(run_id, ("", 0))
            return owner if owner and exp > time.time() * 1000 else None

    def expired_leases(self, now_ms: int | None = None, count: int = 1000) -> list[tuple[str, int]]:
        now = int(time.time() * 1000) if now_ms is None else now_ms
        with self._lock:
            rows = sorted((exp, rid) for rid, (_, exp) in self._leases.items() if exp <= now)
        return [(rid, exp) for exp, rid in rows[:count]]

    def leases(self) -> dict[str, int]:
        with self._lock:
            return {rid: exp for rid, (_, exp) in self._leases.items()}

    def forget_lease(self, run_id: str) -> None:
        with self._lock:
            self._leases.pop(run_id, None)

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

    def counters(self) -> dict[str, int]:
        return dict(self.counters_)

    def ping(self) -> bool:
        return True

    def close(self) -> None:
        pass
