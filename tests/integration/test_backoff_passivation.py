"""Long back-offs passivate the run, on a real local Ray, a real redis-server and the local
`ProviderServer` (OpenAI wire format), with the supervisor firing the runs' timers.

- A 429 with Retry-After 8 s: while the run backs off, it holds no lease, no host holds it,
  it is not queued, no dispatch of it is recorded (so nothing reports it lost or sends it
  early) and no executor task is sleeping; the supervisor's timer dispatches the call again
  after the 8 s, and the run finishes with the scripted run's answer.
- A rate limit of 20 requests a minute (one slot every 3 s) with ``passivate_after_s`` 1:
  each call that would queue passivates instead, keeps its reserved slot, and the provider
  never sees two requests closer than the limit allows.
- Retries slept in the executor (a 429 with Retry-After 0.5 s, then a 500) are in the
  history of the step that applied the reply, through `Undying.history` and through
  ``undying history RUN [--json]``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.integration._faults import pool_client
from undying import Undying
from undying.actors import Agent, ModelSpec
from undying.actors._retries import model_calls
from undying.actors.pool import pool_actors
from undying.actors.provider_server import ProviderServer
from undying.actors.research import agent as research
from undying.persistence import RedisServer
from undying.testing import MemoryStore, run_inline

pytestmark = [pytest.mark.ray, pytest.mark.timeout(240)]

TASK = "How does Redis persist data, and what is an append-only file?"
PATH = "/v1/chat/completions"


@pytest.fixture(scope="module")
def ud(ray_local: None, module_redis: RedisServer) -> Iterator[Undying]:
    with pool_client(module_redis.url, "bo", hosts_per_node=2) as client:  # its supervisor fires timers
        yield client


@pytest.fixture(scope="module")
def reference() -> str:
    state = run_inline(MemoryStore(), research, TASK, run_id="ref")
    assert state.status == "finished" and state.result
    return state.result


def over_http(server: ProviderServer, **options: Any) -> Agent:
    spec = ModelSpec(provider="openai", name="research", base_url=server.url + "/v1",
                     options={"timeout_s": 5.0, "backoff_base_s": 0.05, "backoff_cap_s": 0.2,
                              "max_attempts": 4, **options})
    return Agent(research.name, version=research.version, instructions=research.instructions,
                 model=spec, tools=list(research.tools.values()), budgets=research.budgets,
                 ref=research.ref)


def pool_info(ud: Undying) -> dict[str, dict[str, Any]]:
    import ray

    return {name: ray.get(a.info.remote(), timeout=10)
            for name, a in pool_actors(ud.settings.namespace).items()}


def backing_off(ud: Undying, run_id: str, timeout: float = 60) -> tuple[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = ud.state(run_id)
        assert state.status not in ("finished", "failed", "cancelled"), state.error
        waiting = [(eid, p) for eid, p in state.pending.items() if p.backing_off]
        if waiting:
            return waiting[0]
        time.sleep(0.05)
    raise AssertionError(f"run {run_id} never backed off")


def passivated(ud: Undying, run_id: str, timeout: float = 5) -> None:
    """No lease (a host lingers ~20 ms for a fast result before it lets go)."""
    deadline = time.monotonic() + timeout
    while ud.actor_info(run_id) is not None:
        assert time.monotonic() < deadline, ud.actor_info(run_id)
        time.sleep(0.02)


def cli(ud: Undying, *argv: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "UNDYING_REDIS_URL": ud.redis_url}
    out = subprocess.run([sys.executable, "-m", "undying.cli", *argv], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out


def test_a_long_retry_after_passivates_the_run_until_its_timer(ud: Undying,
                                                               reference: str) -> None:
    rule = {"kind": "429", "retry_after": 8, "first": 1, "after": 1, "path": PATH}
    with ProviderServer(faults=[rule]) as server:
        h = ud.start(over_http(server), TASK)
        eid, p = backing_off(ud, h.run_id)
        passivated(ud, h.run_id)
        left = p.retry_at_ms / 1000 - time.time()
        assert left > 2, f"too little of the back-off left to look at it ({left:.1f} s)"
        # holding nothing: no lease, no host, not queued, no dispatch out, no task sleeping
        assert ud.info(h.run_id).status == "waiting"
        assert not ud.store.is_queued(h.run_id)  # type: ignore[attr-defined]
        assert ud.store.fx_records(h.run_id) == {}  # type: ignore[attr-defined]
        infos = pool_info(ud)
        assert all(i.get("run") != h.run_id for i in infos.values()), infos
        executors = [i for i in infos.values() if "incarnation" in i]
        assert executors and all(i["in_flight"] == 0 and i["tasks"] == 0 for i in executors)
        assert sum(i.get("deferred", 0) for i in executors) >= 1
        res = h.result(timeout=120)
        assert res.status == "finished", res.error
        assert res.answer == reference
    fired = [r for r in server.records() if r.path == PATH]
    i = next(k for k, r in enumerate(fired) if r.fault == "429")
    assert fired[i + 1].at - fired[i].at >= 8.0  # Retry-After honoured, not slept anywhere
    state = ud.state(h.run_id)
    assert state.usage.retries == 1 and state.pending == {}
    calls = model_calls(ud.store, h.run_id)
    assert [c.outcome for c in calls if c.effect_id == eid] == ["backoff", "reply"]
    history = ud.history(h.run_id)
    kinds = [e.kind for e in history]
    k = kinds.index("model_retry")
    assert kinds[k + 1] == "timer" and kinds[k + 2] == "model_reply", kinds
    assert f"model call {eid} backs off" in history[k].summary
    assert "http_429, Retry-After 8 s" in history[k].summary
    assert history[k + 1].summary == (f"back-off over: model call {eid} dispatched again "
                                      "(attempt 2)")
    assert "after 1 retry: http_429 (Retry-After 8 s, waited 8." in history[k + 2].summary
    assert "passivated" in history[k + 2].summary
    text = cli(ud, "history", h.run_id).stdout
    assert "model_retry" in text and "Retry-After 8 s" in text and "passivated" in text


def test_a_long_queue_at_the_rate_limiter_passivates_and_keeps_the_limit(
        ud: Undying, reference: str) -> None:
    with ProviderServer() as server:
        h = ud.start(over_http(server, rpm=20, passivate_after_s=1.0), TASK)
        res = h.result(timeout=120)
        assert res.status == "finished", res.error
        assert res.answer == reference
    times = sorted(r.at for r in server.records() if r.path == PATH)
    assert len(times) == 4
    # one slot every 3 s: a slot kept across a passivation is not spent twice
    assert min(b - a for a, b in zip(times, times[1:], strict=False)) >= 2.9, times
    history = ud.history(h.run_id)
    backoffs = [e for e in history if e.kind == "model_retry"]
    assert len(backoffs) >= 2 and all("(rate_limit; after 0 attempts)" in e.summary
                                      for e in backoffs), [e.summary for e in backoffs]
    assert ud.state(h.run_id).usage.retries == 0  # waiting for a slot is not a failure


def test_retries_slept_in_the_executor_are_in_the_history(ud: Undying, reference: str) -> None:
    rules = [{"kind": "429", "retry_after": 0.5, "first": 1, "after": 1, "path": PATH},
             {"kind": "500", "first": 1, "after": 2, "path": PATH}]
    with ProviderServer(faults=rules) as server:
        h = ud.start(over_http(server), TASK)
        res = h.result(timeout=120)
        assert res.status == "finished" and res.answer == reference, res.error
    summaries = [e.summary for e in ud.history(h.run_id) if e.kind == "model_reply"]
    (retried,) = [s for s in summaries if "retries" in s]
    assert "after 2 retries: http_429 (Retry-After 0.5 s, waited 0." in retried
    assert "); http_500 (waited 0." in retried and "passivated" not in retried
    rows = json.loads(cli(ud, "history", h.run_id, "--json").stdout)
    assert [r["summary"] for r in rows if r["kind"] == "model_reply"] == summaries
    text = cli(ud, "history", h.run_id).stdout.splitlines()
    # the whole summary is printed, what is past 70 characters under the summary column
    col = text[1].index("summary")
    flat = "".join(line[col:] for line in text[2:-1])
    assert retried in flat
