"""Three Ray nodes on one machine: lose a node, its runs finish on the others."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from undying import Settings, Undying
from undying.actors.research import agent, slow_agent
from undying.persistence import RedisServer
from undying.testing import MemoryStore, run_inline

pytestmark = [pytest.mark.ray, pytest.mark.multinode]

TASK = "How do fencing tokens stop zombie writers, and what does appendfsync always guarantee?"


@pytest.fixture(scope="module")
def redis_mn(tmp_root: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_root / f"redis-mn-{uuid.uuid4().hex[:6]}", appendfsync="always").start()
    yield server
    server.kill()


def test_node_lost_runs_finish_elsewhere(ray_cluster: Any, redis_mn: RedisServer) -> None:
    store = MemoryStore()
    ref = run_inline(store, agent, TASK, run_id="ref")
    ref_ledger = {k.replace("ref:", ""): v for k, v in store.ledger("ref").items()}

    ud = Undying(Settings(redis_url=redis_mn.url, namespace=f"mn-{uuid.uuid4().hex[:6]}"))
    runs = [ud.start(slow_agent(1.5), TASK) for _ in range(6)]
    infos = {h.run_id: ud.actor_info(h.run_id) for h in runs}
    nodes = {i["node_id"] for i in infos.values() if i}
    assert len(nodes) >= 2, f"runs were not spread over nodes: {nodes}"

    head = ray_cluster.head_node.node_id
    workers = [n for n in ray_cluster.worker_nodes]
    victim = max(workers, key=lambda n: sum(1 for i in infos.values() if i and i["node_id"] == n.node_id))
    hit = [rid for rid, i in infos.items() if i and i["node_id"] == victim.node_id
           and ud.info(rid).status == "running"]
    assert hit, "no run on the worker node to remove"
    steps_before = {rid: ud.info(rid).step for rid in hit}
    t_kill = time.time()
    ray_cluster.remove_node(victim, allow_graceful=False)

    recovery = []
    for rid in hit:
        deadline = time.monotonic() + 60
        while True:
            later = [e for e in ud.history(rid) if e.step > steps_before[rid] and e.kind != "restart"
                     and e.epoch > infos[rid]["epoch"]]
            if later:
                recovery.append(later[0].at_ms / 1000 - t_kill)
                break
            if time.monotonic() > deadline:
                import ray

                info = ray.get(ud.supervisor().info.remote(True), timeout=10)
                print("\n".join(line[:300] for line in info.pop("log")[-40:]), info)
                raise AssertionError(f"run {rid} never committed again: {ud.info(rid)}")
            time.sleep(0.05)
    print(f"\nnode lost with {len(hit)} runs; every one committed its next step elsewhere "
          f"within {max(recovery):.2f}s (default Ray health checks)")

    for h in runs:
        res = h.result(timeout=90)
        assert res.status == "finished", res.error
        assert res.answer == ref.result
        ledger = {k.replace(f"{h.run_id}:", ""): v for k, v in ud.ledger(h.run_id).items()}
        assert ledger == ref_ledger
        steps = [e.step for e in h.history() if e.kind != "restart"]
        assert steps == list(range(1, res.steps + 1))
    for rid in hit:
        last = [e for e in ud.history(rid) if e.kind != "restart"][-1]
        assert last.epoch > infos[rid]["epoch"]
    assert head
