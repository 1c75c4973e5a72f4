"""Looking at runs: live watch (of one run or its whole tree), history, forks, cleanup, metrics.

Part of the Python API (`undying.Undying` has these methods):

    for run_id, entry_id, ev in ud.watch_tree(root):   # steps live, sub-agents as they spawn
        ...                                             # reconnect: watch_tree(root, after=cursors)
    ud.history_entries(run_id)                          # [(entry id, StepEvent)], restarts included
    fork = ud.fork(run_id, at=5)                        # a new run from the state after step 5
    ud.gc(older_than_s=86400)                           # remove ended trees idle for a day
    ud.serve_metrics(9464)                              # the Prometheus exporter, here

Watching: every step appends an event to its run's stream in Redis, with an id that
only grows; a watcher keeps the id of the last event it saw per run, and a watcher
that reconnects with those ids reads from exactly there: no gap, no duplicate.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from undying.actors import StepEvent, load_state
from undying.actors._fork import fork_run, state_at
from undying.persistence import TERMINAL, RunNotFound, UndyingError, decode
from undying.persistence.retention import GcReport, Removed, collect_garbage, expire_ended


def observe_options() -> dict[str, Any]:
    """Supervisor options from the environment: ``UNDYING_EXPORTER_PORT`` (the supervisor
    serves the cluster's metrics there), ``UNDYING_EXPORTER_ADDR`` (default 127.0.0.1; 0.0.0.0
    to be scraped from another machine), ``UNDYING_RETENTION`` (ended runs are removed that
    long after they ended: 90s, 12h, 7d; ``never`` keeps them)."""
    import os

    out: dict[str, Any] = {}
    env = os.environ
    if env.get("UNDYING_EXPORTER_PORT"):
        out["exporter_port"] = int(env["UNDYING_EXPORTER_PORT"])
    if env.get("UNDYING_EXPORTER_ADDR"):
        out["exporter_addr"] = env["UNDYING_EXPORTER_ADDR"]
    if env.get("UNDYING_RETENTION"):
        from ._cli_observe import duration

        text = env["UNDYING_RETENTION"]
        out["retention_s"] = None if text.strip().lower() == "never" else duration(text)
    return out


class Observing:
    # provided by Undying
    store: Any
    redis_url: str

    def ensure_cluster(self) -> None: ...
    def handle(self, run_id: str) -> Any: ...
    def info(self, run_id: str) -> Any: ...

    # -- history -------------------------------------------------------------------------

    def history_entries(self, run_id: str, after: str = "0-0") -> list[tuple[str, StepEvent]]:
        """Every event of the run after ``after``: (entry id, event), oldest first. Steps,
        restarts (kind "restart"), approvals (kind "approval", who decided in the summary),
        a fork's origin (kind "fork")."""
        self.store.info(run_id)
        out: list[tuple[str, StepEvent]] = []
        while True:
            batch = self.store.read_events(run_id, after, 1000)
            out.extend((e.entry_id, decode("event", StepEvent, e.data, run_id=run_id))
                       for e in batch)
            if len(batch) < 1000:
                return out
            after = batch[-1].entry_id

    def state_at(self, run_id: str, step: int) -> Any:
        """The run's state right after ``step`` (rebuilt from its history)."""
        return state_at(self.store, run_id, step)

    # -- live watch -------------------------------------------------------------------------

    def watch_tree(self, run_id: str, after: dict[str, str] | None = None,
                   timeout: float | None = None, tree: bool = True,
                   ) -> Iterator[tuple[str, str, StepEvent]]:
        """Yield (run id, entry id, event) as the run (and, with ``tree``, every sub-agent
        below it, from when it is spawned) commits steps; stop when all of them have ended.

        ``after``: the last entry id seen per run (from an earlier watch): the watch goes
        on from there. Runs it does not name are read from their first event."""
        self.store.info(run_id)  # raises RunNotFound
        cursors: dict[str, str] = {run_id: "0-0"}
        cursors.update(after or {})
        ended: set[str] = set()
        if tree:
            for rid in list(cursors):
                self._discover(rid, cursors)
        deadline = None if timeout is None else time.monotonic() + timeout
        idle_checks = 0
        while True:
            live = {r: c for r, c in cursors.items() if r not in ended}
            if not live:
                return
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    from ._client import RunTimeout

                    raise RunTimeout(f"run {run_id!r} did not end within {timeout}s")
                block = max(1, min(int(left * 1000), 1000))
            else:
                block = 1000
            batch = self.store.read_events_multi(live, 200, block_ms=block)
            for rid, entry in batch:
                cursors[rid] = entry.entry_id
                ev = decode("event", StepEvent, entry.data, run_id=rid)
                yield rid, entry.entry_id, ev
                if ev.status in TERMINAL and ev.kind != "restart":
                    ended.add(rid)
                if tree and (ev.kind == "fork" or "delegate" in ev.summary):
                    self._discover(rid, cursors)
            if batch:
                idle_checks = 0
                continue
            idle_checks += 1
            # nothing new: a run may have ended before we watched it (its last event was
            # read by an earlier watch), or been removed; children may have been missed
            for rid in list(live):
                try:
                    status = self.store.info(rid).status
                except RunNotFound:
                    ended.add(rid)
                    continue
                if status in TERMINAL and not self.store.read_events(rid, cursors[rid], 1):
                    ended.add(rid)
            if tree and idle_checks % 5 == 0:
                for rid in list(cursors):
                    self._discover(rid, cursors)

    def _discover(self, run_id: str, cursors: dict[str, str]) -> None:
        """Add the run's sub-agents (from its delegation ledger) to the watch."""
        try:
            d = load_state(self.store, run_id)[0].delegation
        except UndyingError:
            return
        for child in (*d.pending, *d.done):
            if child not in cursors:
                cursors[child] = "0-0"
                self._discover(child, cursors)

    # -- forks -------------------------------------------------------------------------------

    def fork(self, run_id: str, at: int, *, new_id: str | None = None, start: bool = True) -> Any:
        """A new run from ``run_id``'s state after step ``at``: the steps before are not run
        again (their results are the recorded ones), what was in flight then runs fresh.
        ``start=False``: only store it, queued for the cluster's hosts (no Ray here)."""
        if start:
            self.ensure_cluster()
        fid = fork_run(self.store, run_id, at, new_id=new_id)
        return self.handle(fid)

    # -- cleanup -------------------------------------------------------------------------------

    def gc(self, older_than_s: float, *, dry_run: bool = False) -> GcReport:
        """Remove every ended run tree whose root's last step is older than ``older_than_s``
        (and ended sub-agents whose parent is gone). Nothing running or waiting goes."""
        return collect_garbage(self.store, older_than_s, dry_run=dry_run)

    def expire(self, retention_s: float) -> list[Removed]:
        """Apply retention now: remove root runs (with their trees) that ended (finished,
        failed or cancelled) more than ``retention_s`` ago. The supervisor does this on its
        own every few seconds (its option ``retention_s``, default 7 days)."""
        return expire_ended(self.store, retention_s)

    # -- metrics --------------------------------------------------------------------------------

    def serve_metrics(self, port: int, addr: str = "127.0.0.1") -> tuple[Any, Any]:
        """Serve the cluster's metrics for Prometheus on ``addr:port`` (a daemon thread)."""
        from undying.dashboards.exporter import serve

        return serve(self.redis_url, port, addr)

    def metrics_text(self) -> str:
        """One scrape of the exporter, as Prometheus's text format."""
        from undying.dashboards.exporter import render

        return render(self.redis_url).decode()
