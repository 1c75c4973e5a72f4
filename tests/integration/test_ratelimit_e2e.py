"""The cluster-wide rate limiter end to end: 200 concurrent runs through Ray, each one model
call to a `ProviderServer` that refuses (429) more than R requests in any second.

The runs' model spec asks for a limit below R (``rpm``): every executor call then takes a
slot from the shared bucket in Redis before each attempt. The server must see no 429
beyond the first burst (its own stats), every run must finish with its answer, and the
bucket must have queued callers (the limiter set the pace, not the hosts).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration._faults import teardown
from undying import Settings, Undying
from undying.actors import Agent, ModelSpec
from undying.actors._http import public_url
from undying.actors.provider_server import ProviderServer
from undying.persistence import RedisServer
from undying.persistence.ratelimit import bucket_key, bucket_name
from undying.testing import echo_agent

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]

RUNS = 200
SERVER_RPS = 25  # the provider's limit: more in any second gets a 429
LIMIT_RPM = 900  # ours, 15 a second, one at a time (burst 1): the first second bunches up
PATH = "/v1/chat/completions"


@pytest.fixture(scope="module")
def rl_redis(tmp_root: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_root / f"redis-rle-{uuid.uuid4().hex[:6]}").start()
    yield server
    server.kill()


@pytest.fixture(scope="module")
def ud(ray_local: None, rl_redis: RedisServer) -> Iterator[Undying]:
    client = Undying(Settings(redis_url=rl_redis.url, namespace=f"rle-{uuid.uuid4().hex[:6]}"),
                     actor_options={"hosts_per_node": 4})
    client.supervisor()
    yield client
    teardown(client)


def test_200_runs_through_the_limiter_get_no_429_beyond_the_first_burst(
        ud: Undying, capsys: pytest.CaptureFixture[str]) -> None:
    with ProviderServer(rate_limit_rps=SERVER_RPS) as server:
        base = server.url + "/v1"
        spec = ModelSpec(provider="openai", name="echo", base_url=base,
                         options={"rpm": LIMIT_RPM, "rpm_burst": 1, "timeout_s": 30,
                                  "max_attempts": 6, "backoff_base_s": 0.1})
        agent = Agent(echo_agent.name, version=echo_agent.version, model=spec, memory=False,
                      ref=echo_agent.ref)
        bucket = bucket_key(bucket_name("openai", public_url(base), None))
        t0 = time.monotonic()
        handles = [ud.start(agent, f"question {i}") for i in range(RUNS)]
        started = time.monotonic() - t0
        ahead = 0.0  # how far the bucket's next free slot ran ahead of now: callers queued
        results = []
        for h in handles:
            results.append(h.result(timeout=240))
            tat, now = ud.store.r.hget(bucket, "r"), ud.store.r.time()  # type: ignore[attr-defined]
            if tat is not None:
                ahead = max(ahead, float(tat) / 1000 - (now[0] + now[1] / 1e6))
        elapsed = time.monotonic() - t0
        records = server.records()
        stats = server.stats()

    assert [r.status for r in results] == ["finished"] * RUNS, [r.error for r in results][:3]
    assert [r.answer for r in results] == [f"echo: question {i}" for i in range(RUNS)]
    first = min(r.at for r in records)
    refused = [r.at - first for r in records if r.status == "429"]
    late = [round(t, 2) for t in refused if t > 1.0]
    retries = sum(ud.state(h.run_id).usage.retries for h in handles)
    with capsys.disabled():
        print(f"\n{RUNS} runs: started in {started:.1f}s, all finished in {elapsed:.1f}s; "
              f"server: {stats['by_path'][PATH]}, busiest second {stats['max_in_any_second']} "
              f"(limit {SERVER_RPS}), per second {stats['per_second']}; 429s in the first "
              f"burst {len(refused) - len(late)}, after it {len(late)}; retries {retries}; "
              f"limiter queue up to {ahead:.1f}s ahead")
    assert late == [], f"429s after the first burst, at {late} s"
    assert stats["by_path"][PATH]["200"] == RUNS
    # the limiter set the pace: callers waited in its queue, and the calls took as long
    # as RUNS calls at its rate must
    assert ahead >= 1.0, "the limiter never queued anyone: the test did not load it"
    assert time.monotonic() - t0 >= (RUNS - 1) / (LIMIT_RPM / 60) - 0.5
