"""What the supervisor does for observability: restart metrics, retention, the exporter.

Kept out of the actor so that it stays an adapter of the policy: the actor calls
these at the points it already has (a restart, a lease expiry, its scan loop,
its boot).
"""

from __future__ import annotations

import time
from typing import Any

from undying.persistence.metrics import recorder_for, restart_reason
from undying.persistence.retention import DEFAULT_RETENTION_S, expire_ended

RETENTION_SWEEP_S = 10.0


def note_restart(store: Any, run_id: str, reason: str, detected_s: float) -> None:
    """(In a thread.) Count the restart by reason, and mark when its death was noticed: the
    run's next commit measures its recovery time from there."""
    recorder_for(store).count_now("undying_restarts_total", reason=restart_reason(reason))
    try:
        store.mark_recovering(run_id, int(detected_s * 1000))
    except Exception:
        pass  # a metric must never stand in the way of a restart


def note_lease_expired(store: Any) -> None:
    recorder_for(store).count_now("undying_lease_expiries_total")


class Housekeeping:
    """The supervisor's periodic retention sweep and its exporter (options ``retention_s``,
    ``exporter_port``, ``exporter_addr``, popped from the pool options)."""

    def __init__(self, options: dict[str, Any]) -> None:
        retention = options.pop("retention_s", DEFAULT_RETENTION_S)
        self.retention_s = None if retention is None else float(retention)
        port = options.pop("exporter_port", None)
        self.exporter_port = None if port in (None, "", 0) else int(port)
        self.exporter_addr = str(options.pop("exporter_addr", "127.0.0.1"))
        self.exporter: Any = None
        self.last_sweep = 0.0
        self.removed = 0

    def start_exporter(self, redis_url: str) -> str:
        if self.exporter_port is None or self.exporter is not None:
            return ""
        from undying.dashboards.exporter import serve

        try:
            self.exporter = serve(redis_url, self.exporter_port, self.exporter_addr)
        except OSError as exc:  # the port is taken: supervise anyway, and say so in `info`
            return f"exporter on {self.exporter_addr}:{self.exporter_port}: {exc}"
        return ""

    def sweep(self, store: Any) -> int:
        """(In a thread.) Remove ended trees past retention, at most every few seconds."""
        now = time.time()
        if self.retention_s is None or now - self.last_sweep < RETENTION_SWEEP_S:
            return 0
        self.last_sweep = now
        try:
            removed = expire_ended(store, self.retention_s, now)
        except Exception:
            return 0  # Redis away: the next sweep tries again; supervision goes on
        n = sum(r.runs for r in removed)
        self.removed += n
        return n
