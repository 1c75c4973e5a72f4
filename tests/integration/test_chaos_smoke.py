"""A short seeded chaos run (bench/chaos.py) must keep every invariant.

Runs the chaos tool as a subprocess: it starts its own redis-server and its own
3-node `ray.cluster_utils.Cluster`, so it shares no Ray with the other tests
(this process never attaches to it), and everything it started is stopped by
pid when it exits. ~35 s on 2 cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.multinode]

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(120)
def test_chaos_smoke_keeps_invariants(tmp_path: Path) -> None:
    out = tmp_path / "chaos.json"
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_AUTH_MODE": "disabled"}
    cmd = [sys.executable, "-m", "bench.chaos", "--seed", "21", "--runs", "4", "--duration", "20",
           "--drain-timeout", "30", "--json", str(out)]
    t = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=110)
    wall = time.monotonic() - t
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip() and not ln.startswith("    [")]
    print("\n".join(lines[-45:]))
    assert out.exists(), f"no report (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
    report = json.loads(out.read_text())

    assert report["steps_lost"] == 0
    assert report["side_effects_duplicated"] == 0
    assert report["zombie_commits_accepted"] == 0
    assert report["runs_failed"] == 0, report["bad_runs"]
    assert report["runs_finished"] == report["runs_started"] > 0
    assert report["invariants_ok"] is True
    assert proc.returncode == 0

    # the seeded schedule holds every kind of fault, and they were carried out
    assert {f["kind"] for f in report["schedule"]} == {
        "actor_kill", "node_remove", "supervisor_kill", "redis_restart"}
    assert report["redis_restarts"] >= 1
    assert report["supervisor_kills"] >= 1
    assert report["node_removals"] >= 1
    assert report["actor_kills"] + report["faults_skipped"] >= 1
    assert wall < 90, f"chaos smoke took {wall:.0f}s"


def test_chaos_schedule_is_seeded() -> None:
    from bench.chaos import make_schedule

    a, b = make_schedule(21, 20, 6.0), make_schedule(21, 20, 6.0)
    assert a == b
    assert make_schedule(22, 20, 6.0) != a
    long = make_schedule(1, 300, 6.0)
    assert {f.kind for f in long} == {"actor_kill", "node_remove", "supervisor_kill", "redis_restart"}
    assert all(0 < f.at < 300 for f in long)
    assert [f.at for f in long] == sorted(f.at for f in long)
