"""The retry machinery of HTTP providers, with a fake sleep, a fake RNG and httpx.MockTransport.

No sockets and no real waiting: every delay is recorded, not slept.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import random
from collections.abc import Callable, Coroutine
from typing import Any

import httpx
import pytest

from undying.actors import ChatMessage, MalformedOutput, ModelRequest, ModelSpec, ProviderError, SecretRef
from undying.actors._http import (
    HttpProvider,
    RetryPolicy,
    is_retryable_status,
    parse_retry_after,
    public_url,
    redact,
)
from undying.actors._models import ModelConfigError
from undying.actors.anthropic import AnthropicModel
from undying.actors.openai_compat import OpenAIModel
from undying.persistence.ratelimit import Limits

CANARY = "sk-canary-unit-0123456789"
REQUEST = ModelRequest(messages=(ChatMessage(role="user", content="hello"),),
                       tools=[{"name": "search", "description": "", "parameters": {}}])


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(coro)


class EdgeRng(random.Random):
    """uniform(a, b) returns b: the top of every jitter range, and records the ranges."""

    def __init__(self) -> None:
        super().__init__(0)
        self.ranges: list[tuple[float, float]] = []

    def uniform(self, a: float, b: float) -> float:
        self.ranges.append((a, b))
        return b


class Sleeps:
    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)


def ok_body(content: str = "hi", calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    msg: dict[str, Any] = {"role": "assistant", "content": content}
    if calls:
        msg["tool_calls"] = calls
    return {"model": "m", "choices": [{"index": 0, "message": msg, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 7, "completion_tokens": 3}}


Responder = Callable[[httpx.Request], httpx.Response]


def script(*responses: httpx.Response | Exception) -> tuple[Responder, list[httpx.Request]]:
    """A transport handler answering with ``responses`` in order (an exception is raised)."""
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        r = responses[min(len(seen), len(responses)) - 1]
        if isinstance(r, Exception):
            raise r
        return r

    return handler, seen


def model(handler: Responder, *, cls: type[HttpProvider] = OpenAIModel,
          sleeps: Sleeps | None = None, rng: random.Random | None = None,
          limiter: Any = None, **options: Any) -> HttpProvider:
    spec = ModelSpec(provider=cls.provider, name="m", base_url="http://provider.test/v1",
                     api_key=SecretRef(env="UD_TEST_KEY"), options=options)
    return cls(spec, limiter=limiter, transport=httpx.MockTransport(handler),
               sleep=sleeps or Sleeps(), rng=rng or EdgeRng())


@pytest.fixture(autouse=True)
def _key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UD_TEST_KEY", CANARY)


# -- the math --------------------------------------------------------------------------


def test_backoff_is_full_jitter_over_a_capped_exponential() -> None:
    policy = RetryPolicy(base_s=0.5, cap_s=4.0)
    rng = EdgeRng()
    assert [policy.backoff(n, rng) for n in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert all(a == 0.0 for a, _ in rng.ranges)  # full jitter: from zero, not from half
    seeded = random.Random(7)
    samples = [policy.backoff(3, seeded) for _ in range(2000)]
    assert 0.0 <= min(samples) < 0.1 and 3.9 < max(samples) <= 4.0


def test_retry_after_is_a_capped_floor_with_a_little_jitter() -> None:
    policy = RetryPolicy(max_retry_after_s=10.0)
    assert policy.delay(0, 2.0, EdgeRng()) == pytest.approx(2.2)
    assert policy.delay(0, 2.0, random.Random(1)) >= 2.0
    assert policy.delay(5, 3600.0, EdgeRng()) == pytest.approx(11.0)  # capped, then jittered
    assert policy.delay(0, 0.0, EdgeRng()) == 0.0


def test_parse_retry_after_seconds_dates_and_ms() -> None:
    now = 1_700_000_000.0
    date = email.utils.formatdate(now + 30, usegmt=True)
    assert parse_retry_after({"Retry-After": "2"}) == 2.0
    assert parse_retry_after({"retry-after": "1.5"}) == 1.5
    assert parse_retry_after({"Retry-After": date}, now=lambda: now) == pytest.approx(30.0)
    past = email.utils.formatdate(now - 30, usegmt=True)
    assert parse_retry_after({"Retry-After": past}, now=lambda: now) == 0.0
    assert parse_retry_after({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert parse_retry_after({"Retry-After": "-4"}) == 0.0
    assert parse_retry_after({"Retry-After": "soon"}) is None
    assert parse_retry_after({}) is None


@pytest.mark.parametrize("status,retryable", [
    (429, True), (500, True), (502, True), (503, True), (504, True), (529, True), (599, True),
    (400, False), (401, False), (403, False), (404, False), (422, False), (418, False)])
def test_status_classification(status: int, retryable: bool) -> None:
    assert is_retryable_status(status) is retryable


def test_redaction_helpers() -> None:
    assert redact(f"bad key {CANARY}!", [CANARY, ""]) == "bad key ***!"
    assert public_url("https://user:pw@host.test:8443/v1?key=abc") == "https://host.test:8443/v1"


# -- the loop ------------------------------------------------------------------------------


def test_retries_transient_statuses_and_honours_retry_after() -> None:
    handler, seen = script(httpx.Response(503), httpx.Response(429, headers={"Retry-After": "2"},
                                                               json={"error": {"message": "slow down"}}),
                           httpx.Response(200, json=ok_body()))
    sleeps = Sleeps()
    resp = run(model(handler, sleeps=sleeps, backoff_base_s=0.5).complete(REQUEST))
    assert resp.message.content == "hi" and len(seen) == 3
    assert sleeps.delays == [0.5, pytest.approx(2.2)]  # back-off top; Retry-After + 10 %
    assert resp.attempts == 3
    assert [(r.attempt, r.kind, r.status, r.retry_after_s) for r in resp.retries] == [
        (1, "http_503", 503, None), (2, "http_429", 429, 2.0)]
    assert resp.retries[1].waited_s == pytest.approx(2.2)
    assert (resp.tokens_in, resp.tokens_out, resp.provider, resp.model) == (7, 3, "openai", "m")


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
def test_no_retry_on_client_errors(status: int) -> None:
    handler, seen = script(httpx.Response(status, json={"error": {"message": "no such thing"}}))
    with pytest.raises(ProviderError) as info:
        run(model(handler).complete(REQUEST))
    assert len(seen) == 1 and info.value.retryable is False and info.value.status == status
    assert f"HTTP {status} (no such thing)" in str(info.value)
    assert "not retryable" in str(info.value)


def test_gives_up_after_max_attempts_and_says_so() -> None:
    handler, seen = script(httpx.Response(502))
    sleeps = Sleeps()
    with pytest.raises(ProviderError) as info:
        run(model(handler, sleeps=sleeps, max_attempts=3, backoff_base_s=1.0).complete(REQUEST))
    err = info.value
    assert len(seen) == 3 and sleeps.delays == [1.0, 2.0]
    assert err.retryable and err.status == 502 and err.attempts == 3 and len(err.retries) == 2
    assert "HTTP 502" in str(err) and "gave up after 3 attempts" in str(err)


@pytest.mark.parametrize("exc,kind", [
    (httpx.ReadTimeout("timed out"), "timeout"),
    (httpx.ConnectError("refused"), "connect"),
    (httpx.RemoteProtocolError("peer closed connection without sending complete message body"),
     "reset"),
    (httpx.ReadError("connection reset by peer"), "reset")])
def test_transport_errors_are_retried(exc: Exception, kind: str) -> None:
    handler, seen = script(exc, httpx.Response(200, json=ok_body()))
    resp = run(model(handler).complete(REQUEST))
    assert len(seen) == 2 and resp.retries[0].kind == kind and resp.retries[0].status is None


def test_a_body_that_is_not_json_is_retried_twice_then_raised() -> None:
    handler, seen = script(httpx.Response(200, content=b'{"choices": [{"mess'))
    with pytest.raises(MalformedOutput) as info:
        run(model(handler).complete(REQUEST))
    assert len(seen) == 3 and info.value.retryable is False
    assert "response body is not valid JSON" in str(info.value)


@pytest.mark.parametrize("arguments,expected", [
    ('{"query": "x",', "has arguments that are not valid JSON: Expecting"),
    ('["x"]', "has arguments that are not a JSON object (got list)")])
def test_bad_tool_arguments_are_malformed_output_not_retried(arguments: str, expected: str) -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "search", "arguments": arguments}}
    handler, seen = script(httpx.Response(200, json=ok_body("", [call])))
    with pytest.raises(MalformedOutput) as info:
        run(model(handler).complete(REQUEST))
    assert len(seen) == 1
    assert str(info.value).startswith("openai model 'm': tool call 'search' " + expected.split(" ")[0])
    assert expected in str(info.value)


def test_empty_reply_and_missing_fields_are_malformed_output() -> None:
    handler, _ = script(httpx.Response(200, json=ok_body("")))
    with pytest.raises(MalformedOutput, match="empty reply: no content and no tool calls"):
        run(model(handler).complete(REQUEST))
    handler, _ = script(httpx.Response(200, json={"id": "x", "object": "chat.completion"}))
    with pytest.raises(MalformedOutput, match="response has no 'choices'"):
        run(model(handler).complete(REQUEST))
    handler, _ = script(httpx.Response(200, json={"type": "message", "content": []}))
    with pytest.raises(MalformedOutput, match="empty reply"):
        run(model(handler, cls=AnthropicModel).complete(REQUEST))


def test_failover_uses_the_fallback_for_that_call() -> None:
    calls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.host)
        if request.url.host == "primary.test":
            return httpx.Response(503)
        assert request.url.path == "/v1/messages" and request.headers["x-api-key"] == CANARY
        return httpx.Response(200, json={"content": [{"type": "text", "text": "from fallback"}],
                                         "stop_reason": "end_turn", "model": "claude-x",
                                         "usage": {"input_tokens": 5, "output_tokens": 2}})

    fallback = {"provider": "anthropic", "name": "claude-x", "base_url": "http://fallback.test",
                "api_key": {"env": "UD_TEST_KEY"}}
    spec = ModelSpec(provider="openai", name="m", base_url="http://primary.test/v1",
                     options={"fallback": fallback, "failover_after": 2})
    m = OpenAIModel(spec, transport=httpx.MockTransport(handler), sleep=Sleeps(), rng=EdgeRng())
    # the fallback is built by build_model: give it the same transport
    assert isinstance(m.fallback, AnthropicModel)
    m.fallback._transport = httpx.MockTransport(handler)
    resp = run(m.complete(REQUEST))
    assert calls == ["primary.test", "primary.test", "fallback.test"]
    assert resp.message.content == "from fallback" and resp.provider == "anthropic"
    assert resp.attempts == 3 and [r.kind for r in resp.retries] == ["http_503", "failover"]
    assert resp.retries[1].model == "openai:m"


def test_limiter_is_asked_before_every_attempt_with_the_key_name_only() -> None:
    asked: list[tuple[str, int, int, bool]] = []

    class FakeLimiter:
        async def acquire(self, bucket: str, tokens: int = 0, *, requests: int = 1,
                          limits: Limits | None = None, wait: bool = True) -> float:
            assert limits is not None and limits.rpm == 60
            asked.append((bucket, tokens, requests, wait))
            return 0.0

    handler, _ = script(httpx.Response(500), httpx.Response(200, json=ok_body()))
    run(model(handler, limiter=FakeLimiter(), rpm=60, max_tokens=5).complete(REQUEST))
    bucket = "openai|http://provider.test/v1|UD_TEST_KEY"
    # two attempts reserve prompt estimate + max_tokens; the success settles the excess
    assert asked == [(bucket, 6, 1, True), (bucket, 6, 1, True), (bucket, 4, 0, False)]
    assert all(CANARY not in b for b, *_ in asked)


def test_the_key_never_leaves_in_errors_responses_or_reprs() -> None:
    echo = {"error": {"message": f"Incorrect API key provided: {CANARY}"}}
    handler, seen = script(httpx.Response(401, json=echo))
    m = model(handler)
    with pytest.raises(ProviderError) as info:
        run(m.complete(REQUEST))
    assert seen[0].headers["authorization"] == f"Bearer {CANARY}"  # it was sent, in a header
    texts = [str(info.value), repr(info.value), repr(info.value.args), repr(m),
             repr(info.value.__cause__), repr(info.value.__context__)]
    assert all(CANARY not in t for t in texts) and "***" in str(info.value)
    assert info.value.__cause__ is None  # httpx errors (whose request has the headers) not chained
    handler, _ = script(httpx.Response(200, json=ok_body(f"your key is {CANARY}")))
    resp = run(model(handler).complete(REQUEST))
    assert CANARY not in repr(resp) and resp.message.content == "your key is ***"


def test_a_missing_key_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("UD_TEST_KEY")
    handler, seen = script(httpx.Response(200, json=ok_body()))
    with pytest.raises(ProviderError, match="environment variable UD_TEST_KEY .* is not set"):
        run(model(handler).complete(REQUEST))
    assert seen == []


def test_configuration_errors_are_refused_when_the_model_is_built() -> None:
    with pytest.raises(ModelConfigError, match=r"unknown options \['rmp'\]"):
        model(script()[0], rmp=10)
    with pytest.raises(ModelConfigError, match="'fallback' is not a model spec"):
        model(script()[0], fallback={"provider": "openai", "nmae": "x"})
    with pytest.raises(ModelConfigError, match="'rpm' must be a positive number"):
        model(script()[0], rpm=-1)
    spec = ModelSpec(provider="openai", name="m", base_url="https://user:pw@host.test/v1?k=1")
    assert OpenAIModel(spec).bucket == "openai|https://host.test/v1|-"


def test_anthropic_wire_mapping_merges_turns_and_separates_the_system_prompt() -> None:
    from undying.actors import ToolCallRequest
    from undying.actors.anthropic import to_wire

    convo = (ChatMessage(role="system", content="be brief"), ChatMessage(role="user", content="q"),
             ChatMessage(role="assistant", content="", tool_calls=(
                 ToolCallRequest(id="a", name="search", arguments={"query": "x"}),
                 ToolCallRequest(id="b", name="search", arguments={"query": "y"}))),
             ChatMessage(role="tool", content="r1", tool_call_id="a", name="search"),
             ChatMessage(role="tool", content="r2", tool_call_id="b", name="search"),
             ChatMessage(role="user", content="error: try again"))
    system, turns = to_wire(convo)
    assert system == "be brief"
    assert [t["role"] for t in turns] == ["user", "assistant", "user"]
    assert [b["type"] for b in turns[2]["content"]] == ["tool_result", "tool_result", "text"]
    assert turns[1]["content"][0] == {"type": "tool_use", "id": "a", "name": "search",
                                      "input": {"query": "x"}}


def test_openai_wire_mapping_sends_arguments_as_json_strings() -> None:
    from undying.actors import ToolCallRequest
    from undying.actors.openai_compat import to_wire

    wire = to_wire((ChatMessage(role="assistant", tool_calls=(
        ToolCallRequest(id="a", name="search", arguments={"query": "x"}),)),
        ChatMessage(role="tool", content="r", tool_call_id="a", name="search")))
    assert wire[0]["content"] is None
    assert json.loads(wire[0]["tool_calls"][0]["function"]["arguments"]) == {"query": "x"}
    assert wire[1] == {"role": "tool", "tool_call_id": "a", "content": "r"}
