"""Retention and garbage collection: ended runs go, with their whole sub-agent tree.

- Retention: a root run that ended (finished, failed or cancelled) is removed, with
  every sub-agent below it, ``retention_s`` after it ended (`expire_ended`; the
  supervisor sweeps every few seconds). A quarantined root is kept for someone to
  look at, until `collect_garbage` removes it.
- `collect_garbage` (``undying gc``): every tree whose root ended more than
  ``older_than_s`` ago (quarantined included), and every ended sub-agent whose
  parent is gone (an orphan, left by a delete), is removed and reported.

Never removed: a tree with any run not ended (pending, running, waiting), a run a
host holds or has queued, a run whose outbox still has messages to relay. Each
run is removed by one script that checks this again, atomically, so a run that
a host takes up meanwhile stays. A tree is removed leaves first: a sweep stopped
half way leaves a root that the next sweep finds again.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from ._store import TERMINAL

DEFAULT_RETENTION_S = 7 * 24 * 3600.0
RETENTION_STATUSES = frozenset({"finished", "failed", "cancelled"})


@dataclass
class Removed:
    root: str
    status: str
    runs: int  # the root and its sub-agents removed
    age_s: float  # since the root's last step


@dataclass
class GcReport:
    removed: list[Removed] = field(default_factory=list)
    kept: list[tuple[str, str]] = field(default_factory=list)  # (root, why it stays)
    dry_run: bool = False

    @property
    def runs_removed(self) -> int:
        return sum(r.runs for r in self.removed)


def _tree_status(store: Any, root: str) -> tuple[list[str], str | None]:
    """The tree's ids (leaves first) and why it must stay (None: it may go)."""
    ids = [root, *store.descendants(root)]
    for rid in ids:
        try:
            info = store.info(rid)
        except Exception:
            continue  # gone meanwhile
        if info.status not in TERMINAL:
            return ids, f"{rid} is {info.status}"
    return sorted(ids, key=lambda r: (-r.count("."), r)), None


def remove_tree(store: Any, root: str, why: str) -> tuple[int, str | None]:
    """Remove a run and every sub-agent below it if all have ended: (runs removed, or the
    reason it stays)."""
    ids, busy = _tree_status(store, root)
    if busy is not None:
        return 0, busy
    n = 0
    for rid in ids:
        out = store.remove_ended(rid, why)
        if out == "ok":
            n += 1
        elif out != "gone":
            return n, f"{rid}: {out}"
    return n, None


def expire_ended(store: Any, retention_s: float, now: float | None = None,
                 limit: int = 200) -> list[Removed]:
    """Remove root runs that ended more than ``retention_s`` ago, with their trees."""
    now = time.time() if now is None else now
    out = []
    for root, ended_ms in store.ended_before(int((now - retention_s) * 1000), count=limit):
        try:
            status = store.info(root).status
        except Exception:
            store.remove_ended(root, "retention")  # its record is gone: drop the index entry
            continue
        if status not in RETENTION_STATUSES:
            continue  # quarantined: kept for someone to look at (gc removes it)
        n, _busy = remove_tree(store, root, "retention")
        if n:
            out.append(Removed(root, status, n, now - ended_ms / 1000))
    return out


def collect_garbage(store: Any, older_than_s: float, *, dry_run: bool = False,
                    now: float | None = None) -> GcReport:
    """Remove every ended tree (and orphaned ended sub-agent) idle for ``older_than_s``."""
    now = time.time() if now is None else now
    report = GcReport(dry_run=dry_run)
    statuses = dict(store.index_items())
    roots = []
    for rid in sorted(statuses):
        if "." not in rid:
            roots.append(rid)
        elif rid.rsplit(".", 1)[0] not in statuses:
            roots.append(rid)  # an orphan: its parent is gone; its own subtree goes with it
    for root in roots:
        if statuses.get(root) not in TERMINAL:
            continue
        try:
            info = store.info(root)
        except Exception:
            continue
        age = now - info.updated_ms / 1000
        if age < older_than_s:
            continue
        if dry_run:
            ids, busy = _tree_status(store, root)
            if busy is None:
                report.removed.append(Removed(root, info.status, len(ids), age))
            else:
                report.kept.append((root, busy))
            continue
        n, busy = remove_tree(store, root, "gc")
        if n:
            report.removed.append(Removed(root, info.status, n, age))
        if busy is not None:
            report.kept.append((root, busy))
    return report
