"""Grafana dashboards, Prometheus scrape configs and alert rules, and the exporter they read.

    grafana/dashboards/*.json        overview, models-tools, persistence, delegation
    grafana/provisioning/            datasource and dashboard provisioning for Grafana
    prometheus/prometheus.yml        scrape config, local; prometheus-ray-cluster.yml: a Ray cluster
    prometheus/alerts.yml            alert rules
    exporter.py                      `undying exporter`: one scrape target for the cluster
"""

from __future__ import annotations

import json
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
DASHBOARDS = HERE / "grafana" / "dashboards"
PROMETHEUS = HERE / "prometheus"
ALERTS = PROMETHEUS / "alerts.yml"

__all__ = ["ALERTS", "DASHBOARDS", "PROMETHEUS", "alert_rules", "metric_names", "panel_queries"]

_METRIC = re.compile(r"\b(undying_[a-z0-9_]+)\b")


def panel_queries() -> list[tuple[str, str, str]]:
    """Every query of every panel: (dashboard file, panel title, PromQL)."""
    out = []
    for path in sorted(DASHBOARDS.glob("*.json")):
        board = json.loads(path.read_text())
        for panel in board["panels"]:
            for target in panel.get("targets", []):
                out.append((path.name, panel["title"], target["expr"]))
    return out


def alert_rules() -> list[tuple[str, str]]:
    """Every alert rule: (name, PromQL expression)."""
    import yaml  # a test extra; the exporter does not need it

    doc = yaml.safe_load(ALERTS.read_text())
    return [(r["alert"], str(r["expr"])) for g in doc["groups"] for r in g["rules"] if "alert" in r]


def metric_names(expr: str) -> set[str]:
    """The undying metric names a PromQL expression reads (``_bucket`` / ``_count`` / ``_sum``
    of a histogram named as the histogram)."""
    names = set()
    for name in _METRIC.findall(expr):
        for suffix in ("_bucket", "_count", "_sum"):
            if name.endswith(suffix):
                name = name[: -len(suffix)]
                break
        names.add(name)
    return names
