"""Provider faults through the whole path: `Undying.start` on a real local Ray, the research
agent's model served over HTTP by the local `ProviderServer` (OpenAI-compatible and
Anthropic wire formats), its API key a `SecretRef` to a canary.

For each fault (429 with Retry-After, 500, 503, slow past the timeout, no answer at all,
a reset mid-body, a body that is not JSON, tool-call arguments that are not a JSON
object), a run with each provider must finish with the scripted run's answer, and what it
took must be visible: the retries in ``state.usage.retries`` and in the `ModelReply`
records of its inbox (a malformed reply as a `ModelFailed` the model was told about).
After each test every key and value in Redis is scanned: the canary key is nowhere.

The run's model spec travels in its checkpoint (``Context.model``), so a spec made here,
with this test's server URL, reaches the executors; the agent they import
(``undying.actors.research:agent``) supplies the tools.
"""

from __future__ import annotations

import collections
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.integration._faults import teardown
from undying import Settings, Undying
from undying.actors import Agent, ModelSpec, SecretRef
from undying.actors._retries import describe_retries, model_calls
from undying.actors.provider_server import ProviderServer
from undying.actors.research import agent as research
from undying.persistence import RedisServer
from undying.testing import MemoryStore, run_inline

pytestmark = [pytest.mark.ray, pytest.mark.timeout(180)]

CANARY = "sk-canary-e2e-4d1b8f2a9c"
WRONG = "sk-canary-e2e-wrong-77e3a0"
KEY_ENV = "UD_E2E_CANARY_KEY"
WRONG_ENV = "UD_E2E_WRONG_KEY"
# Set at import, before any test starts Ray: Ray's workers (the executors that read the
# key at call time) inherit the environment of the process that started Ray.
os.environ[KEY_ENV] = CANARY
os.environ[WRONG_ENV] = WRONG

TASK = "How does Redis persist data, and what is an append-only file?"
PROVIDERS = ("openai", "anthropic")
PATH = {"openai": "/v1/chat/completions", "anthropic": "/v1/messages"}
TIMEOUT_S = 2.0  # per attempt: a held or slow answer is cut here and retried

# fault -> (rule, the retry kinds the faulted call shows). Each rule skips the run's first
# model call and hits its second (a conversation with tool results in it).
FAULTS: dict[str, tuple[dict[str, Any], list[str]]] = {
    "429-retry-after": ({"kind": "429", "retry_after": 0.5}, ["http_429"]),
    "500-twice": ({"kind": "500", "first": 2}, ["http_500", "http_500"]),
    "503": ({"kind": "503", "retry_after": 0.2}, ["http_503"]),
    "slow": ({"kind": "slow", "delay": 2 * TIMEOUT_S}, ["timeout"]),
    "timeout": ({"kind": "timeout"}, ["timeout"]),
    "reset-mid-body": ({"kind": "reset"}, ["reset"]),
    "malformed-json": ({"kind": "malformed"}, ["malformed"]),
    "bad-tool-args": ({"kind": "bad_args"}, []),
    "bad-tool-args-shape": ({"kind": "bad_args", "shape": "wrong_shape"}, []),
}


@pytest.fixture(scope="module")
def pe_redis(tmp_root: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_root / f"redis-pe-{uuid.uuid4().hex[:6]}",
                         appendfsync="always").start()
    yield server
    server.kill()


@pytest.fixture(scope="module")
def ud(ray_local: None, pe_redis: RedisServer) -> Iterator[Undying]:
    import ray

    def env(name: str) -> str | None:
        return os.environ.get(name)

    seen = ray.get(ray.remote(num_cpus=0)(env).remote(KEY_ENV), timeout=60)
    if seen != CANARY:
        pytest.fail(f"Ray's workers do not have {KEY_ENV}: Ray was started before this module "
                    "was imported; run it in a session where it is imported first")
    # with a supervisor, as deployed (a late lease renewal can leave a passivated run
    # un-woken until its lease expires: the supervisor is what notices that)
    client = Undying(Settings(redis_url=pe_redis.url, namespace=f"pe-{uuid.uuid4().hex[:6]}"),
                     actor_options={"hosts_per_node": 2})
    client.supervisor()
    yield client
    teardown(client)


@pytest.fixture(scope="module")
def reference() -> str:
    state = run_inline(MemoryStore(), research, TASK, run_id="ref")
    assert state.status == "finished" and state.result
    return state.result


def over_http(provider: str, server: ProviderServer, key_env: str = KEY_ENV) -> Agent:
    """The research agent with its model served by ``server`` (configuration, not code)."""
    base = server.url + "/v1" if provider == "openai" else server.url
    spec = ModelSpec(provider=provider, name="research", base_url=base,
                     api_key=SecretRef(env=key_env),
                     options={"timeout_s": TIMEOUT_S, "backoff_base_s": 0.05,
                              "backoff_cap_s": 0.2, "max_attempts": 4})
    return Agent(research.name, version=research.version, instructions=research.instructions,
                 model=spec, tools=list(research.tools.values()), budgets=research.budgets,
                 ref=research.ref)


def finished(ud: Undying, run_id: str, server: ProviderServer) -> Any:
    """The run's result once it finished; on a timeout, everything needed to see why."""
    try:
        res = ud.wait(run_id, timeout=120)
    except Exception:
        import ray

        from undying.actors.pool import pool_actors

        state = ud.state(run_id)
        print("state", state.status, state.step, state.pending, ud.store.fx_records(run_id),
              ud.store.lease_owner(run_id), ud.store.is_queued(run_id))  # type: ignore[attr-defined]
        print("history", [(e.step, e.kind, e.status, e.summary[:50]) for e in ud.history(run_id)])
        print("calls", [c.describe() for c in model_calls(ud.store, run_id)])
        print("server", [(r.path, r.status, r.fault, round(r.at, 2)) for r in server.records()])
        for name, a in pool_actors(ud.settings.namespace).items():
            print(name[-12:], ray.get(a.info.remote(), timeout=10))
        raise
    assert res.status == "finished", res.error
    return res


def scan_redis(url: str, needles: list[str]) -> tuple[int, dict[str, list[str]]]:
    """Every key and every value of every type: (keys scanned, needle -> keys it was in)."""
    r: Any = redis.Redis.from_url(url)  # replies typed as bytes | str | Awaitable
    found: dict[str, list[str]] = {n: [] for n in needles}
    scanned = 0
    try:
        for key in r.scan_iter(count=1000):
            scanned += 1
            kind = r.type(key).decode()
            if kind == "string":
                values = [r.get(key) or b""]
            elif kind == "hash":
                values = [x for kv in r.hgetall(key).items() for x in kv]
            elif kind == "list":
                values = r.lrange(key, 0, -1)
            elif kind == "set":
                values = list(r.smembers(key))
            elif kind == "zset":
                values = [m for m, _ in r.zrange(key, 0, -1, withscores=True)]
            elif kind == "stream":
                values = [x for _, fields in r.xrange(key) for kv in fields.items() for x in kv]
            elif kind == "none":
                continue  # expired between SCAN and TYPE
            else:
                raise AssertionError(f"key {key!r} has type {kind}: teach the scan to read it")
            for needle in needles:
                raw = needle.encode()
                if any(raw in v for v in [key, *values]):
                    found[needle].append(key.decode(errors="replace"))
    finally:
        r.close()
    return scanned, found


def assert_no_secret(ud: Undying, marker: str) -> None:
    scanned, found = scan_redis(ud.redis_url, [CANARY, WRONG, marker])
    assert found[marker], f"the scan of {scanned} keys missed the run's own task text"
    assert found[CANARY] == [] and found[WRONG] == [], found


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_fault_is_retried_and_the_run_finishes_as_scripted(ud: Undying, reference: str,
                                                             fault: str) -> None:
    rule, kinds = FAULTS[fault]
    rules = [{"first": 1, **rule, "after": 1, "path": PATH[p]} for p in PROVIDERS]
    with ProviderServer(api_key=CANARY, faults=rules) as server:
        handles = {p: ud.start(over_http(p, server), TASK) for p in PROVIDERS}
        for provider, h in handles.items():
            res = finished(ud, h.run_id, server)
            assert res.answer == reference
            state = ud.state(h.run_id)
            calls = model_calls(ud.store, h.run_id)
            replies = [c for c in calls if c.outcome == "reply"]
            retried = [r["kind"] for c in calls for r in c.retries]
            # what the state counts is what the replies carried
            assert state.usage.retries == len(retried) and state.usage.model_calls == len(replies)
            fired = [r for r in server.records() if r.path == PATH[provider] and r.fault]
            assert [r.fault for r in fired] == [rule["kind"]] * rule.get("first", 1)
            if kinds:
                # a loaded machine may add a timeout elsewhere; the injected ones are all there
                assert not collections.Counter(kinds) - collections.Counter(retried), retried
                hit = next(c for c in calls if [r["kind"] for r in c.retries][:len(kinds)] == kinds)
                assert describe_retries(hit.retries).startswith(
                    f"{len(kinds)} {'retry' if len(kinds) == 1 else 'retries'}: {kinds[0]}")
                if rule.get("retry_after"):
                    r0 = hit.retries[0]
                    assert r0["retry_after_s"] == pytest.approx(rule["retry_after"])
                    assert r0["waited_s"] >= rule["retry_after"]
                    assert f"Retry-After {rule['retry_after']:g} s" in describe_retries(hit.retries)
            else:
                # the reply was unusable: the model was told why, and asked again
                (bad,) = [c for c in calls if c.outcome == "failed"]
                assert bad.malformed and "tool call 'read' has " in (bad.error or ""), bad
                assert state.model_errors == 1
                assert any(e.kind == "model_failed" for e in h.history())
                told = [m for m in state.conversation if m.role == "user"
                        and m.content.startswith("error: your last reply could not be used")]
                assert len(told) == 1
    assert_no_secret(ud, TASK.split(",")[0])


def test_a_wrong_key_fails_the_run_and_its_echo_is_not_stored(ud: Undying) -> None:
    """The server echoes a wrong key in its 401 body, as some real servers do."""
    with ProviderServer(api_key=CANARY) as server:
        handles = [ud.start(over_http(p, server, key_env=WRONG_ENV), f"{TASK} ({p})")
                   for p in PROVIDERS]
        for h in handles:
            res = h.result(timeout=120)
            assert res.status == "failed"
            assert "HTTP 401 (invalid API key '***')" in (res.error or ""), res.error
            assert "not retryable" in (res.error or "")
    assert_no_secret(ud, TASK.split(",")[0])
