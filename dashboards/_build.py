"""Writes the Grafana dashboards (grafana/dashboards/*.json) from the panel lists below.

    python -m undying.dashboards._build      # after changing a panel; commit the JSON

Every query uses only metrics the exporter exposes (`undying.persistence.metrics.CATALOG`);
tests/unit/test_dashboards.py checks that, and tests/integration/test_prometheus.py runs
every query against a real Prometheus scraping a real batch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
OUT = HERE / "grafana" / "dashboards"
DS = {"type": "prometheus", "uid": "${datasource}"}

Panel = tuple[str, str, list[tuple[str, str]], str]  # (title, type, [(expr, legend)], unit)


def _p50_99(metric: str, by: str = "", window: str = "5m") -> list[tuple[str, str]]:
    group = f"le{', ' + by if by else ''}"
    legend = "{{" + by.split(",")[0].strip() + "}} " if by else ""
    return [(f"histogram_quantile({q}, sum by ({group}) (rate({metric}_bucket[{window}])))",
             f"{legend}p{int(q * 100)}") for q in (0.5, 0.99)]


DASHBOARDS: dict[str, tuple[str, str, list[Panel]]] = {
    "overview": ("undying: run health", "What is running, failing, stuck and restarting.", [
        ("Runs by state", "timeseries",
         [("sum by (state) (undying_runs)", "{{state}}")], "short"),
        ("Running now", "stat", [('sum(undying_runs{state="running"})', "running")], "short"),
        ("Passivated (waiting, no process)", "stat",
         [('sum(undying_runs{state="passivated"})', "passivated")], "short"),
        ("Runs ending per minute, by outcome", "timeseries",
         [("sum by (status) (rate(undying_runs_ended_total[5m])) * 60", "{{status}}")], "short"),
        ("Steps per second, by kind", "timeseries",
         [("sum by (kind) (rate(undying_steps_total[1m]))", "{{kind}}")], "ops"),
        ("Steps per second", "stat", [("sum(rate(undying_steps_total[1m]))", "steps/s")], "ops"),
        ("Stuck: runs without a step for 5 min", "stat",
         [('sum(undying_runs_idle{over="300"})', "runs")], "short"),
        ("Longest time without a step", "timeseries",
         [("max(undying_run_idle_seconds_max)", "seconds")], "s"),
        ("Restarts per minute, by reason", "timeseries",
         [("sum by (reason) (rate(undying_restarts_total[5m])) * 60", "{{reason}}")], "short"),
        ("Recovery time (death noticed to next commit)", "timeseries",
         _p50_99("undying_recovery_seconds", window="15m"), "s"),
        ("Lease expiries (15 min)", "stat",
         [("sum(increase(undying_lease_expiries_total[15m]))", "expiries")], "short"),
        ("Fenced (zombie) commits refused (15 min)", "stat",
         [("sum(increase(undying_fenced_commits_total[15m]))", "refused")], "short"),
        ("Queued for a host / held by a host / hosts alive", "timeseries",
         [("sum(undying_ready_queue_length)", "queued"),
          ("sum(undying_active_leases)", "held"),
          ("sum(undying_hosts)", "hosts")], "short"),
        ("Calls in flight (model and tool)", "timeseries",
         [("sum(undying_calls_in_flight)", "calls")], "short"),
        ("Approvals pending", "stat", [("sum(undying_approvals_pending)", "pending")], "short"),
        ("Oldest approval waiting", "stat",
         [("max(undying_approval_oldest_age_seconds)", "age")], "s"),
        ("Activations and passivations per second", "timeseries",
         [("sum(rate(undying_activations_total[1m]))", "activations"),
          ("sum(rate(undying_passivations_total[1m]))", "passivations")], "ops"),
        ("Runs removed (retention, gc) and forks, per hour", "timeseries",
         [("sum by (why) (rate(undying_runs_removed_total[1h])) * 3600", "removed: {{why}}"),
          ("sum(rate(undying_forks_total[1h])) * 3600", "forks")], "short"),
    ]),
    "models-tools": ("undying: models and tools", "Latency, errors, 429s, tokens and cost.", [
        ("Model calls per second", "timeseries",
         [("sum by (provider, model) (rate(undying_model_calls_total[5m]))",
           "{{provider}}:{{model}}")], "ops"),
        ("Model call latency", "timeseries",
         _p50_99("undying_model_call_seconds", by="model"), "s"),
        ("Model call errors per second, by outcome", "timeseries",
         [('sum by (provider, model, outcome) (rate(undying_model_calls_total{outcome!="ok"}[5m]))',
           "{{model}} {{outcome}}")], "ops"),
        ("Failed model calls per second, by the failure's kind", "timeseries",
         [("sum by (provider, model, kind) (rate(undying_model_errors_total[5m]))",
           "{{model}} {{kind}}")], "ops"),
        ("Model error ratio", "stat",
         [('sum(rate(undying_model_calls_total{outcome!="ok"}[5m])) / '
           "clamp_min(sum(rate(undying_model_calls_total[5m])), 1e-9)", "errors")], "percentunit"),
        ("Provider 429s per second", "timeseries",
         [("sum by (provider, model) (rate(undying_model_rate_limited_total[5m]))",
           "{{provider}}:{{model}}")], "ops"),
        ("Retried attempts per second, by kind", "timeseries",
         [("sum by (kind) (rate(undying_model_retries_total[5m]))", "{{kind}}")], "ops"),
        ("Tokens per second", "timeseries",
         [("sum by (model, direction) (rate(undying_model_tokens_total[5m]))",
           "{{model}} {{direction}}")], "short"),
        ("Cost per hour (USD)", "timeseries",
         [("sum by (provider, model) (rate(undying_model_cost_usd_total[1h])) * 3600",
           "{{provider}}:{{model}}")], "currencyUSD"),
        ("Tool calls per second, by outcome", "timeseries",
         [("sum by (tool, outcome) (rate(undying_tool_calls_total[5m]))",
           "{{tool}} {{outcome}}")], "ops"),
        ("Tool call latency", "timeseries", _p50_99("undying_tool_call_seconds", by="tool"), "s"),
        ("Tool errors per second", "timeseries",
         [('sum by (tool) (rate(undying_tool_calls_total{outcome=~"error|invalid_arguments|'
           'not_installed"}[5m]))', "{{tool}}")], "ops"),
        ("Tool calls in doubt (1 h)", "stat",
         [("sum(increase(undying_tool_calls_in_doubt_total[1h]))", "in doubt")], "short"),
    ]),
    "persistence": ("undying: persistence", "Checkpoint commits and Redis health.", [
        ("Commit latency", "timeseries", _p50_99("undying_commit_seconds"), "s"),
        ("Commits per second", "timeseries",
         [("sum(rate(undying_commit_seconds_count[1m]))", "commits")], "ops"),
        ("Checkpoint record size", "timeseries",
         _p50_99("undying_checkpoint_bytes", by="kind"), "bytes"),
        ("Checkpoint bytes written per second", "timeseries",
         [("sum(rate(undying_checkpoint_bytes_written_total[5m]))", "bytes/s")], "Bps"),
        ("Snapshots (compactions) per second", "timeseries",
         [("sum(rate(undying_snapshots_total[5m]))", "snapshots")], "ops"),
        ("Fenced commits (1 h)", "stat",
         [("sum(increase(undying_fenced_commits_total[1h]))", "refused")], "short"),
        ("Redis up", "stat", [("min(undying_redis_up)", "up")], "short"),
        ("Redis round trip (PING from the exporter)", "timeseries",
         [("max(undying_redis_ping_seconds)", "ping")], "s"),
        ("Redis memory", "timeseries",
         [("max(undying_redis_used_memory_bytes)", "used")], "bytes"),
        ("Redis keys and clients", "timeseries",
         [("max(undying_redis_keys)", "keys"),
          ("max(undying_redis_connected_clients)", "clients")], "short"),
        ("Redis commands per second", "timeseries",
         [("sum(rate(undying_redis_commands_processed_total[1m]))", "commands")], "ops"),
        ("Redis AOF last write ok", "stat", [("min(undying_redis_aof_last_write_ok)", "ok")],
         "short"),
        ("Exporter read time", "timeseries",
         [("max(undying_exporter_scrape_seconds)", "scrape")], "s"),
    ]),
    "delegation": ("undying: delegation", "Sub-agents in flight, depth and fan-out.", [
        ("Sub-agents in flight, by depth", "timeseries",
         [("sum by (depth) (undying_subagents_in_flight)", "depth {{depth}}")], "short"),
        ("Sub-agents in flight", "stat", [("sum(undying_subagents_in_flight)", "in flight")],
         "short"),
        ("Deepest sub-agent in flight", "stat", [("max(undying_delegation_depth_max)", "depth")],
         "short"),
        ("Sub-agents spawned per second", "timeseries",
         [("sum(rate(undying_spawns_total[1m]))", "spawns")], "ops"),
        ("Fan-out (sub-agents per delegating step)", "timeseries",
         _p50_99("undying_delegation_fanout", window="15m"), "short"),
        ("Sub-agent results applied per second", "timeseries",
         [('sum(rate(undying_steps_total{kind="child_result"}[1m]))', "results")], "ops"),
    ]),
}


def dashboard(uid: str, title: str, description: str, panels: list[Panel]) -> dict[str, Any]:
    out = []
    x = y = 0
    for i, (ptitle, kind, targets, unit) in enumerate(panels):
        w, h = (6, 4) if kind == "stat" else (12, 8)
        if x + w > 24:
            x, y = 0, y + 8
        out.append({
            "id": i + 1, "title": ptitle, "type": kind, "datasource": DS,
            "gridPos": {"x": x, "y": y, "w": w, "h": h},
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "options": {} if kind == "timeseries" else {"reduceOptions": {"calcs": ["lastNotNull"]}},
            "targets": [{"refId": chr(65 + j), "datasource": DS, "expr": expr,
                         "legendFormat": legend} for j, (expr, legend) in enumerate(targets)],
        })
        x += w
    return {
        "uid": f"undying-{uid}", "title": title, "description": description,
        "tags": ["undying"], "timezone": "browser", "schemaVersion": 38, "version": 1,
        "editable": True, "refresh": "30s", "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": [{"name": "datasource", "type": "datasource",
                                 "query": "prometheus", "label": "Prometheus"}]},
        "panels": out,
    }


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for uid, (title, description, panels) in DASHBOARDS.items():
        path = OUT / f"{uid}.json"
        path.write_text(json.dumps(dashboard(uid, title, description, panels), indent=2) + "\n")
        print(f"wrote {path.relative_to(HERE)} ({len(panels)} panels)")


if __name__ == "__main__":
    main()
