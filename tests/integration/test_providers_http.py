"""Both HTTP providers through real httpx against the real local ProviderServer.

A normal conversation must give exactly what the scripted policy gives; each
injected fault must end in a success after retries (visible in
``ModelResponse.retries``, with Retry-After honoured in measured time) or in
`MalformedOutput` / `ProviderError` naming what was wrong. A canary API key
must never come back out.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Coroutine, Iterator
from typing import Any

import pytest

from undying.actors import (
    Agent,
    ChatMessage,
    MalformedOutput,
    ModelRequest,
    ModelResponse,
    ModelSpec,
    ProviderError,
    ScriptedModel,
    SecretRef,
    ToolContext,
    build_model,
    read,
    search,
)
from undying.actors._models import close_model
from undying.actors._tools import BUILTIN_SCHEMAS
from undying.actors.provider_server import ProviderServer
from undying.actors.scripted import POLICIES

CANARY = "sk-canary-ud-7f3a9c1e5b2d"
KEY_ENV = "UD_IT_CANARY_KEY"
PROVIDERS = ["openai", "anthropic"]
PATH = {"openai": "/v1/chat/completions", "anthropic": "/v1/messages"}
TASK = "How does Redis persist data, and what is an append-only file?"
TOOLS = [search.schema(), read.schema(), *BUILTIN_SCHEMAS.values()]
FAST = {"backoff_base_s": 0.02, "backoff_cap_s": 0.1, "timeout_s": 1.0, "max_attempts": 4}

# an agent for the engine-level comparison (importable: checkpoints refer to it by name)
agent = Agent("http-research", model=ModelSpec(provider="scripted", name="research"),
              tools=[search, read], ref="tests.integration.test_providers_http:agent")


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(coro)


@pytest.fixture(autouse=True)
def _canary(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, CANARY)


@pytest.fixture
def server() -> Iterator[ProviderServer]:
    with ProviderServer(api_key=CANARY) as s:
        yield s


def spec(provider: str, server: ProviderServer, **options: Any) -> ModelSpec:
    base = server.url + "/v1" if provider == "openai" else server.url
    return ModelSpec(provider=provider, name="research", base_url=base,
                     api_key=SecretRef(env=KEY_ENV), options={**FAST, **options})


def first_turn() -> ModelRequest:
    return ModelRequest(messages=(ChatMessage(role="system", content="You are careful."),
                                  ChatMessage(role="user", content=TASK)), tools=TOOLS)


async def call(s: ModelSpec, request: ModelRequest | None = None) -> tuple[ModelResponse, float]:
    model = build_model(s)
    try:
        t0 = time.perf_counter()
        resp = await model.complete(request or first_turn())
        return resp, time.perf_counter() - t0
    finally:
        await close_model(model)


async def fails(s: ModelSpec) -> ProviderError:
    try:
        await call(s)
    except ProviderError as exc:
        return exc
    raise AssertionError("the call succeeded")


def statuses(server: ProviderServer, provider: str) -> dict[str, int]:
    return server.stats()["by_path"].get(PATH[provider], {})


# -- a normal conversation ----------------------------------------------------------------


async def converse(provider: str, server: ProviderServer) -> list[ChatMessage]:
    """The research loop by hand: every reply must equal the policy's, every request must
    decode on the server to exactly the conversation that was sent."""
    model = build_model(spec(provider, server))
    scripted = ScriptedModel("research")
    ctx = ToolContext(run_id="r", call_id="c", key="k")
    messages = first_turn().messages
    replies = []
    try:
        for _ in range(8):
            req = ModelRequest(messages=messages, tools=TOOLS)
            resp = await model.complete(req)
            expected = await scripted.complete(req)
            assert resp.message == expected.message == POLICIES["research"](messages, TOOLS)
            assert (resp.tokens_in, resp.tokens_out) == (expected.tokens_in, expected.tokens_out)
            assert server.last_conversation(PATH[provider]) == messages
            assert resp.attempts == 1 and resp.retries == () and resp.provider == provider
            replies.append(resp.message)
            messages = (*messages, resp.message)
            if not resp.message.tool_calls:
                return replies
            for c in resp.message.tool_calls:
                tool = {"search": search, "read": read}.get(c.name)
                out = await tool.invoke(c.arguments, ctx) if tool else "ok"
                messages = (*messages, ChatMessage(role="tool", content=out, tool_call_id=c.id,
                                                   name=c.name))
        raise AssertionError("the conversation did not end")
    finally:
        await close_model(model)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_a_conversation_is_exactly_the_scripted_one(provider: str, server: ProviderServer) -> None:
    replies = run(converse(provider, server))
    names = [[c.name for c in r.tool_calls] for r in replies]
    assert names[0][0] == "set_plan" and "search" in names[0] and "read" in names[1]
    assert replies[-1].content.startswith("Answer to: " + TASK)
    assert statuses(server, provider) == {"200": len(replies)}


@pytest.mark.parametrize("provider", PROVIDERS)
def test_a_run_through_the_engine_matches_the_scripted_run(provider: str,
                                                           server: ProviderServer) -> None:
    from undying.testing import MemoryStore, run_inline

    def over_http(s: ModelSpec, **_: Any) -> Any:
        return build_model(s.model_copy(update={
            "provider": provider, "base_url": spec(provider, server).base_url,
            "api_key": SecretRef(env=KEY_ENV)}))

    # one call at a time: concurrent tool results would enter the conversation in the
    # order they happen to complete
    want = run_inline(MemoryStore(), agent, TASK, run_id="same-id", effect_concurrency=1)
    got = run_inline(MemoryStore(), agent, TASK, run_id="same-id", model_factory=over_http,
                     effect_concurrency=1)
    assert got.status == want.status == "finished"
    assert got.conversation == want.conversation and got.result == want.result
    # a loaded machine may time a call out and retry it: the tokens are the same
    assert got.usage.model_copy(update={"retries": 0}) == want.usage


# -- faults that end in a success after retries ---------------------------------------------

RECOVERED: list[tuple[dict[str, Any], list[str]]] = [
    ({"kind": "500", "first": 2}, ["http_500", "http_500"]),
    ({"kind": "502", "first": 1}, ["http_502"]),
    ({"kind": "503", "first": 1}, ["http_503"]),
    ({"kind": "504", "first": 1}, ["http_504"]),
    ({"kind": "timeout", "first": 1}, ["timeout"]),
    ({"kind": "slow", "delay": 2.0, "first": 1}, ["timeout"]),
    ({"kind": "reset", "first": 1}, ["reset"]),
    ({"kind": "close", "first": 1}, ["reset"]),
    ({"kind": "malformed", "first": 1}, ["malformed"]),
    ({"kind": "malformed", "first": 2, "body": "<html>502 Bad Gateway</html>"},
     ["malformed", "malformed"]),
]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("fault,kinds", RECOVERED, ids=[f"{f['kind']}x{len(k)}" for f, k in RECOVERED])
def test_transient_faults_are_retried(provider: str, fault: dict[str, Any], kinds: list[str],
                                      server: ProviderServer) -> None:
    server.set_faults([fault])
    resp, _ = run(call(spec(provider, server, timeout_s=0.5)))
    assert resp.message == POLICIES["research"](first_turn().messages, TOOLS)
    assert [r.kind for r in resp.retries] == kinds and resp.attempts == len(kinds) + 1
    assert server.stats()["requests"] == len(kinds) + 1


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("fmt,after", [("seconds", 0.4), ("ms", 0.3), ("date", 1.0)])
def test_retry_after_is_honoured(provider: str, fmt: str, after: float,
                                 server: ProviderServer) -> None:
    server.set_faults([{"kind": "429", "retry_after": after, "retry_after_format": fmt,
                        "first": 1}])
    resp, elapsed = run(call(spec(provider, server)))
    (r,) = resp.retries
    assert (r.kind, r.status) == ("http_429", 429)
    if fmt == "date":  # an HTTP-date has whole seconds: the wait is within one of the ask
        assert r.retry_after_s is not None and 0.0 <= r.retry_after_s <= after + 1
    else:
        assert r.retry_after_s == pytest.approx(after)
        assert r.waited_s >= after and elapsed >= after  # measured, not just recorded
    assert elapsed >= r.waited_s
    assert statuses(server, provider) == {"429": 1, "200": 1}


@pytest.mark.parametrize("provider", PROVIDERS)
def test_every_third_request_429_over_a_conversation(provider: str, server: ProviderServer) -> None:
    server.set_faults([{"kind": "429", "retry_after": 0.05, "every": 3}])
    replies = run(converse_with_retries(provider, server))
    assert replies[-1].content.startswith("Answer to:")
    counts = statuses(server, provider)
    assert counts["429"] == (counts["200"] + counts["429"]) // 3


async def converse_with_retries(provider: str, server: ProviderServer) -> list[ChatMessage]:
    model = build_model(spec(provider, server))
    ctx = ToolContext(run_id="r", call_id="c", key="k")
    messages = first_turn().messages
    replies: list[ChatMessage] = []
    try:
        while not replies or replies[-1].tool_calls:
            resp = await model.complete(ModelRequest(messages=messages, tools=TOOLS))
            assert resp.message == POLICIES["research"](messages, TOOLS)
            replies.append(resp.message)
            messages = (*messages, resp.message)
            for c in resp.message.tool_calls:
                tool = {"search": search, "read": read}.get(c.name)
                out = await tool.invoke(c.arguments, ctx) if tool else "ok"
                messages = (*messages, ChatMessage(role="tool", content=out, tool_call_id=c.id,
                                                   name=c.name))
        return replies
    finally:
        await close_model(model)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_a_slow_answer_within_the_timeout_is_simply_slow(provider: str,
                                                         server: ProviderServer) -> None:
    server.set_faults([{"kind": "slow", "delay": 0.3}])
    resp, elapsed = run(call(spec(provider, server)))
    assert resp.retries == () and elapsed >= 0.3


# -- faults that end in an error naming what was wrong ------------------------------------------

FAILED: list[tuple[dict[str, Any], type[ProviderError], bool, str | dict[str, str], int]] = [
    ({"kind": "503"}, ProviderError, True, "HTTP 503", 4),
    ({"kind": "429", "retry_after": 0.01}, ProviderError, True, "HTTP 429", 4),
    ({"kind": "timeout"}, ProviderError, True, "no complete answer within 0.3 s", 4),
    ({"kind": "malformed"}, MalformedOutput, False, "response body is not valid JSON", 3),
    ({"kind": "400"}, ProviderError, False, "HTTP 400", 1),
    ({"kind": "404"}, ProviderError, False, "HTTP 404", 1),
    ({"kind": "bad_args"}, MalformedOutput, False,
     {"openai": "tool call 'set_plan' has arguments that are not valid JSON: ",
      "anthropic": "tool call 'set_plan' has input that is not a JSON object (got str)"}, 1),
    ({"kind": "bad_args", "shape": "wrong_shape"}, MalformedOutput, False,
     {"openai": "tool call 'set_plan' has arguments that are not a JSON object (got list)",
      "anthropic": "tool call 'set_plan' has input that is not a JSON object (got list)"}, 1),
    ({"kind": "unknown_tool"}, MalformedOutput, False,
     "tool call 'frobnicate' names a tool that was not offered (offered: read, remember, "
     "search, set_plan)", 1),
    ({"kind": "empty"}, MalformedOutput, False, "empty reply: no content and no tool calls", 1),
]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("fault,cls,retryable,text,requests", FAILED,
                         ids=[f"{f['kind']}-{f.get('shape', '')}" for f, *_ in FAILED])
def test_persistent_faults_raise_errors_that_say_what_was_wrong(
        provider: str, fault: dict[str, Any], cls: type[ProviderError], retryable: bool,
        text: str | dict[str, str], requests: int, server: ProviderServer) -> None:
    server.set_faults([fault])
    err = run(fails(spec(provider, server, timeout_s=0.3)))
    assert type(err) is cls and err.retryable is retryable and err.provider == provider
    want = text[provider] if isinstance(text, dict) else text
    assert str(err).startswith(f"{provider} model 'research'") and want in str(err)
    assert err.attempts == requests
    # the server counts a request once it has read it: on a loaded machine a client that
    # gave up may be a moment ahead of that count
    deadline = time.monotonic() + 5
    while server.stats()["requests"] < requests and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.stats()["requests"] == requests
    if requests > 1:
        assert f"gave up after {requests} attempts" in str(err)
        assert len(err.retries) == requests - 1


# -- failover ----------------------------------------------------------------------------------


def test_failover_to_a_second_server_after_repeated_failures(server: ProviderServer) -> None:
    with ProviderServer(api_key=CANARY) as second:
        server.set_faults([{"kind": "503"}])
        fallback = spec("anthropic", second).model_dump()
        resp, _ = run(call(spec("openai", server, fallback=fallback, failover_after=2)))
        assert resp.provider == "anthropic" and resp.attempts == 3
        assert [(r.kind, r.model) for r in resp.retries] == [
            ("http_503", "openai:research"), ("failover", "openai:research")]
        assert statuses(server, "openai") == {"503": 2}
        assert statuses(second, "anthropic") == {"200": 1}
        # the next call starts with the primary again
        server.set_faults(None)
        resp, _ = run(call(spec("openai", server, fallback=fallback)))
        assert resp.provider == "openai" and resp.attempts == 1

        second.set_faults([{"kind": "500"}])
        server.set_faults([{"kind": "503"}])
        err = run(fails(spec("openai", server, fallback=fallback, failover_after=1)))
        assert "openai model 'research' failed 1 times (last:" in str(err)
        assert "its fallback failed too: anthropic model 'research'" in str(err)
        assert err.attempts == 1 + 4 and err.retryable


# -- the key -------------------------------------------------------------------------------


def test_a_canary_key_never_comes_back_out(server: ProviderServer,
                                           caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    seen: list[str] = []
    for provider in PROVIDERS:
        for fault in [f[0] for f in FAILED] + [f[0] for f in RECOVERED]:
            server.set_faults([fault])
            s = spec(provider, server, timeout_s=0.3, max_attempts=2)
            try:
                resp, _ = run(call(s))
                seen += [repr(resp), json.dumps([r.to_dict() for r in resp.retries])]
            except ProviderError as exc:
                seen += [str(exc), repr(exc), repr(exc.args), repr(exc.retries)]
            seen.append(repr(build_model(s)))
    # a wrong key, which this server echoes back in its 401 body, is redacted as well
    server.set_faults(None)
    os.environ[KEY_ENV] = CANARY + "-wrong"
    for provider in PROVIDERS:
        err = run(fails(spec(provider, server)))
        assert err.status == 401 and not err.retryable and "***" in str(err)
        seen.append(str(err))
    seen.append(caplog.text)
    assert len(seen) > 60
    assert not [t for t in seen if CANARY in t]
