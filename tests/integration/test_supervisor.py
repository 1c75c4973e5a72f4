"""The supervisor on a real local Ray and redis-server: runs come back with nobody calling resume."""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration._faults import TASK, in_model_call, ledger_of
from undying import Settings, Undying
from undying.actors.research import agent, slow_agent
from undying.persistence import RedisServer
from undying.testing import MemoryStore, poison_agent, run_inline

pytestmark = pytest.mark.ray



@pytest.fixture(scope="module")
def sup_redis(tmp_root: Path) -> Iterator[RedisServer]:
    # one Redis per supervisor: a supervisor adopts every unfinished run it finds there
    server = RedisServer(tmp_root / f"redis-sup-{uuid.uuid4().hex[:6]}", appendfsync="always").start()
    yield server
    server.kill()


@pytest.fixture(scope="module")
def ud(ray_local: None, sup_redis: RedisServer) -> Iterator[Undying]:
    client = Undying(Settings(redis_url=sup_redis.url, namespace=f"sup-{uuid.uuid4().hex[:6]}"),
                     policy={"max_restarts": 3, "window_s": 60, "backoff_base_s": 0.2})
    client.supervisor()
    yield client
    import ray

    ray.kill(client.supervisor(), no_restart=True)


@pytest.fixture(scope="module")
def reference() -> tuple[str, dict[str, int]]:
    store = MemoryStore()
    state = run_inline(store, agent, TASK, run_id="ref")
    return state.result or "", {k.replace("ref:", ""): v for k, v in store.ledger("ref").items()}


def _pid(ud: Undying, run_id: str) -> int:
    info = ud.actor_info(run_id)
    assert info is not None
    return int(info["pid"])


def _next_commit_after(ud: Undying, run_id: str, step: int, timeout: float = 30) -> float:
    """Wall time (s) of the first commit after ``step``, by a later epoch."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for e in ud.history(run_id):
            if e.step > step and e.kind != "restart":
                return e.at_ms / 1000
        time.sleep(0.02)
    raise AssertionError(f"run {run_id}: no commit after step {step}")


def _check(ud: Undying, run_id: str, reference: tuple[str, dict[str, int]]) -> None:
    import ray

    try:
        res = ud.wait(run_id, timeout=60)
    except Exception:
        info = ray.get(ud.supervisor().info.remote(True), timeout=10)
        log = info.pop("log")
        print(info)
        print("\n".join(line[:400] for line in log[-30:]))
        print(ud.info(run_id))
        raise
    assert res.status == "finished", res.error
    assert res.answer == reference[0]
    assert ledger_of(ud, run_id) == reference[1], "every tool executed exactly once"
    steps = [e.step for e in ud.history(run_id) if e.kind != "restart"]
    assert steps == list(range(1, res.steps + 1)), "one writer per step, no step lost"


def test_sigkilled_run_resumes_by_itself(ud: Undying, reference: tuple[str, dict[str, int]]) -> None:
    h = ud.start(slow_agent(0.4), TASK)
    step = in_model_call(ud, h.run_id, 3)
    t_kill = time.time()
    os.kill(_pid(ud, h.run_id), signal.SIGKILL)
    recovered = _next_commit_after(ud, h.run_id, step) - t_kill
    print(f"\nrecovery after SIGKILL: {recovered:.3f}s to the next committed step")
    _check(ud, h.run_id, reference)
    assert any(e.kind == "restart" for e in h.history())


def test_supervisor_killed_while_runs_in_flight(ud: Undying,
                                                reference: tuple[str, dict[str, int]]) -> None:
    import ray

    runs = [ud.start(slow_agent(0.3), TASK) for _ in range(3)]
    in_model_call(ud, runs[0].run_id, 2)
    pid = _supervisor_pid(ud)
    os.kill(pid, signal.SIGKILL)
    # kill one run too while the supervisor is down: the new supervisor must adopt and restart it
    os.kill(_pid(ud, runs[1].run_id), signal.SIGKILL)
    for h in runs:
        _check(ud, h.run_id, reference)
    boots = ray.get(ud.supervisor().info.remote())
    assert _supervisor_pid(ud) != pid, "Ray restarted the supervisor"
    assert boots["adopted"] >= 1


def _supervisor_pid(ud: Undying) -> int:
    import ray

    return int(ray.get(ud.supervisor().info.remote(), timeout=30)["pid"])


def test_zombie_is_fenced(ud: Undying, reference: tuple[str, dict[str, int]]) -> None:
    h = ud.start(slow_agent(0.4), TASK)
    in_model_call(ud, h.run_id, 3)
    old = ud.actor_info(h.run_id)
    assert old is not None
    os.kill(old["pid"], signal.SIGSTOP)
    try:
        deadline = time.monotonic() + 30
        while ud.info(h.run_id).epoch == old["epoch"]:  # the supervisor takes a new epoch
            assert time.monotonic() < deadline, "the paused run was never restarted"
            time.sleep(0.1)
    finally:
        os.kill(old["pid"], signal.SIGCONT)
    _check(ud, h.run_id, reference)
    deadline = time.monotonic() + 15
    while _alive(old["pid"]):  # the zombie's next commit or lease renewal is refused: it exits
        assert time.monotonic() < deadline, "the zombie did not stop"
        time.sleep(0.1)
    epochs = {e.step: e.epoch for e in h.history() if e.kind != "restart"}
    assert len(epochs) == ud.info(h.run_id).step


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_crash_loop_ends_failed_and_spares_others(ud: Undying,
                                                  reference: tuple[str, dict[str, int]]) -> None:
    good = ud.start(slow_agent(0.2), TASK)
    bad = ud.start(poison_agent, "crash every time")
    res = ud.wait(bad.run_id, timeout=120)
    assert res.status == "failed"
    assert "crashes in 60s" in (res.error or ""), res.error
    assert sum(1 for e in bad.history() if e.kind == "restart") == 3
    assert bad.history()[-1].kind == "failed"
    _check(ud, good.run_id, reference)


def test_sigterm_drain_restarts_at_once(ud: Undying, reference: tuple[str, dict[str, int]]) -> None:
    h = ud.start(slow_agent(0.4), TASK)
    step = in_model_call(ud, h.run_id, 3)
    t = time.time()
    os.kill(_pid(ud, h.run_id), signal.SIGTERM)
    recovered = _next_commit_after(ud, h.run_id, step) - t
    print(f"\nrecovery after SIGTERM drain: {recovered:.3f}s (lease TTL 3s)")
    assert recovered < 2.5, "the drained run waited for its lease to expire"
    _check(ud, h.run_id, reference)


def test_redis_restarted_while_runs_in_flight(ud: Undying, sup_redis: RedisServer,
                                              reference: tuple[str, dict[str, int]]) -> None:
    runs = [ud.start(slow_agent(0.4), TASK) for _ in range(2)]
    in_model_call(ud, runs[0].run_id, 2)
    acked = {h.run_id: [e.step for e in ud.history(h.run_id)] for h in runs}
    sup_redis.kill()
    time.sleep(0.5)
    sup_redis.start()
    for h in runs:
        _check(ud, h.run_id, reference)
        got = [e.step for e in ud.history(h.run_id)]
        assert got[: len(acked[h.run_id])] == acked[h.run_id], "an acknowledged commit was lost"
