"""Three Ray nodes on one machine: lose a node, its runs' calls and activations finish elsewhere."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration._faults import TASK, calls_of, teardown
from tests.integration.test_ray_runs import reference_of
from undying import Settings, Undying
from undying.actors.pool import executor_names
from undying.actors.research import agent, slow_agent
from undying.persistence import TERMINAL, RedisServer

pytestmark = [pytest.mark.ray, pytest.mark.multinode]


@pytest.fixture(scope="module")
def redis_mn(tmp_root: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_root / f"redis-mn-{uuid.uuid4().hex[:6]}", appendfsync="always").start()
    yield server
    server.kill()


def _claims_by_node(ud: Undying, nodes: list[str]) -> dict[str, set[str]]:
    """Runs whose calls are running on each node's executors now (the first, or its standby
    while it is replaced)."""
    return {n: {c[0] for name in executor_names(n)
                for c in ud.store.executor_claims(name)}  # type: ignore[attr-defined]
            for n in nodes}


def test_node_lost_runs_finish_elsewhere(ray_cluster: Any, redis_mn: RedisServer) -> None:
    ref = reference_of(agent, TASK)
    ud = Undying(Settings(redis_url=redis_mn.url, namespace=f"mn-{uuid.uuid4().hex[:6]}"),
                 actor_options={"hosts_per_node": 2})
    try:
        ud.supervisor()  # the pool on every node
        runs = [ud.start(slow_agent(1.5), TASK) for _ in range(6)]
        workers = list(ray_cluster.worker_nodes)
        deadline = time.monotonic() + 60
        while True:  # calls of several runs in flight on a worker node
            claims = _claims_by_node(ud, [w.node_id for w in workers])
            victim = max(workers, key=lambda w: len(claims[w.node_id]))
            hit = claims[victim.node_id]
            if hit:
                break
            assert time.monotonic() < deadline, "no call ever ran on a worker node"
            time.sleep(0.05)
        spread = {n for n, c in _claims_by_node(
            ud, [ray_cluster.head_node.node_id, *[w.node_id for w in workers]]).items() if c}
        steps_before = {rid: ud.info(rid).step for rid in hit}
        t_kill = time.time()
        ray_cluster.remove_node(victim, allow_graceful=False)

        recovery = []
        for rid in hit:
            deadline = time.monotonic() + 60
            while True:
                later = [e for e in ud.history(rid) if e.step > steps_before[rid]
                         and e.kind != "restart"]
                if later:
                    recovery.append(later[0].at_ms / 1000 - t_kill)
                    break
                if time.monotonic() > deadline:
                    import ray

                    info = ray.get(ud.supervisor().info.remote(True), timeout=10)
                    print("\n".join(line[:300] for line in info.pop("log")[-40:]), info)
                    raise AssertionError(f"run {rid} never committed again: {ud.info(rid)}")
                time.sleep(0.05)
        print(f"\nnode lost with calls of {len(hit)} runs on it (calls were running on "
              f"{len(spread)} nodes); each of those runs committed its next step within "
              f"{max(recovery):.2f}s (default Ray health checks)")

        for h in runs:
            res = h.result(timeout=120)
            assert res.status == "finished", res.error
            assert res.answer == ref[0]
            # a tool in flight on the lost node may have run there before it went: idempotent
            assert set(calls_of(ud, h.run_id)) == set(ref[1])
            steps = [e.step for e in h.history() if e.kind != "restart"]
            assert steps == list(range(1, res.steps + 1))
        assert all(ud.info(h.run_id).status in TERMINAL for h in runs)
    finally:
        teardown(ud)
