"""The supervisor on a real local Ray and redis-server: runs come back with nobody calling resume.

Hosts in this module pause 0.3 s after each commit, so a test can catch a host holding a
run (between a commit and its dispatches) and kill, pause or drain it there.
"""

from __future__ import annotations

import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration._faults import (
    TASK,
    calls_of,
    executor_pid,
    in_model_call,
    kill,
    teardown,
    while_active,
)
from tests.integration.test_ray_runs import Reference, reference_of
from undying import Settings, Undying
from undying.actors._engine import create_run_from
from undying.actors.research import agent, slow_agent
from undying.persistence import RedisServer
from undying.testing import poison_agent

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def sup_redis(tmp_root: Path) -> Iterator[RedisServer]:
    # one Redis per supervisor: a supervisor restarts every run it finds there
    server = RedisServer(tmp_root / f"redis-sup-{uuid.uuid4().hex[:6]}", appendfsync="always").start()
    yield server
    server.kill()


@pytest.fixture(scope="module")
def ud(ray_local: None, sup_redis: RedisServer) -> Iterator[Undying]:
    client = Undying(Settings(redis_url=sup_redis.url, namespace=f"sup-{uuid.uuid4().hex[:6]}"),
                     policy={"max_restarts": 3, "window_s": 60, "backoff_base_s": 0.2},
                     actor_options={"hosts_per_node": 2, "pause_after_commit_s": 0.3})
    client.supervisor()
    yield client
    teardown(client)


@pytest.fixture(scope="module")
def reference() -> Reference:
    return reference_of(agent, TASK)


def _next_commit_after(ud: Undying, run_id: str, step: int, timeout: float = 30) -> float:
    """Wall time (s) of the first commit after ``step``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for e in ud.history(run_id):
            if e.step > step and e.kind != "restart":
                return e.at_ms / 1000
        time.sleep(0.02)
    raise AssertionError(f"run {run_id}: no commit after step {step}")


def _check(ud: Undying, run_id: str, reference: Reference, exact: bool = True) -> None:
    import ray

    try:
        res = ud.wait(run_id, timeout=90)
    except Exception:
        import subprocess

        info = ray.get(ud.supervisor().info.remote(True), timeout=10)
        print(subprocess.run(["py-spy", "dump", "--pid", str(info["pid"])], capture_output=True,
                             text=True).stdout[-6000:])
        print("\n".join(line[:400] for line in info.pop("log")[-30:]), info, ud.info(run_id))
        raise
    assert res.status == "finished", res.error
    assert res.answer == reference[0]
    calls = calls_of(ud, run_id)
    assert set(calls) == set(reference[1]), "every tool call of the reference, no other"
    if exact:
        assert calls == reference[1], "every tool executed exactly once"
    steps = [e.step for e in ud.history(run_id) if e.kind != "restart"]
    assert steps == list(range(1, res.steps + 1)), "one writer per step, no step lost"


def test_sigkilled_host_its_run_resumes_by_itself(ud: Undying, reference: Reference) -> None:
    h = ud.start(agent, TASK)
    victim = while_active(ud, h.run_id)
    step = ud.info(h.run_id).step
    t_kill = time.time()
    kill(victim["pid"])
    recovered = _next_commit_after(ud, h.run_id, step) - t_kill
    print(f"\nrecovery after a host SIGKILL: {recovered:.3f}s to the next committed step")
    _check(ud, h.run_id, reference)
    assert any(e.kind == "restart" for e in h.history())


def test_executor_sigkilled_every_run_goes_on(ud: Undying, reference: Reference) -> None:
    runs = [ud.start(slow_agent(0.5), TASK) for _ in range(3)]
    in_model_call(ud, runs[0].run_id, 2)
    kill(executor_pid(ud))
    for i, h in enumerate(runs):
        # a call of the other runs may have been a tool in flight: idempotent, it may run
        # again; the run caught in a model call has every tool exactly once
        _check(ud, h.run_id, reference, exact=(i == 0))
    assert any(e.kind == "effect_lost" for e in runs[0].history())


def test_supervisor_killed_while_runs_in_flight(ud: Undying, reference: Reference) -> None:
    import ray

    runs = [ud.start(agent, TASK) for _ in range(3)]
    pid = _supervisor_pid(ud)
    kill(pid)
    # kill a host holding a run while the supervisor is down: the new one must notice
    kill(while_active(ud, runs[1].run_id)["pid"])
    for h in runs:
        _check(ud, h.run_id, reference)
    assert _supervisor_pid(ud) != pid, "Ray restarted the supervisor"
    assert ray.get(ud.supervisor().info.remote())["restarts"] >= 1


def _supervisor_pid(ud: Undying) -> int:
    import ray

    return int(ray.get(ud.supervisor().info.remote(), timeout=30)["pid"])


def test_zombie_host_is_fenced(ud: Undying, reference: Reference) -> None:
    import ray

    h = ud.start(agent, TASK)
    old = while_active(ud, h.run_id)
    kill(old["pid"], signal.SIGSTOP)
    try:
        deadline = time.monotonic() + 30
        while ud.info(h.run_id).epoch == old["epoch"]:  # the supervisor queues it again
            assert time.monotonic() < deadline, "the paused run was never restarted"
            time.sleep(0.05)
    finally:
        kill(old["pid"], signal.SIGCONT)
    _check(ud, h.run_id, reference)
    epochs = {e.step: e.epoch for e in h.history() if e.kind != "restart"}
    assert len(epochs) == ud.info(h.run_id).step
    zombie = ray.get_actor(old["host"].split("#")[0], namespace=ud.settings.namespace)
    deadline = time.monotonic() + 15
    while ray.get(zombie.info.remote(), timeout=30)["fenced"] < 1:  # its next commit refused
        assert time.monotonic() < deadline, "the zombie's commit was not refused"
        time.sleep(0.1)


def test_a_run_that_crashes_every_host_ends_failed_and_spares_others(
        ud: Undying, reference: Reference) -> None:
    good = ud.start(agent, TASK)
    # a poison checkpoint: it names an agent version no node has, so every activation fails
    bad = create_run_from(ud.store, agent.context().model_copy(update={"agent_version": "999"}),
                          "crash every time", run_id=f"poison-{uuid.uuid4().hex[:6]}")
    res = ud.wait(bad, timeout=120)
    assert res.status == "failed"
    assert "crashes in 60s" in (res.error or "") and "version 999" in (res.error or ""), res.error
    assert sum(1 for e in ud.history(bad) if e.kind == "restart") == 3
    _check(ud, good.run_id, reference)


def test_a_tool_that_kills_its_executor_fails_its_run_only(ud: Undying,
                                                           reference: Reference) -> None:
    good = ud.start(slow_agent(0.2), TASK)
    bad = ud.start(poison_agent, "crash every time")
    res = ud.wait(bad.run_id, timeout=120)
    assert res.status == "failed"
    assert "was lost 4 times" in (res.error or ""), res.error
    assert sum(1 for e in bad.history() if e.kind == "effect_lost") == 4  # 3 redone, 1 fails it
    _check(ud, good.run_id, reference, exact=False)


def test_sigterm_drain_restarts_at_once(ud: Undying, reference: Reference) -> None:
    h = ud.start(agent, TASK)
    victim = while_active(ud, h.run_id)
    step = ud.info(h.run_id).step
    t = time.time()
    kill(victim["pid"], signal.SIGTERM)
    recovered = _next_commit_after(ud, h.run_id, step) - t
    print(f"\nrecovery after SIGTERM drain: {recovered:.3f}s (lease TTL 3s)")
    assert recovered < 2.5, "the drained run waited for its lease to expire"
    _check(ud, h.run_id, reference)


def test_redis_restarted_while_runs_in_flight(ud: Undying, sup_redis: RedisServer,
                                              reference: Reference) -> None:
    runs = [ud.start(slow_agent(0.4), TASK) for _ in range(2)]
    in_model_call(ud, runs[0].run_id, 2)
    acked = {h.run_id: [e.step for e in ud.history(h.run_id)] for h in runs}
    sup_redis.kill()
    time.sleep(0.5)
    sup_redis.start()
    for h in runs:
        _check(ud, h.run_id, reference, exact=False)
        got = [e.step for e in ud.history(h.run_id) if e.kind != "restart"]
        assert got[: len(acked[h.run_id])] == acked[h.run_id], "an acknowledged commit was lost"


