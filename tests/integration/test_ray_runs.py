"""Runs on a real local Ray and a real redis-server, with no supervisor: SIGKILL an executor
or a host, restart Redis, resume by hand (as `undying resume` does)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
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
from undying import Settings, Undying
from undying.actors.research import agent, slow_agent, slow_lead
from undying.persistence import RedisServer
from undying.testing import MemoryStore, run_inline

pytestmark = pytest.mark.ray

Reference = tuple[str, dict[str, int]]


def reference_of(a: object, task: str) -> Reference:
    """The answer and the calls of a run with no fault."""
    store = MemoryStore()
    state = run_inline(store, a, task, run_id="ref")  # type: ignore[arg-type]
    assert state.status == "finished"
    by_key = {e.key: json.dumps([e.tool, e.arguments], sort_keys=True)
              for e in state.journal.values()}
    return state.result or "", {by_key[k.split("|", 1)[1]]: v
                                for k, v in store.ledger("ref").items()}


@pytest.fixture(scope="module")
def reference() -> Reference:
    return reference_of(agent, TASK)


@pytest.fixture(scope="module")
def rr_redis(tmp_root: Path) -> Iterator[RedisServer]:
    # the pool of this module polls this server: it is the module's own
    server = RedisServer(tmp_root / f"redis-rr-{uuid.uuid4().hex[:6]}", appendfsync="always").start()
    yield server
    server.kill()


@pytest.fixture(scope="module")
def ud(ray_local: None, rr_redis: RedisServer) -> Iterator[Undying]:
    # no supervisor: these tests resume by hand, as `undying resume` does; hosts pause
    # 0.3 s after each commit, so a test can kill one between a commit and its dispatches
    client = Undying(Settings(redis_url=rr_redis.url, namespace=f"rr-{uuid.uuid4().hex[:6]}"),
                     supervise=False,
                     actor_options={"hosts_per_node": 2, "pause_after_commit_s": 0.3})
    client.ensure_cluster()
    yield client
    teardown(client)


def _check(ud: Undying, run_id: str, ref: Reference, timeout: float = 90) -> None:
    res = ud.wait(run_id, timeout=timeout)
    assert res.status == "finished", res.error
    assert res.answer == ref[0]
    assert calls_of(ud, run_id) == ref[1], "every tool executed exactly once"
    steps = [e.step for e in ud.history(run_id) if e.kind != "restart"]
    assert steps == list(range(1, res.steps + 1)), "one writer per step, no step lost"


def test_executor_sigkilled_twice_the_run_goes_on_by_itself(ud: Undying, reference: Reference) -> None:
    h = ud.start(slow_agent(0.6), TASK)
    for min_step in (2, 6):
        in_model_call(ud, h.run_id, min_step)
        kill(executor_pid(ud))
        # Ray restarts the executor; its new incarnation reports the lost call
    _check(ud, h.run_id, reference)
    lost = [e for e in h.history() if e.kind == "effect_lost"]
    assert len(lost) == 2, [e.kind for e in h.history()]


def test_host_sigkilled_between_commit_and_dispatch_then_resumed(ud: Undying,
                                                                 reference: Reference) -> None:
    h = ud.start(agent, TASK)
    victim = while_active(ud, h.run_id, min_step=1)
    kill(victim["pid"])  # paused after a commit: its calls were never dispatched
    ud.resume(h.run_id)  # waits out the dead host's lease, then queues the run
    _check(ud, h.run_id, reference)
    epochs = {e.epoch for e in h.history()}
    assert len(epochs) >= 2


def test_resume_from_cli(ud: Undying, rr_redis: RedisServer, reference: Reference) -> None:
    import ray

    h = ud.start(agent, TASK)
    kill(while_active(ud, h.run_id)["pid"])
    env = {**os.environ, "UNDYING_REDIS_URL": rr_redis.url,
           "UNDYING_RAY_ADDRESS": ray.get_runtime_context().gcs_address,
           "UNDYING_NAMESPACE": ud.settings.namespace}
    out = subprocess.run([sys.executable, "-m", "undying.cli", "resume", h.run_id, "--no-wait"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "resumed from step" in out.stdout
    _check(ud, h.run_id, reference)

    status = subprocess.run([sys.executable, "-m", "undying.cli", "status", h.run_id, "--json"],
                            env=env, capture_output=True, text=True, timeout=60)
    assert json.loads(status.stdout)["status"] == "finished"
    hist = subprocess.run([sys.executable, "-m", "undying.cli", "history", h.run_id],
                          env=env, capture_output=True, text=True, timeout=60)
    assert hist.returncode == 0 and "model_reply" in hist.stdout
    missing = subprocess.run([sys.executable, "-m", "undying.cli", "history", "no-such-run"],
                             env=env, capture_output=True, text=True, timeout=60)
    assert missing.returncode == 1
    assert missing.stderr.strip().count("\n") == 0 and "no-such-run" in missing.stderr


def test_a_lead_and_its_sub_agents_run_on_ray(ud: Undying) -> None:
    task = "How do fencing tokens stop zombie writers, and what does appendfsync always guarantee?"
    lead = slow_lead(0.05)
    ref = run_inline(MemoryStore(), lead, task, run_id="ref")
    h = ud.start(lead, task)
    res = h.result(timeout=120)
    assert res.status == "finished", res.error
    assert res.answer == ref.result
    tree = ud.tree(h.run_id)
    assert [d for d, _ in tree] == [0, 1, 1]
    assert all(i.status == "finished" for _, i in tree)
    deadline = time.monotonic() + 10  # the last host may still be relaying the final step
    while any(ud.actor_info(i.run_id) is not None for _, i in tree):
        assert time.monotonic() < deadline, "a run kept its host after it ended"
        time.sleep(0.05)


def test_redis_killed_and_restarted_between_steps(ud: Undying, rr_redis: RedisServer,
                                                  reference: Reference) -> None:
    h = ud.start(slow_agent(0.5), TASK)
    in_model_call(ud, h.run_id, 3)
    acked_events = [e.step for e in ud.history(h.run_id)]
    rr_redis.kill()  # SIGKILL; AOF with appendfsync always
    time.sleep(1.0)  # the run's next commit now waits for Redis
    rr_redis.start()
    res = h.result(timeout=90)
    assert res.status == "finished", res.error
    events = [e.step for e in ud.history(h.run_id) if e.kind != "restart"]
    assert events[: len(acked_events)] == acked_events, "nothing acknowledged was lost"
    assert events == list(range(1, res.steps + 1))
    assert res.answer == reference[0]
