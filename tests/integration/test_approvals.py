"""Approvals on a real local Ray: the run waits holding no process; `undying approve` resumes
it, `undying reject` gives the model the rejection, approving other arguments is refused."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration._faults import teardown
from undying import Settings, Undying
from undying._approval_agents import payer
from undying.persistence import RedisServer

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def ap_redis(tmp_root: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_root / f"redis-ap-{uuid.uuid4().hex[:6]}", appendfsync="always").start()
    yield server
    server.kill()


@pytest.fixture(scope="module")
def ud(ray_local: None, ap_redis: RedisServer) -> Iterator[Undying]:
    client = Undying(Settings(redis_url=ap_redis.url, namespace=f"ap-{uuid.uuid4().hex[:6]}"),
                     actor_options={"hosts_per_node": 2})
    client.supervisor()
    yield client
    teardown(client)


def _cli(ud: Undying, redis: RedisServer, *args: str) -> subprocess.CompletedProcess[str]:
    import ray

    env = {**os.environ, "UNDYING_REDIS_URL": redis.url,
           "UNDYING_RAY_ADDRESS": ray.get_runtime_context().gcs_address,
           "UNDYING_NAMESPACE": ud.settings.namespace}
    return subprocess.run([sys.executable, "-m", "undying.cli", *args], env=env,
                          capture_output=True, text=True, timeout=120)


def _waiting_for_approval(ud: Undying, run_id: str, n: int = 1) -> Any:
    deadline = time.monotonic() + 60
    while True:
        rows = ud.approvals(run_id)
        if len(rows) == n and ud.actor_info(run_id) is None:
            return rows[-1]
        assert time.monotonic() < deadline, (rows, ud.info(run_id))
        time.sleep(0.05)


def test_approve_from_the_cli_resumes_a_run_that_held_no_process(ud: Undying,
                                                                 ap_redis: RedisServer) -> None:
    h = ud.start(payer, "pay alice")
    first = _waiting_for_approval(ud, h.run_id)
    assert ud.info(h.run_id).status == "waiting" and ud.ledger(h.run_id) == {}
    listed = _cli(ud, ap_redis, "approvals", h.run_id)
    assert first.call_id in listed.stdout and first.args_hash in listed.stdout

    # approving other arguments than the call's is refused, and nothing moves
    wrong = _cli(ud, ap_redis, "approve", h.run_id, first.call_id, "--hash", "sha256:0000")
    assert wrong.returncode == 1 and "exact arguments" in wrong.stderr
    assert ud.approvals(h.run_id)[0].call_id == first.call_id

    ok = _cli(ud, ap_redis, "approve", h.run_id, first.call_id, "--hash", first.args_hash,
              "--by", "alice")
    assert ok.returncode == 0, ok.stderr
    second = _waiting_for_approval(ud, h.run_id)  # 700 cents: its own approval
    assert second.call_id != first.call_id and second.arguments["cents"] == 700
    ud.approve(h.run_id, second.call_id, by="bob", args_hash=second.args_hash)
    res = h.result(timeout=60)
    assert res.status == "finished", res.error
    assert sorted(ud.ledger(h.run_id).values()) == [1, 1]
    history = _cli(ud, ap_redis, "history", h.run_id)
    assert f"approved {first.call_id} (pay) by alice" in history.stdout
    assert f"approved {second.call_id} (pay) by bob" in history.stdout


def test_reject_gives_the_model_the_rejection(ud: Undying, ap_redis: RedisServer) -> None:
    h = ud.start(payer, "pay alice")
    row = _waiting_for_approval(ud, h.run_id)
    out = _cli(ud, ap_redis, "reject", h.run_id, row.call_id, "--reason", "not today",
               "--by", "carol")
    assert out.returncode == 0, out.stderr
    res = h.result(timeout=60)
    assert res.status == "finished" and "rejected by carol: not today" in (res.answer or "")
    assert ud.ledger(h.run_id) == {}
    again = _cli(ud, ap_redis, "approve", h.run_id, row.call_id)
    assert again.returncode == 1 and "not waiting for approval" in again.stderr

