"""The exporter: one Prometheus scrape target for the whole cluster, read from Redis.

    undying exporter --port 9464            # or: the supervisor starts it (exporter_port)

A custom collector reads Redis on every scrape, so the values are the cluster's
(every host, executor and the supervisor write there) and survive any process:
counters the Lua scripts bump (``ud:counters``), what processes recorded
(``ud:metrics``, see `undying.persistence.metrics`), and gauges computed from
the run index now (runs by state, sub-agents in flight, idle runs, approvals,
Redis health). The catalogue of what is exposed is
`undying.persistence.metrics.CATALOG`; nothing outside it is.

Cost of a scrape: a few pipelines, plus one read per run that has not ended
(state, lease, last step): fine for tens of thousands of runs in flight at a
15 s scrape interval.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import redis
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from undying.persistence.metrics import (
    CATALOG,
    METRICS_KEY,
    bucket_label,
    decode_field,
)

IDLE_BOUNDS = (60, 300, 900, 3600)
HOST_STALE_MS = 3000
_SCRIPT_COUNTERS = {
    "commit_bytes_total": "undying_checkpoint_bytes_written_total",
    "snapshots_total": "undying_snapshots_total",
    "fenced_commits_total": "undying_fenced_commits_total",
    "spawns_total": "undying_spawns_total",
    "activations_total": "undying_activations_total",
    "passivations_total": "undying_passivations_total",
    "forks_total": "undying_forks_total",
}
_NON_TERMINAL = ("pending", "running", "waiting")
_STATUSES = ("pending", "running", "waiting", "finished", "failed", "cancelled", "quarantined")

Labels = tuple[tuple[str, str], ...]
Series = dict[str, dict[Labels, Any]]  # metric -> labels -> value (histograms: part -> value)


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


class RedisCollector(Collector):
    """Reads every undying metric from Redis at collect time."""

    def __init__(self, url: str | None = None, *, client: Any = None) -> None:
        self.r: Any = client if client is not None else redis.Redis.from_url(
            url or "", socket_timeout=5, socket_connect_timeout=2)

    # -- reading ---------------------------------------------------------------------------

    def read(self, now: float | None = None) -> Series:
        """All series, as plain data: {metric: {labels: value}}."""
        now = time.time() if now is None else now
        t0 = time.perf_counter()
        out: Series = {name: {} for name in CATALOG}
        try:
            ping0 = time.perf_counter()
            self.r.ping()
            ping = time.perf_counter() - ping0
        except redis.RedisError:
            out["undying_redis_up"][()] = 0
            return out
        out["undying_redis_up"][()] = 1
        out["undying_redis_ping_seconds"][()] = ping
        p = self.r.pipeline(transaction=False)
        for status in _STATUSES:
            p.scard(f"ud:state:{status}")
        p.llen("ud:ready")
        p.zcard("ud:leases")
        p.zcard("ud:fx:due")
        p.hgetall("ud:hosts")
        p.hgetall("ud:counters")
        p.hgetall(METRICS_KEY)
        p.zrange("ud:approvals", 0, -1, withscores=True)
        p.dbsize()
        res = p.execute()
        counts = dict(zip(_STATUSES, (int(x) for x in res[:7]), strict=True))
        ready, leases, calls, hosts, counters, recorded, approvals, keys = res[7:]
        out["undying_ready_queue_length"][()] = int(ready)
        out["undying_active_leases"][()] = int(leases)
        out["undying_calls_in_flight"][()] = int(calls)
        out["undying_redis_keys"][()] = int(keys)
        now_ms = now * 1000
        out["undying_hosts"][()] = sum(
            1 for v in hosts.values() if now_ms - float(_s(v).split("|", 1)[0] or 0) <= HOST_STALE_MS)
        waiting_runs = {_s(m).rsplit("|", 1)[0] for m, _ in approvals}
        out["undying_approvals_pending"][()] = len(approvals)
        oldest = min((float(sc) for _, sc in approvals), default=None)
        out["undying_approval_oldest_age_seconds"][()] = (
            max(0.0, (now_ms - oldest) / 1000) if oldest is not None else 0.0)
        self._runs(out, counts, waiting_runs, now_ms)
        self._script_counters(out, {_s(k): float(_s(v)) for k, v in counters.items()})
        for raw, v in recorded.items():
            name, labels, part = decode_field(_s(raw))
            if name not in CATALOG:
                continue  # written by a newer undying: not ours to expose
            value = float(_s(v))
            if CATALOG[name].kind == "histogram":
                series = out[name].setdefault(labels, {})
                series[part] = series.get(part, 0.0) + value
            else:
                out[name][labels] = out[name].get(labels, 0.0) + value
        self._redis_info(out)
        out["undying_exporter_scrape_seconds"][()] = time.perf_counter() - t0
        return out

    def _runs(self, out: Series, counts: dict[str, int], awaiting_person: set[str],
              now_ms: float) -> None:
        """Runs by state (passivated: waiting with no lease), sub-agents in flight by depth,
        runs idle for too long."""
        ids: dict[str, list[str]] = {}
        for status in _NON_TERMINAL:
            ids[status] = [_s(m) for m in self.r.sscan_iter(f"ud:state:{status}", count=1000)]
        every = [r for rs in ids.values() for r in rs]
        p = self.r.pipeline(transaction=False)
        for rid in ids["waiting"]:
            p.exists(f"ud:{{{rid}}}:lease")
        for rid in every:
            p.hget(f"ud:{{{rid}}}:meta", "updated")
        res = p.execute() if every else []
        nw = len(ids["waiting"])
        passivated = sum(1 for x in res[:nw] if not x)
        updated = dict(zip(every, res[nw:], strict=True))
        states = out["undying_runs"]
        for status in _STATUSES:
            states[(("state", status),)] = counts[status]
        states[(("state", "waiting"),)] = max(0, counts["waiting"] - passivated)
        states[(("state", "passivated"),)] = passivated
        by_depth: dict[int, int] = {}
        parents = set()
        for rid in every:
            depth = rid.count(".")
            if depth:
                by_depth[depth] = by_depth.get(depth, 0) + 1
                parents.add(rid.rsplit(".", 1)[0])
        for depth in range(1, max([1, *by_depth]) + 1):
            out["undying_subagents_in_flight"][(("depth", str(depth)),)] = by_depth.get(depth, 0)
        out["undying_delegation_depth_max"][()] = max(by_depth, default=0)
        idle = [max(0.0, (now_ms - float(_s(u))) / 1000) for rid, u in updated.items()
                if u is not None and rid not in parents and rid not in awaiting_person]
        for bound in IDLE_BOUNDS:
            out["undying_runs_idle"][(("over", str(bound)),)] = sum(1 for x in idle if x > bound)
        out["undying_run_idle_seconds_max"][()] = max(idle, default=0.0)

    @staticmethod
    def _script_counters(out: Series, c: dict[str, float]) -> None:
        for field, name in _SCRIPT_COUNTERS.items():
            out[name][()] = c.get(field, 0.0)
        by_kind = 0.0
        for field, v in c.items():
            if field.startswith("steps|"):
                out["undying_steps_total"][(("kind", field[6:]),)] = v
                by_kind += v
            elif field.startswith("removed|"):
                out["undying_runs_removed_total"][(("why", field[8:]),)] = v
            elif field.startswith("ended|"):
                out["undying_runs_ended_total"][(("status", field[6:]),)] = v
        rest = c.get("steps_total", 0.0) - by_kind
        if rest > 0:  # steps committed by an undying that did not count kinds
            out["undying_steps_total"][(("kind", "unknown"),)] = rest

    def _redis_info(self, out: Series) -> None:
        try:
            info = self.r.info()
        except redis.RedisError:
            return  # an ACL without INFO (cluster/deploy/redis/users.acl): these stay absent
        for key, name in (("used_memory", "undying_redis_used_memory_bytes"),
                          ("connected_clients", "undying_redis_connected_clients"),
                          ("total_commands_processed", "undying_redis_commands_processed_total")):
            if key in info:
                out[name][()] = float(info[key])
        if "aof_last_write_status" in info:
            out["undying_redis_aof_last_write_ok"][()] = (
                1.0 if info["aof_last_write_status"] == "ok" else 0.0)

    # -- exposing ------------------------------------------------------------------------------

    def collect(self) -> Iterator[Metric]:
        raw = self.read()
        if not raw["undying_redis_up"].get((), 0):
            yield family(CATALOG["undying_redis_up"], raw["undying_redis_up"])
            return  # nothing else is known: no zeros that would look like a quiet cluster
        series = pad(raw)
        for name, m in CATALOG.items():
            rows = series.get(name, {})
            if not rows and m.labels:
                continue
            if not rows and m.source == "scrape":
                continue  # not measurable right now (Redis down, INFO refused)
            yield family(m, rows)


def pad(series: Series) -> Series:
    """Expose zeros where a series is known to exist: every value of a closed label set,
    and every label combination of the family a metric belongs to."""
    out: Series = {name: dict(rows) for name, rows in series.items()}
    for name, m in CATALOG.items():
        rows = out.setdefault(name, {})
        free = [lb for lb in m.labels if lb not in m.enums]
        groups = {tuple((k, v) for k, v in labels if k in free) for labels in rows}
        if m.pad_like:
            for labels in out.get(m.pad_like, {}):
                groups.add(tuple((k, v) for k, v in labels if k in free))
        if not free and (m.enums or m.source != "scrape"):
            groups.add(())  # an unlabeled counter or histogram is 0 before its first event
        for g in groups:
            if len(g) != len(free):
                continue
            combos: list[Labels] = [()]
            for lb in m.labels:
                if lb in m.enums:
                    combos = [c + ((lb, v),) for c in combos for v in m.enums[lb]]
                else:
                    combos = [c + ((lb, dict(g)[lb]),) for c in combos]
            have = {tuple(sorted(x)) for x in rows}
            for labels in combos:
                if tuple(sorted(labels)) not in have:
                    rows[labels] = {} if m.kind == "histogram" else 0.0
    return out


def family(m: Any, rows: dict[Labels, Any]) -> Metric:
    labels = list(m.labels)

    def values(key: Labels) -> list[str]:
        d = dict(key)
        return [d.get(lb, "") for lb in labels]

    if m.kind == "counter":
        fam: Any = CounterMetricFamily(m.name, m.help, labels=labels)
        for key, v in sorted(rows.items()):
            fam.add_metric(values(key), float(v))
        return fam  # type: ignore[no-any-return]
    if m.kind == "gauge":
        fam = GaugeMetricFamily(m.name, m.help, labels=labels)
        for key, v in sorted(rows.items()):
            fam.add_metric(values(key), float(v))
        return fam  # type: ignore[no-any-return]
    fam = HistogramMetricFamily(m.name, m.help, labels=labels)
    for key, parts in sorted(rows.items()):
        running = 0.0
        buckets = []
        for bound in (*m.buckets, float("inf")):
            label = bucket_label(bound)
            running += float(parts.get(label, 0.0))
            buckets.append((label, running))
        fam.add_metric(values(key), buckets, float(parts.get("sum", 0.0)))
    return fam  # type: ignore[no-any-return]


def registry_for(url: str) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(RedisCollector(url))
    return reg


def render(url: str) -> bytes:
    """The exposition text of one scrape (tests, `undying exporter --once`)."""
    from prometheus_client import generate_latest

    return generate_latest(registry_for(url))


def serve(url: str, port: int, addr: str = "127.0.0.1") -> tuple[Any, Any]:
    """Serve /metrics on ``addr:port`` in a daemon thread; returns (server, thread)."""
    from prometheus_client import start_http_server

    return start_http_server(port, addr=addr, registry=registry_for(url))
