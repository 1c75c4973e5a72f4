"""What dashboards/ ships, checked without a Prometheus: every panel and alert reads only
metrics the exporter exposes, the files parse, the dashboards are what the builder writes,
and (where promtool is installed) the rules and configs pass `promtool check`.

tests/integration/test_prometheus.py runs every query against a real Prometheus."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import yaml

from undying.dashboards import (
    ALERTS,
    DASHBOARDS,
    PROMETHEUS,
    alert_rules,
    metric_names,
    panel_queries,
)
from undying.dashboards._build import DASHBOARDS as SPEC
from undying.dashboards._build import dashboard
from undying.persistence.metrics import CATALOG

BOARDS = {"overview", "models-tools", "persistence", "delegation"}


def test_the_four_dashboards_are_what_the_builder_writes() -> None:
    assert {p.stem for p in DASHBOARDS.glob("*.json")} == BOARDS
    for uid, (title, description, panels) in SPEC.items():
        on_disk = json.loads((DASHBOARDS / f"{uid}.json").read_text())
        assert on_disk == dashboard(uid, title, description, panels), \
            f"{uid}.json is stale: run python -m undying.dashboards._build"


def test_no_panel_or_alert_reads_a_metric_the_exporter_does_not_expose() -> None:
    queries = panel_queries()
    assert len(queries) >= 40
    for board, title, expr in queries:
        names = metric_names(expr)
        assert names, f"{board} / {title}: no undying metric in {expr!r}"
        assert names <= set(CATALOG), f"{board} / {title}: {sorted(names - set(CATALOG))}"
    for name, expr in alert_rules():
        names = metric_names(expr)
        assert names and names <= set(CATALOG), f"alert {name}: {expr!r}"


def test_every_exposed_metric_is_shown_somewhere() -> None:
    used: set[str] = set()
    for _, _, expr in panel_queries():
        used |= metric_names(expr)
    assert set(CATALOG) - used == set()


def test_alerts_cover_what_the_issue_asks_for() -> None:
    names = {n for n, _ in alert_rules()}
    assert {"UndyingCrashLoopingRuns", "UndyingRunsStuck", "UndyingCommitLatencyHigh",
            "UndyingFencedCommits", "UndyingApprovalsWaitingTooLong",
            "UndyingProvider429Storm"} <= names
    for name, expr in alert_rules():
        assert split_threshold(expr) is not None, f"{name}: not '<query> > <number>'"


def split_threshold(expr: str) -> tuple[str, str] | None:
    """``<query> (>|<) <number>`` -> (query, threshold)."""
    import re

    m = re.fullmatch(r"(?s)(.*\S)\s+[<>]=?\s+([0-9.e+-]+)\s*", expr)
    return (m.group(1), m.group(2)) if m else None


def test_prometheus_and_grafana_files_parse() -> None:
    for path in [*PROMETHEUS.glob("*.yml"), *(DASHBOARDS.parent / "provisioning").rglob("*.yml")]:
        assert yaml.safe_load(path.read_text()), path
    local = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    assert local["rule_files"] == ["alerts.yml"]
    assert local["scrape_configs"][0]["job_name"] == "undying"


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")
def test_promtool_checks_rules_and_configs() -> None:
    out = subprocess.run(["promtool", "check", "rules", str(ALERTS)], capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    out = subprocess.run(["promtool", "check", "config", str(PROMETHEUS / "prometheus.yml")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
