"""A short seeded chaos run (bench/chaos.py) must keep every invariant.

Runs the chaos tool as a subprocess: it starts its own redis-server and its own
3-node `ray.cluster_utils.Cluster` with a pool of 2 hosts and an executor per node,
so it shares no Ray with the other tests (this process never attaches to it), and
everything it started is stopped by pid when it exits. Seed 21 schedules one fault of
each kind: a host SIGKILLed while it holds a run, an executor SIGKILLed, a worker node
removed hard (and one added back), the supervisor SIGKILLed, redis-server SIGKILLed
and restarted. ~45 s on 2 cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.chaos import KINDS, make_schedule

pytestmark = [pytest.mark.ray, pytest.mark.multinode]

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(150)
def test_chaos_smoke_keeps_invariants(tmp_path: Path) -> None:
    out = tmp_path / "chaos.json"
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_AUTH_MODE": "disabled"}
    cmd = [sys.executable, "-m", "bench.chaos", "--seed", "21", "--runs", "4", "--duration", "20",
           "--hosts-per-node", "2", "--drain-timeout", "30", "--json", str(out)]
    t = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=140)
    wall = time.monotonic() - t
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip() and not ln.startswith("    [")]
    print("\n".join(lines[-60:]))
    assert out.exists(), f"no report (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
    report = json.loads(out.read_text())

    assert report["steps_lost"] == 0
    assert report["side_effects_duplicated"] == 0, report["bad_runs"]
    assert report["zombie_commits_accepted"] == 0
    assert report["runs_failed"] == 0, (report["bad_runs"], report.get("supervisor_log"))
    assert report["runs_finished"] == report["runs_started"] > 0
    assert report["hit_runs_never_recovered"] == 0
    assert report["invariants_ok"] is True
    assert proc.returncode == 0

    # the seeded schedule holds every kind of fault, and they were carried out
    assert {f["kind"] for f in report["schedule"]} == set(KINDS)
    assert report["redis_restarts"] >= 1
    assert report["supervisor_kills"] >= 1
    assert report["node_removals"] >= 1
    assert report["executor_kills"] >= 1
    # a host is caught holding a run (hosts pause after each commit): the run restarts
    assert report["host_kills_that_hit_a_run"] >= 1, report["faults"]
    assert report["restart_decided_host_kill"]["n"] >= 1
    assert not [f for f in report["faults"] if "error" in f], report["faults"]
    assert wall < 90, f"chaos smoke took {wall:.0f}s"


def test_chaos_schedule_is_seeded() -> None:
    a, b = make_schedule(21, 20, 6.0), make_schedule(21, 20, 6.0)
    assert a == b
    assert make_schedule(22, 20, 6.0) != a
    long = make_schedule(1, 300, 6.0)
    assert {f.kind for f in long} == set(KINDS)
    assert {f.kind for f in a} == set(KINDS)  # the smoke's schedule: one of each
    assert all(0 < f.at < 300 for f in long)
    assert [f.at for f in long] == sorted(f.at for f in long)
