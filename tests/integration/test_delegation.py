"""Sub-agents on a real local Ray and redis-server: kill parents and children, passivate the
parent, cancel a root with its whole tree."""

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

from tests.integration._faults import executor_pid, kill, teardown, while_active
from undying import Settings, Undying
from undying.actors.research import slow_lead
from undying.actors.scripted import fanout_task
from undying.persistence import TERMINAL, RedisServer
from undying.testing import MemoryStore, fanout_agent, run_inline

pytestmark = pytest.mark.ray

QUESTION = "How do fencing tokens stop zombie writers, and what does appendfsync always guarantee?"


@pytest.fixture(scope="module")
def dl_redis(tmp_root: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_root / f"redis-dl-{uuid.uuid4().hex[:6]}", appendfsync="always").start()
    yield server
    server.kill()


@pytest.fixture(scope="module")
def ud(ray_local: None, dl_redis: RedisServer) -> Iterator[Undying]:
    # hosts pause 0.2 s after each commit: a test can catch one holding a run there
    client = Undying(Settings(redis_url=dl_redis.url, namespace=f"dl-{uuid.uuid4().hex[:6]}"),
                     policy={"max_restarts": 5, "window_s": 60, "backoff_base_s": 0.1},
                     actor_options={"hosts_per_node": 3, "pause_after_commit_s": 0.2})
    client.supervisor()
    yield client
    teardown(client)


def _tree_ok(ud: Undying, root: str, children: int) -> None:
    """Every child ended once, and the parent applied each child's result exactly once."""
    state = ud.state(root)
    assert len(state.delegation.done) == children and not state.delegation.pending
    applied = [e for e in ud.history(root) if e.kind == "child_result"]
    assert len(applied) == children, [e.kind for e in ud.history(root)]
    for child in state.delegation.done:
        info = ud.info(child)
        assert info.parent == root and info.status == "finished"
    spawned = [r.run_id for r in ud.runs() if r.parent == root]
    assert sorted(spawned) == sorted(state.delegation.done), "no child lost or duplicated"


def test_parent_killed_after_committing_its_spawns_and_again_while_children_run(
        ud: Undying) -> None:
    lead = slow_lead(0.4)
    ref = run_inline(MemoryStore(), lead, QUESTION, run_id="ref")
    h = ud.start(lead, QUESTION)
    # 1. the step that commits the spawns: killed before it relays them
    deadline = time.monotonic() + 30
    while True:
        info = while_active(ud, h.run_id)
        if ud.state(h.run_id).delegation.spawned:
            break
        assert time.monotonic() < deadline, "never caught the parent after its spawn step"
        time.sleep(0.05)
    kill(info["pid"])
    # 2. then while it applies a child's result
    while True:
        info = while_active(ud, h.run_id)
        if ud.state(h.run_id).delegation.done or ud.info(h.run_id).status in TERMINAL:
            break
    if ud.info(h.run_id).status not in TERMINAL:
        kill(info["pid"])
    res = h.result(timeout=120)
    assert res.status == "finished", res.error
    assert res.answer == ref.result
    _tree_ok(ud, h.run_id, 2)
    assert sum(1 for e in h.history() if e.kind == "restart") >= 1


def test_child_killed_mid_task_resumes_and_the_parent_gets_one_result(ud: Undying) -> None:
    lead = slow_lead(0.6)
    ref = run_inline(MemoryStore(), lead, QUESTION, run_id="ref")
    h = ud.start(lead, QUESTION)
    deadline = time.monotonic() + 60
    while not ud.state(h.run_id).delegation.pending:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    child = sorted(ud.state(h.run_id).delegation.pending)[0]
    kill(while_active(ud, child)["pid"])  # its host, between a commit and its dispatches
    while not any("|c|" in v for v in ud.store.fx_records(child).values()):  # type: ignore[attr-defined]
        assert time.monotonic() < deadline, "the child never had a call running"
        time.sleep(0.02)
    kill(executor_pid(ud))  # and the executor running its call
    res = h.result(timeout=120)
    assert res.status == "finished", res.error
    assert res.answer == ref.result
    _tree_ok(ud, h.run_id, 2)
    kinds = [e.kind for e in ud.history(child)]
    assert "restart" in kinds or "effect_lost" in kinds


def test_parent_passivated_while_waiting_is_reactivated_by_its_children(ud: Undying) -> None:
    agent = fanout_agent(latency_s=0.5)
    h = ud.start(agent, fanout_task(4, 1, "p"))
    seen_waiting = False
    deadline = time.monotonic() + 60
    while ud.info(h.run_id).status not in TERMINAL:
        state = ud.state(h.run_id)
        if state.delegation.pending and ud.actor_info(h.run_id) is None:
            assert ud.info(h.run_id).status == "waiting"
            seen_waiting = True  # children running, the parent holds no process
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert seen_waiting, "the parent never passivated while its children ran"
    res = h.result(timeout=10)
    assert res.status == "finished" and res.answer == "p: 4/4 sub-agents answered"
    _tree_ok(ud, h.run_id, 4)
    assert sum(1 for e in h.history() if e.kind == "child_result") == 4


def test_cancel_a_root_cancels_its_whole_tree_and_nothing_keeps_running(
        ud: Undying, dl_redis: RedisServer) -> None:
    import ray

    agent = fanout_agent(latency_s=2.0)
    h = ud.start(agent, fanout_task(2, 2, "c"))
    deadline = time.monotonic() + 60
    while len(ud.tree(h.run_id)) < 7:  # root, 2 children, 4 grandchildren
        assert time.monotonic() < deadline, ud.tree(h.run_id)
        time.sleep(0.05)
    env = {**os.environ, "UNDYING_REDIS_URL": dl_redis.url,
           "UNDYING_RAY_ADDRESS": ray.get_runtime_context().gcs_address,
           "UNDYING_NAMESPACE": ud.settings.namespace}
    out = subprocess.run([sys.executable, "-m", "undying.cli", "cancel", h.run_id],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    deadline = time.monotonic() + 30
    while True:
        tree = ud.tree(h.run_id)
        if all(i.status in TERMINAL for _, i in tree):
            break
        assert time.monotonic() < deadline, [(i.run_id, i.status) for _, i in tree]
        time.sleep(0.05)
    assert len(tree) == 7 and all(i.status == "cancelled" for _, i in tree)
    deadline = time.monotonic() + 10
    while any(ud.actor_info(i.run_id) for _, i in tree):  # the last hosts are finishing up
        assert time.monotonic() < deadline, "a cancelled run kept its host"
        time.sleep(0.05)
    assert all(not ud.store.fx_records(i.run_id) for _, i in tree)  # type: ignore[attr-defined]
    # the calls still running when the tree was cancelled end, and nothing takes them up
    time.sleep(2.5)
    claims = ud.store.executor_claims(  # type: ignore[attr-defined]
        next(n for n in ray.util.list_named_actors(all_namespaces=True)
             if n["namespace"] == ud.settings.namespace and n["name"].startswith(
                 "undying-executor:"))["name"])
    assert not [c for c in claims if c[0].startswith(h.run_id)], claims

    tree_cli = subprocess.run([sys.executable, "-m", "undying.cli", "status", h.run_id, "--tree"],
                              env=env, capture_output=True, text=True, timeout=120)
    assert tree_cli.returncode == 0, tree_cli.stderr
    lines = [ln for ln in tree_cli.stdout.splitlines() if " cancelled " in ln and "step" in ln]
    assert len(lines) == 7, tree_cli.stdout
    js = subprocess.run([sys.executable, "-m", "undying.cli", "status", h.run_id, "--tree",
                         "--json"], env=env, capture_output=True, text=True, timeout=120)
    rows = json.loads(js.stdout)
    assert [r["depth"] for r in rows] == [0, 1, 2, 2, 1, 2, 2]


def test_a_wall_time_budget_ends_the_tree_when_its_timer_fires(ud: Undying) -> None:
    agent = fanout_agent(latency_s=3.0, max_wall_s=1.5)
    t0 = time.monotonic()
    h = ud.start(agent, fanout_task(2, 1, "w"))
    res = h.result(timeout=60)
    took = time.monotonic() - t0
    assert res.status == "failed" and "wall time of 1.5s" in (res.error or ""), res.error
    assert took < 6, f"the deadline fired {took:.1f}s after the start"
    deadline = time.monotonic() + 20
    while not all(i.status in TERMINAL for _, i in ud.tree(h.run_id)):
        assert time.monotonic() < deadline, ud.tree(h.run_id)
        time.sleep(0.05)
    # the children inherit the deadline: each is cancelled or fails on it, none finishes
    assert all(i.status in ("cancelled", "failed") for _, i in ud.tree(h.run_id)[1:])
