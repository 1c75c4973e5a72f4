"""A real Prometheus scrapes the exporter (started by the supervisor) during a real batch on Ray
with injected faults: a provider that answers 429 and 500, and a host SIGKILLed mid-run. Then
every panel query and every alert expression is evaluated through Prometheus's HTTP API and
must return data; `promtool check rules` passes on the rules we ship and `promtool check
metrics` on what the exporter exposes.

Prometheus is Debian's `prometheus` package (.ci/run installs it); without it this test skips.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration._faults import kill, teardown, while_active
from tests.unit.test_dashboards import split_threshold
from undying import Settings, Undying
from undying.actors import Agent, ModelSpec
from undying.actors.provider_server import ProviderServer
from undying.actors.research import LEAD_INSTRUCTIONS, agent, lead
from undying.dashboards import ALERTS, alert_rules, panel_queries
from undying.persistence import TERMINAL, RedisServer, free_port

pytestmark = [pytest.mark.ray, pytest.mark.skipif(
    shutil.which("prometheus") is None or shutil.which("promtool") is None,
    reason="Debian's prometheus package is not installed (.ci/run installs it)")]

QUESTIONS = [
    "What is a fencing token, and what does appendfsync always guarantee?",
    "What is full jitter, and how does a token bucket limit requests?",
    "What is a transactional outbox, and what are idempotency keys?",
    "What do Ray actors offer agents, and what is an OTP supervision tree?",
    "How do write-ahead logs work, and what is checkpointing?",
]
PRICES = {"price_in_per_mtok": 0.15, "price_out_per_mtok": 0.6}
FAST = {"backoff_base_s": 0.02, "backoff_cap_s": 0.1, "timeout_s": 5.0}


def _get(url: str, timeout: float = 10) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 (loopback only)
        return r.read()


def _query(base: str, expr: str) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(_get(f"{base}/api/v1/query?" + urllib.parse.urlencode(
        {"query": expr})))
    return out


@pytest.fixture(scope="module")
def prom_redis(tmp_root: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_root / f"redis-prom-{uuid.uuid4().hex[:6]}").start()
    yield server
    server.kill()


@pytest.fixture(scope="module")
def provider() -> Iterator[ProviderServer]:
    # sub-agents' model: every third request a 429 (retried); the leads' model: the very
    # first request a 500 (its run has one attempt: it fails)
    faults = [{"kind": "429", "every": 3, "retry_after": 0.05, "model": "research"},
              {"kind": "500", "first": 1, "model": "research-lead"}]
    with ProviderServer(faults=faults) as server:
        yield server


@pytest.fixture(scope="module")
def exporter_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def ud(ray_local: None, prom_redis: RedisServer, exporter_port: int) -> Iterator[Undying]:
    client = Undying(Settings(redis_url=prom_redis.url, namespace=f"prom-{uuid.uuid4().hex[:6]}"),
                     policy={"max_restarts": 5, "window_s": 60, "backoff_base_s": 0.1},
                     actor_options={"hosts_per_node": 2, "pause_after_commit_s": 0.05,
                                    "exporter_port": exporter_port,
                                    "exporter_addr": "127.0.0.1"})
    client.supervisor()
    yield client
    teardown(client)


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory, exporter_port: int) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("prometheus")
    shutil.copy(ALERTS, folder / "alerts.yml")
    (folder / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "rule_files:\n  - alerts.yml\n"
        "scrape_configs:\n  - job_name: undying\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{exporter_port}']\n")
    port = free_port()
    log = (folder / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        ["prometheus", f"--config.file={folder / 'prometheus.yml'}",
         f"--web.listen-address=127.0.0.1:{port}", f"--storage.tsdb.path={folder / 'data'}"],
        stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                _get(f"{base}/-/ready", timeout=2)
                break
            except OSError:
                assert proc.poll() is None, (folder / "prometheus.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "prometheus did not start"
                time.sleep(0.2)
        yield base
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()


def _agents(base_url: str) -> tuple[Agent, Agent]:
    sub = ModelSpec(provider="openai", name="research", base_url=base_url + "/v1",
                    options={**FAST, "max_attempts": 4, **PRICES})
    lead_spec = ModelSpec(provider="openai", name="research-lead", base_url=base_url + "/v1",
                          options={**FAST, "max_attempts": 1, **PRICES})
    leader = Agent("research-lead", version="1", instructions=LEAD_INSTRUCTIONS, model=lead_spec,
                   memory=False, subagent=agent, budgets=lead.budgets, subagent_model=sub,
                   ref="undying.actors.research:lead")
    single = Agent("research", version="1", instructions=agent.instructions, model=sub,
                   tools=list(agent.tools.values()), budgets=agent.budgets,
                   ref="undying.actors.research:agent")
    return leader, single


def _wait_for_data(base: str, expr: str, timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        res = _query(base, expr)
        if res["status"] == "success" and res["data"]["result"]:
            return res
        if time.monotonic() > deadline:
            return res
        time.sleep(0.5)


def test_every_panel_and_alert_returns_data_from_a_real_batch(
        ud: Undying, provider: ProviderServer, prometheus: str, exporter_port: int) -> None:
    # the supervisor's exporter is up and Prometheus scrapes it
    assert _wait_for_data(prometheus, 'up{job="undying"} == 1')["data"]["result"], \
        "Prometheus never scraped the exporter"
    leader, single = _agents(provider.url)
    runs = [ud.start(leader, q) for q in QUESTIONS]
    runs += [ud.start(single, q) for q in QUESTIONS[:2]]
    # a fault: SIGKILL a host while it holds a run (the supervisor restarts that run)
    victim = while_active(ud, runs[1].run_id, timeout=60)
    kill(victim["pid"])
    for h in runs:
        ud.wait(h.run_id, timeout=120)
    statuses = [ud.info(h.run_id).status for h in runs]
    assert all(s in TERMINAL for s in statuses)
    assert statuses.count("finished") >= len(runs) - 2, statuses
    assert "failed" in statuses  # the lead whose first model call got a 500
    assert any(e.kind == "restart" for e in ud.history(runs[1].run_id))
    by_path = provider.stats()["by_path"]["/v1/chat/completions"]
    assert by_path.get("429", 0) >= 1 and by_path.get("500", 0) == 1

    time.sleep(3)  # the last flushes (1 s) and scrapes (1 s)
    missing = []
    for board, title, expr in panel_queries():
        res = _wait_for_data(prometheus, expr, timeout=10)
        if res["status"] != "success" or not res["data"]["result"]:
            missing.append(f"{board} / {title}: {expr} -> {res.get('error') or 'no data'}")
    for name, expr in alert_rules():
        split = split_threshold(expr)
        assert split is not None
        res = _wait_for_data(prometheus, split[0], timeout=10)
        if res["status"] != "success" or not res["data"]["result"]:
            missing.append(f"alert {name}: {split[0]} -> {res.get('error') or 'no data'}")
        full = _query(prometheus, expr)
        assert full["status"] == "success", (name, full)
    assert not missing, "\n".join(missing)

    # real values behind the panels, not only zeros
    def value(expr: str) -> float:
        return sum(float(r["value"][1]) for r in _query(prometheus, expr)["data"]["result"])

    assert value('sum(undying_model_rate_limited_total{model="research"})') >= 1
    assert value('sum(undying_model_errors_total{kind="http_500"})') == 1
    assert value("sum(undying_restarts_total)") >= 1
    assert value("sum(undying_recovery_seconds_count)") >= 1
    assert value("sum(undying_model_cost_usd_total)") > 0
    assert value('sum(undying_steps_total{kind="child_result"})') >= 4
    assert value("sum(undying_spawns_total)") >= 4

    rules = json.loads(_get(f"{prometheus}/api/v1/rules"))["data"]["groups"]
    loaded = {r["name"]: r for g in rules for r in g["rules"]}
    assert {n for n, _ in alert_rules()} <= set(loaded)
    assert all(r["health"] == "ok" for r in loaded.values()), loaded

    out = subprocess.run(["promtool", "check", "rules", str(ALERTS)], capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    text = _get(f"http://127.0.0.1:{exporter_port}/metrics").decode()
    out = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert 'run_id="' not in text and 'run="' not in text  # labels never name a run
