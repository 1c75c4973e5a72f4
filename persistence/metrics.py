"""Run-health metrics: the catalogue, and the in-process recorder that feeds Redis.

Every metric undying exposes is named here, with its type, labels and where its
value comes from. There are three sources, and one exporter
(`undying.dashboards.exporter`) reads all of them from Redis at scrape time, so
one scrape target sees the whole cluster and no process death resets a counter:

- ``script``: counters the Lua scripts bump in the same atomic step as the
  write they count (``ud:counters``): exact and nearly free.
- ``recorder``: counters and histograms recorded in the process that observes
  them (a host timing its commits, an executor timing a model call). A
  `Recorder` adds them up in memory and flushes them about once a second, one
  pipeline of HINCRBY / HINCRBYFLOAT on ``ud:metrics`` per process: a step never
  pays a Redis round trip for its metrics. A process that dies loses at most
  its last second of observations; rare events (restarts, lease expiries) are
  written at once with `Recorder.count_now`.
- ``scrape``: gauges computed from the run index when Prometheus scrapes.

Labels are low-cardinality by construction: provider, model, tool, kind,
reason, outcome, state, depth. Never a run id.

A ``ud:metrics`` field is JSON ``[name, [[label, value], ...], part]``, where part
is ``""`` for a counter, and for a histogram the upper bound of one bucket
(``"0.005"``, ``"+Inf"``: counts per bucket, not cumulative), ``"sum"`` or ``"count"``.
"""

from __future__ import annotations

import atexit
import bisect
import json
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

METRICS_KEY = "ud:metrics"

_LATENCY_FAST = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                 0.25, 0.5, 1.0, 2.5)
_LATENCY_CALL = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                 120.0)
_RECOVERY = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0, 120.0)
_BYTES = (256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0, 4194304.0,
          16777216.0)
_FANOUT = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 1024.0)

MODEL_OUTCOMES = ("ok", "error", "malformed")
TOOL_OUTCOMES = ("ok", "error", "invalid_arguments", "not_installed", "needs_approval")
RESTART_REASONS = ("host_died", "host_unresponsive", "lease_expired", "activation_crashed",
                   "other")
RUN_STATES = ("pending", "running", "waiting", "passivated", "finished", "failed",
              "cancelled", "quarantined")


@dataclass(frozen=True)
class Metric:
    name: str
    kind: str  # "counter", "gauge" or "histogram"
    help: str
    source: str  # "script", "recorder" or "scrape"
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()
    # closed sets of label values: every value is exposed (at zero) for each combination
    # of the other labels seen, so a rate over an outcome that never happened is 0, not empty
    enums: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # the metric whose label combinations this one is padded with (model, tool families)
    pad_like: str = ""


def _m(name: str, kind: str, help: str, source: str, *labels: str, **kw: Any) -> Metric:
    return Metric(name, kind, help, source, tuple(labels), **kw)


_MODEL = ("provider", "model")

CATALOG: dict[str, Metric] = {m.name: m for m in (
    # -- runs (scrape time, from the run index) ----------------------------------------------
    _m("undying_runs", "gauge", "Runs by state. waiting: queued for a host (a message arrived); "
       "passivated: waiting for something while holding no process.", "scrape", "state",
       enums={"state": RUN_STATES}),
    _m("undying_ready_queue_length", "gauge", "Runs queued for activation by a host.", "scrape"),
    _m("undying_active_leases", "gauge", "Runs a host holds right now.", "scrape"),
    _m("undying_hosts", "gauge", "Host actors that renewed their registration in the last 3 s.",
       "scrape"),
    _m("undying_calls_in_flight", "gauge", "Model and tool calls dispatched and not yet answered.",
       "scrape"),
    _m("undying_runs_idle", "gauge", "Runs not ended, not waiting for a person or for their "
       "sub-agents, whose last step is older than the bound (seconds).", "scrape", "over"),
    _m("undying_run_idle_seconds_max", "gauge", "The longest time since the last step among "
       "those runs (0 when there are none).", "scrape"),
    _m("undying_subagents_in_flight", "gauge", "Sub-agent runs not yet ended, by delegation depth.",
       "scrape", "depth"),
    _m("undying_delegation_depth_max", "gauge", "The deepest sub-agent not yet ended (0: none).",
       "scrape"),
    _m("undying_approvals_pending", "gauge", "Tool calls waiting for someone's approval.", "scrape"),
    _m("undying_approval_oldest_age_seconds", "gauge", "How long the oldest pending approval "
       "has waited (0 when none).", "scrape"),
    # -- Redis health (scrape time) -------------------------------------------------------------
    _m("undying_redis_up", "gauge", "1 if the exporter reached Redis on this scrape.", "scrape"),
    _m("undying_redis_ping_seconds", "gauge", "Round trip of one PING from the exporter.", "scrape"),
    _m("undying_redis_keys", "gauge", "Keys in undying's Redis database (DBSIZE).", "scrape"),
    _m("undying_redis_used_memory_bytes", "gauge", "Redis used_memory (needs INFO rights).",
       "scrape"),
    _m("undying_redis_connected_clients", "gauge", "Redis connected_clients (needs INFO rights).",
       "scrape"),
    _m("undying_redis_commands_processed_total", "counter", "Redis total_commands_processed "
       "(needs INFO rights).", "scrape"),
    _m("undying_redis_aof_last_write_ok", "gauge", "1 if Redis's last AOF write succeeded "
       "(needs INFO rights).", "scrape"),
    _m("undying_exporter_scrape_seconds", "gauge", "How long the exporter took to read Redis.",
       "scrape"),
    # -- steps and checkpoints (commit script: exact) ----------------------------------------
    _m("undying_steps_total", "counter", "Committed steps, by the kind of message applied.",
       "script", "kind"),
    _m("undying_runs_ended_total", "counter", "Runs that ended, by how.", "script", "status",
       enums={"status": ("finished", "failed", "cancelled", "quarantined")}),
    _m("undying_checkpoint_bytes_written_total", "counter", "Checkpoint bytes committed "
       "(deltas and snapshots).", "script"),
    _m("undying_snapshots_total", "counter", "Full snapshots written by compaction.", "script"),
    _m("undying_fenced_commits_total", "counter", "Commits refused because a newer incarnation "
       "of the run holds it (a zombie's write).", "script"),
    _m("undying_spawns_total", "counter", "Sub-agent runs created.", "script"),
    _m("undying_activations_total", "counter", "Runs taken up by a host.", "script"),
    _m("undying_passivations_total", "counter", "Runs that gave their process back to wait.",
       "script"),
    _m("undying_forks_total", "counter", "Runs forked from a step of another run.", "script"),
    _m("undying_runs_removed_total", "counter", "Runs removed by retention or gc.", "script",
       "why", enums={"why": ("retention", "gc")}),
    # -- recorded in process ----------------------------------------------------------------------
    _m("undying_commit_seconds", "histogram", "Latency of one checkpoint commit (the Lua script's "
       "round trip), seen by the host.", "recorder", buckets=_LATENCY_FAST),
    _m("undying_checkpoint_bytes", "histogram", "Size of one committed checkpoint record.",
       "recorder", "kind", buckets=_BYTES, enums={"kind": ("delta", "snapshot")}),
    _m("undying_restarts_total", "counter", "Runs restarted by the supervisor, by reason.",
       "recorder", "reason", enums={"reason": RESTART_REASONS}),
    _m("undying_recovery_seconds", "histogram", "From the supervisor noticing a run's activation "
       "died to that run's next committed step.", "recorder", buckets=_RECOVERY),
    _m("undying_lease_expiries_total", "counter", "Run leases the supervisor found expired.",
       "recorder"),
    _m("undying_model_calls_total", "counter", "Model calls, by provider, model and outcome.",
       "recorder", *_MODEL, "outcome", enums={"outcome": MODEL_OUTCOMES}),
    _m("undying_model_call_seconds", "histogram", "Latency of one model call, retries included.",
       "recorder", *_MODEL, buckets=_LATENCY_CALL, pad_like="undying_model_calls_total"),
    _m("undying_model_errors_total", "counter", "Model calls that failed, by the last failure's "
       "kind (http_429, http_503, timeout, connect, malformed, ...).", "recorder", *_MODEL, "kind"),
    _m("undying_model_retries_total", "counter", "Failed attempts of model calls that were retried, "
       "by kind.", "recorder", *_MODEL, "kind"),
    _m("undying_model_rate_limited_total", "counter", "HTTP 429 answers from providers (retried "
       "or final).", "recorder", *_MODEL, pad_like="undying_model_calls_total"),
    _m("undying_model_tokens_total", "counter", "Tokens of model calls, by direction (in, out).",
       "recorder", *_MODEL, "direction", enums={"direction": ("in", "out")},
       pad_like="undying_model_calls_total"),
    _m("undying_model_cost_usd_total", "counter", "Cost of model calls in US dollars (by the "
       "prices in the model's options).", "recorder", *_MODEL,
       pad_like="undying_model_calls_total"),
    _m("undying_tool_calls_total", "counter", "Tool calls, by tool and outcome.", "recorder",
       "tool", "outcome", enums={"outcome": TOOL_OUTCOMES}),
    _m("undying_tool_call_seconds", "histogram", "Latency of one tool call.", "recorder", "tool",
       buckets=_LATENCY_CALL, pad_like="undying_tool_calls_total"),
    _m("undying_tool_calls_in_doubt_total", "counter", "At-most-once tool calls whose executor "
       "died after they began: they may or may not have happened.", "recorder", "tool",
       pad_like="undying_tool_calls_total"),
    _m("undying_delegation_fanout", "histogram", "Sub-agents spawned by one step.", "recorder",
       buckets=_FANOUT),
)}


def encode_field(name: str, labels: tuple[tuple[str, str], ...], part: str = "") -> str:
    return json.dumps([name, [list(x) for x in labels], part], separators=(",", ":"))


def decode_field(raw: str) -> tuple[str, tuple[tuple[str, str], ...], str]:
    name, labels, part = json.loads(raw)
    return str(name), tuple((str(k), str(v)) for k, v in labels), str(part)


def bucket_label(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(float(bound))


Sink = Callable[[dict[str, float]], None]


class Recorder:
    """Adds metrics up in memory; `flush` sends them to the sink (one pipeline)."""

    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self._lock = threading.Lock()
        self._pending: dict[tuple[str, tuple[tuple[str, str], ...], str], float] = {}
        self.failures = 0
        _register(self)

    def inc(self, name: str, n: float = 1, **labels: str) -> None:
        key = (name, _labels(labels), "")
        with self._lock:
            self._pending[key] = self._pending.get(key, 0) + n

    def observe(self, name: str, value: float, **labels: str) -> None:
        m = CATALOG[name]
        lt = _labels(labels)
        i = bisect.bisect_left(m.buckets, value)
        bound = bucket_label(m.buckets[i]) if i < len(m.buckets) else "+Inf"
        with self._lock:
            p = self._pending
            for part, n in ((bound, 1), ("sum", value), ("count", 1)):
                key = (name, lt, part)
                p[key] = p.get(key, 0) + n

    def count_now(self, name: str, n: float = 1, **labels: str) -> None:
        """A rare event that must not wait for the next flush (a restart, a lease expiry)."""
        try:
            self.sink({encode_field(name, _labels(labels)): n})
        except Exception:
            self.inc(name, n, **labels)  # the store is down: the next flush tries again

    def flush(self) -> int:
        with self._lock:
            pending, self._pending = self._pending, {}
        if not pending:
            return 0
        try:
            self.sink({encode_field(*k): v for k, v in pending.items()})
        except Exception:
            self.failures += 1
            if self.failures <= 60:  # keep them while the store is away (a minute), then drop
                with self._lock:
                    for k, v in pending.items():
                        self._pending[k] = self._pending.get(k, 0) + v
            return 0
        self.failures = 0
        return len(pending)


class NullRecorder(Recorder):
    """For stores that keep no metrics."""

    def __init__(self) -> None:
        pass

    def inc(self, name: str, n: float = 1, **labels: str) -> None:
        pass

    def observe(self, name: str, value: float, **labels: str) -> None:
        pass

    def count_now(self, name: str, n: float = 1, **labels: str) -> None:
        pass

    def flush(self) -> int:
        return 0


NULL = NullRecorder()


def _labels(labels: dict[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((k, str(v)) for k, v in labels.items())) if labels else ()


def recorder_for(store: Any) -> Recorder:
    """The recorder of a store (one per store object, made on first use); a store with no
    ``add_metrics`` gets one that records nothing."""
    try:
        rec = store.__dict__.get("_metrics_recorder")
    except AttributeError:
        return NULL
    if rec is not None:
        return rec  # type: ignore[no-any-return]
    add = getattr(store, "add_metrics", None)
    if add is None:
        return NULL
    rec = Recorder(add)
    try:
        store.__dict__["_metrics_recorder"] = rec
    except (AttributeError, TypeError):
        pass
    return rec


# -- one flusher thread per process --------------------------------------------------------

FLUSH_EVERY_S = 1.0
_recorders: weakref.WeakSet[Recorder] = weakref.WeakSet()
_flusher: threading.Thread | None = None
_flusher_lock = threading.Lock()


def _register(rec: Recorder) -> None:
    global _flusher
    _recorders.add(rec)
    with _flusher_lock:
        if _flusher is None or not _flusher.is_alive():
            _flusher = threading.Thread(target=_flush_forever, name="undying-metrics",
                                        daemon=True)
            _flusher.start()


def flush_all() -> int:
    return sum(r.flush() for r in list(_recorders))


def _flush_forever() -> None:
    while True:
        time.sleep(FLUSH_EVERY_S)
        try:
            flush_all()
        except Exception:
            pass


atexit.register(flush_all)


def restart_reason(text: str) -> str:
    """The low-cardinality reason of a restart, from the supervisor's free-text reason."""
    t = text.lower()
    if "activation crashed" in t:
        return "activation_crashed"
    if "lease expired" in t:
        return "lease_expired"
    if "stopped answering" in t:
        return "host_unresponsive"
    if t.startswith("host ") and " died" in t:
        return "host_died"
    return "other"


def add_up(target: dict[str, float], incs: Iterable[tuple[str, float]]) -> None:
    for k, v in incs:
        target[k] = target.get(k, 0) + v
