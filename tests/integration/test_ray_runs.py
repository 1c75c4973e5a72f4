"""Runs on a real local Ray and a real redis-server: SIGKILL the run actor, restart Redis."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.integration._faults import TASK, in_model_call, ledger_of
from undying import Settings, Undying
from undying.actors.research import agent, slow_agent
from undying.persistence import RedisServer, RedisStore
from undying.testing import MemoryStore, run_inline

pytestmark = pytest.mark.ray



@pytest.fixture(scope="module")
def reference() -> tuple[str, dict[str, int]]:
    """The answer and tool ledger of a run with no fault (ledger keys without the run id)."""
    store = MemoryStore()
    state = run_inline(store, agent, TASK, run_id="ref")
    assert state.status == "finished"
    return state.result or "", {k.replace("ref:", ""): v for k, v in store.ledger("ref").items()}


def _client(url: str) -> Undying:
    # no supervisor here: these tests resume by hand, as `undying resume` does
    return Undying(Settings(redis_url=url, namespace="undying-tests"), supervise=False)


def _kill_actor(ud: Undying, run_id: str) -> None:
    import ray

    info = ud.actor_info(run_id)
    assert info is not None, "the run has no live actor"
    os.kill(info["pid"], signal.SIGKILL)
    ref = ud._refs[run_id]
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(ref, timeout=30)


def test_sigkill_twice_then_resume(ray_local: None, redis_server: RedisServer,
                                   reference: tuple[str, dict[str, int]]) -> None:
    ud = _client(redis_server.url)
    h = ud.start(slow_agent(0.4), TASK)
    kill_steps = []
    for min_step in (2, 6):
        kill_steps.append(in_model_call(ud, h.run_id, min_step))
        _kill_actor(ud, h.run_id)
        ud.resume(h.run_id)
    res = h.result(timeout=60)
    answer, ledger = reference
    assert res.status == "finished", res.error
    assert res.answer == answer
    assert ledger_of(ud, h.run_id) == ledger, "every tool executed exactly once"
    events = h.history()
    assert [e.step for e in events] == list(range(1, res.steps + 1)), "no step lost or repeated"
    assert len({e.epoch for e in events}) == 3, f"three incarnations (killed at {kill_steps})"
    assert ud.actor_info(h.run_id) is None or ud.actor_info(h.run_id)["status"] == "finished"


def test_resume_from_cli(ray_local: None, redis_server: RedisServer,
                         reference: tuple[str, dict[str, int]]) -> None:
    import ray

    ud = _client(redis_server.url)
    h = ud.start(slow_agent(0.4), TASK)
    in_model_call(ud, h.run_id, 3)
    _kill_actor(ud, h.run_id)
    env = {**os.environ, "UNDYING_REDIS_URL": redis_server.url,
           "UNDYING_RAY_ADDRESS": ray.get_runtime_context().gcs_address,
           "UNDYING_NAMESPACE": "undying-tests"}
    out = subprocess.run([sys.executable, "-m", "undying.cli", "resume", h.run_id, "--no-wait"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "resumed from step" in out.stdout
    res = h.result(timeout=60)
    assert res.status == "finished" and res.answer == reference[0]
    assert ledger_of(ud, h.run_id) == reference[1]

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


def test_redis_killed_and_restarted_between_steps(ray_local: None, private_redis: RedisServer,
                                                  reference: tuple[str, dict[str, int]]) -> None:
    ud = _client(private_redis.url)
    h = ud.start(slow_agent(0.5), TASK)
    in_model_call(ud, h.run_id, 3)
    acknowledged = ud.store.info(h.run_id).step
    acked_events = [e.step for e in ud.history(h.run_id)]
    private_redis.kill()  # SIGKILL; AOF with appendfsync always
    time.sleep(1.0)  # the run's next commit now waits for Redis
    private_redis.start()
    res = h.result(timeout=90)
    assert res.status == "finished", res.error
    assert res.answer == reference[0]
    events = [e.step for e in ud.history(h.run_id)]
    assert events[: len(acked_events)] == acked_events, "nothing acknowledged was lost"
    assert events == list(range(1, res.steps + 1))
    assert acknowledged <= res.steps
    assert ledger_of(ud, h.run_id) == reference[1]


def test_demo_agent_runs_on_ray(ray_local: None, redis_server: RedisServer,
                                reference: tuple[str, dict[str, int]]) -> None:
    ud = _client(redis_server.url)
    h = ud.start(agent, TASK)
    res = h.result(timeout=60)
    assert res.status == "finished" and res.answer == reference[0]
    store = RedisStore(redis_server.url)
    assert store.info(h.run_id).status == "finished"
    assert h.run_id in {r.run_id for r in ud.runs("finished")}
