"""Long back-offs passivate the run on a durable timer instead of sleeping in an executor.

Three layers, no Ray and no Redis: the HTTP provider (a wait longer than
``passivate_after_s`` ends the call with `RetryLater`, attempts counted across
dispatches, the rate limiter's queue too), the pure loop (`ModelRetry` marks the
call as backing off and sets a timer; the timer dispatches it again; cancel,
deadline and loss reports while it waits), and the real engine + executor on the
in-memory store, timers fired by hand as the supervisor would: nothing is
dispatched or sleeping while the run waits, and the history says what it took.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from undying.actors import Agent, ChatMessage, ModelReply, ModelRequest, ModelSpec, SecretRef
from undying.actors._decide import decide, recover, retry_timer
from undying.actors._engine import RunEngine, create_run, encode_message, load_state
from undying.actors._executor import Executor
from undying.actors._http import HttpProvider, RetryPolicy
from undying.actors._models import ProviderError, RetryLater
from undying.actors._retries import describe_retries, model_calls
from undying.actors._state import (
    Budgets,
    CallModel,
    Cancel,
    EffectLost,
    ModelRetry,
    RunState,
    SetTimer,
    Start,
    Timer,
)
from undying.actors.openai_compat import OpenAIModel
from undying.actors.research import agent as research
from undying.persistence.ratelimit import Limits, Reservation
from undying.testing import MemoryStore

KEY_ENV = "UD_BACKOFF_TEST_KEY"
HELLO = (ChatMessage(role="user", content="hello"),)


@pytest.fixture(autouse=True)
def _key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, "sk-unit-backoff")


class Sleeps:
    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)


class TopRng(random.Random):
    """uniform(a, b) is b: the top of every jitter range."""

    def uniform(self, a: float, b: float) -> float:
        return b


def ok_body(content: str = "the answer") -> dict[str, Any]:
    return {"model": "m", "choices": [{"index": 0, "finish_reason": "stop",
                                       "message": {"role": "assistant", "content": content}}],
            "usage": {"prompt_tokens": 7, "completion_tokens": 3}}


def script(*responses: httpx.Response) -> tuple[Callable[[httpx.Request], httpx.Response],
                                                list[httpx.Request]]:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return responses[min(len(seen), len(responses)) - 1]

    return handler, seen


def too_many(retry_after: str) -> httpx.Response:
    return httpx.Response(429, headers={"Retry-After": retry_after},
                          json={"error": {"message": "slow down"}})


def spec(**options: Any) -> ModelSpec:
    return ModelSpec(provider="openai", name="m", base_url="http://provider.test/v1",
                     api_key=SecretRef(env=KEY_ENV), options=options)


def provider(handler: Any, sleeps: Sleeps, limiter: Any = None, **options: Any) -> HttpProvider:
    return OpenAIModel(spec(**options), limiter=limiter, transport=httpx.MockTransport(handler),
                       sleep=sleeps, rng=TopRng(0))


def complete(model: HttpProvider, **request: Any) -> Any:
    return asyncio.run(model.complete(ModelRequest(messages=HELLO, **request)))


# -- the provider: sleep a short wait, hand a long one back -----------------------------------


def test_a_long_retry_after_ends_the_call_with_retry_later_instead_of_a_sleep() -> None:
    handler, seen = script(too_many("8"))
    sleeps = Sleeps()
    with pytest.raises(RetryLater) as info:
        complete(provider(handler, sleeps), can_defer=True)
    exc = info.value
    assert len(seen) == 1 and sleeps.delays == []  # nothing slept
    assert exc.kind == "http_429" and exc.retry_after_s == 8.0 and exc.attempts == 1
    assert exc.wait_s == pytest.approx(8.8)  # Retry-After is a floor, plus <= 10 % jitter
    (rec,) = exc.retries
    assert (rec.attempt, rec.kind, rec.passivated, rec.waited_s) == (1, "http_429", True, 8.8)


def test_a_short_wait_is_slept_and_without_timers_every_wait_is() -> None:
    handler, seen = script(too_many("2"), httpx.Response(200, json=ok_body()))
    sleeps = Sleeps()
    resp = complete(provider(handler, sleeps), can_defer=True)
    assert resp.message.content == "the answer" and sleeps.delays == [pytest.approx(2.2)]
    handler, seen = script(too_many("8"), httpx.Response(200, json=ok_body()))
    sleeps = Sleeps()
    resp = complete(provider(handler, sleeps))  # an in-process run: no timers to wait on
    assert len(seen) == 2 and sleeps.delays == [pytest.approx(8.8)]
    assert not resp.retries[0].passivated


def test_a_passivated_wait_honours_a_retry_after_the_sleep_cap_would_cut() -> None:
    handler, _ = script(too_many("300"))
    with pytest.raises(RetryLater) as info:
        complete(provider(handler, Sleeps(), max_retry_after_s=60), can_defer=True)
    assert info.value.wait_s == pytest.approx(330.0)
    handler, _ = script(too_many("300"))
    with pytest.raises(RetryLater) as info:
        complete(provider(handler, Sleeps(), max_passivated_wait_s=100), can_defer=True)
    assert info.value.wait_s == pytest.approx(110.0)


def test_attempts_of_earlier_dispatches_count_against_max_attempts() -> None:
    handler, seen = script(httpx.Response(502))
    sleeps = Sleeps()
    with pytest.raises(ProviderError) as info:
        complete(provider(handler, sleeps, max_attempts=4), can_defer=True, tries=3)
    err = info.value
    assert not isinstance(err, RetryLater) and len(seen) == 1 and sleeps.delays == []
    assert err.attempts == 4 and "gave up after 4 attempts" in str(err)
    handler, seen = script(httpx.Response(500), httpx.Response(200, json=ok_body()))
    resp = complete(provider(handler, Sleeps(), max_attempts=4), tries=2)
    assert resp.attempts == 4 and [r.attempt for r in resp.retries] == [3]


def test_the_threshold_is_an_option() -> None:
    assert RetryPolicy.from_options({}).passivate_after_s == 5.0
    assert RetryPolicy.from_options({"passivate_after_s": 0.5}).passivate_after_s == 0.5
    handler, _ = script(too_many("1"))
    with pytest.raises(RetryLater):
        complete(provider(handler, Sleeps(), passivate_after_s=0.5), can_defer=True)


class QueueLimiter:
    """A limiter whose queue is ``wait_s`` long (granted within its 30 s horizon)."""

    max_reserve_s = 30.0

    def __init__(self, wait_s: float) -> None:
        self.wait_s = wait_s
        self.reserved: list[int] = []
        self.acquired: list[tuple[int, bool]] = []

    async def reserve(self, bucket: str, *, limits: Limits, requests: int = 1, tokens: int = 0,
                      force: bool = False) -> Reservation:
        granted = self.wait_s <= self.max_reserve_s
        if granted:
            self.reserved.append(tokens)
        return Reservation(granted=granted, wait_s=self.wait_s)

    async def acquire(self, bucket: str, tokens: int = 0, *, requests: int = 1,
                      limits: Limits | None = None, wait: bool = True) -> float:
        self.acquired.append((tokens, wait))
        return 0.0


def test_a_long_queue_at_the_rate_limiter_keeps_its_slot_and_passivates() -> None:
    handler, seen = script(httpx.Response(200, json=ok_body()))
    limiter = QueueLimiter(12.0)
    sleeps = Sleeps()
    with pytest.raises(RetryLater) as info:
        complete(provider(handler, sleeps, limiter=limiter, rpm=5), can_defer=True)
    exc = info.value
    assert seen == [] and sleeps.delays == [] and len(limiter.reserved) == 1
    assert (exc.kind, exc.wait_s, exc.slot, exc.attempts) == ("rate_limit", 12.0, True, 0)
    assert exc.retries[0].kind == "rate_limit" and exc.retries[0].passivated
    # dispatched again when the slot is due: it is this call's, it does not queue again
    resp = complete(provider(handler, sleeps, limiter=limiter, rpm=5), can_defer=True,
                    slot_reserved=True)
    assert resp.message.content == "the answer" and len(limiter.reserved) == 1
    assert [w for _, w in limiter.acquired] == [False]  # only the settling of used tokens


def test_a_queue_beyond_the_limiters_horizon_reserves_nothing_and_comes_back_early() -> None:
    limiter = QueueLimiter(100.0)
    handler, _ = script(httpx.Response(200, json=ok_body()))
    with pytest.raises(RetryLater) as info:
        complete(provider(handler, Sleeps(), limiter=limiter, rpm=5), can_defer=True)
    assert limiter.reserved == [] and not info.value.slot
    assert info.value.wait_s == pytest.approx(100.0 - 30.0 * 0.9)  # near the slot, before it


def test_a_short_queue_is_slept() -> None:
    limiter = QueueLimiter(2.0)
    handler, seen = script(httpx.Response(200, json=ok_body()))
    sleeps = Sleeps()
    complete(provider(handler, sleeps, limiter=limiter, rpm=5), can_defer=True)
    assert sleeps.delays == [2.0] and len(seen) == 1


# -- the loop: a back-off is a pending call on a timer --------------------------------------


def started(**budgets: Any) -> RunState:
    ctx = research.context().model_copy(update={"created_ms": 0, "budgets": Budgets(**budgets)})
    s, effects = decide(RunState(run_id="r", context=ctx), Start(id="start", task="t"))
    assert effects == [CallModel(effect_id="m1")]
    return s


def backoff(attempt: int = 1, at_ms: int = 10_000, attempts: int = 1) -> ModelRetry:
    return ModelRetry(id=f"retry:m1:{attempt}", effect_id="m1", attempt=attempt, at_ms=at_ms,
                      wait_s=8.4, reason="http_429", retry_after_s=8.0, attempts=attempts,
                      retries=({"attempt": attempts, "kind": "http_429", "waited_s": 8.4,
                                "retry_after_s": 8.0, "passivated": True},))


def test_a_back_off_sets_a_timer_and_the_timer_dispatches_the_next_attempt() -> None:
    s = started()
    s1, effects = decide(s, backoff())
    assert effects == [SetTimer(timer_id="retry:m1:1", at_ms=10_000)]
    p = s1.pending["m1"]
    assert p.backing_off and (p.retry_at_ms, p.attempt, p.tries, p.backoffs) == (10_000, 1, 1, 0)
    assert s1.status == "waiting" and s1.usage.retries == 1
    assert recover(s1) == (s1, [])  # nothing is out: a restart sends nothing early
    assert decide(s1, backoff()) == (s1, [])  # a duplicate
    assert decide(s, backoff(attempt=2)) == (s, [])  # not the dispatch that is out
    lost = EffectLost(id="lost:m1:1", effect_id="m1", attempt=1, started=False)
    assert decide(s1, lost) == (s1, [])  # nothing to lose while it waits
    assert decide(s1, Timer(id="timer:retry:m1:0", timer_id="retry:m1:0")) == (s1, [])
    s2, effects = decide(s1, Timer(id="timer:retry:m1:1", timer_id=retry_timer("m1", 1)))
    assert effects == [CallModel(effect_id="m1")] and s2.status == "running"
    p = s2.pending["m1"]
    assert not p.backing_off and (p.attempt, p.tries, p.backoffs) == (2, 1, 1)
    assert p.retries == backoff().retries  # kept for the history line of the answer
    assert decide(s2, Timer(id="timer:retry:m1:1", timer_id="retry:m1:1"))[1] == []
    # a second back-off of the same call has a timer of its own
    s3, effects = decide(s2, backoff(attempt=2, at_ms=20_000, attempts=2))
    assert effects == [SetTimer(timer_id="retry:m1:2", at_ms=20_000)]
    assert s3.pending["m1"].tries == 2 and len(s3.pending["m1"].retries) == 2


def test_cancel_and_the_deadline_end_a_run_that_backs_off() -> None:
    s1, _ = decide(started(), backoff())
    cancelled, effects = decide(s1, Cancel(id="cancel", reason="enough"))
    assert cancelled.status == "cancelled" and cancelled.pending == {} and effects == []
    assert decide(cancelled, Timer(id="timer:retry:m1:1", timer_id="retry:m1:1")) == (
        cancelled, [])  # the timer fires into an ended run: it does nothing
    failed, _ = decide(s1, Timer(id="timer:deadline", timer_id="deadline"))
    assert failed.status == "failed" and "wall time" in (failed.error or "")


def test_a_back_off_past_the_deadline_fails_at_once() -> None:
    s = started(max_wall_s=5.0)
    s = s.model_copy(update={"context": s.context.model_copy(update={"deadline_ms": 5_000})})
    failed, effects = decide(s, backoff(at_ms=9_000))
    assert failed.status == "failed" and effects == []
    assert "would have to wait 8.4 s for its next attempt: http_429" in (failed.error or "")


def test_back_offs_are_not_counted_as_lost_dispatches() -> None:
    s = started(max_effect_attempts=2)
    for attempt in (1, 2, 3):
        s, _ = decide(s, backoff(attempt=attempt, attempts=attempt))
        s, _ = decide(s, Timer(id=f"timer:retry:m1:{attempt}", timer_id=f"retry:m1:{attempt}"))
    assert s.pending["m1"].attempt == 4 and s.pending["m1"].backoffs == 3
    s, effects = decide(s, EffectLost(id="lost:m1:4", effect_id="m1", attempt=4, started=False))
    assert s.status == "running" and effects == [CallModel(effect_id="m1")]
    s, _ = decide(s, EffectLost(id="lost:m1:5", effect_id="m1", attempt=5, started=False))
    assert s.status == "failed" and "was lost 2 times" in (s.error or "")


# -- the engine and a real executor, timers fired by hand ----------------------------------


def over_mock(**options: Any) -> Agent:
    return Agent(research.name, version=research.version, instructions=research.instructions,
                 model=spec(backoff_base_s=0.25, **options), tools=list(research.tools.values()),
                 budgets=research.budgets, ref=research.ref)


def activate_and_drain(store: MemoryStore, rid: str, executor: Executor) -> RunEngine:
    act = store.activate(rid, "h", "h|local|1", 30_000)
    assert act is not None
    engine = RunEngine(rid, store, dispatch=executor.submit)
    engine.activate(act.epoch, act.clean)
    engine.drain()
    assert store.passivate(rid, engine.epoch, engine.read_cursor, "h") == "ok"
    return engine


def fire_due_timers(store: MemoryStore, now_ms: int) -> list[str]:
    """What the supervisor's scan does with due timers."""
    fired = []
    for run_id, timer_id in store.timers_due(now_ms=now_ms):
        store.deliver(run_id, encode_message(Timer(id=f"timer:{timer_id}", timer_id=timer_id),
                                             run_id))
        store.timer_done(run_id, timer_id)
        fired.append(timer_id)
    return fired


def test_a_run_backs_off_passivated_then_finishes_and_its_history_says_what_it_took() -> None:
    handler, seen = script(too_many("8"), httpx.Response(500),
                           httpx.Response(200, json=ok_body()))
    sleeps = Sleeps()

    def model_factory(s: ModelSpec) -> HttpProvider:
        return OpenAIModel(s, transport=httpx.MockTransport(handler), sleep=sleeps,
                           rng=TopRng(0))

    store = MemoryStore()
    rid = create_run(store, over_mock(), "what is an append-only file?")

    async def go() -> None:
        executor = Executor(store, "exec", model_factory=model_factory, passivate_waits=True)
        activate_and_drain(store, rid, executor)  # start: the model call is dispatched
        t0 = time.time()
        await asyncio.gather(*executor.tasks)  # its first attempt gets a 429, Retry-After 8
        assert len(seen) == 1 and sleeps.delays == [] and store.is_queued(rid)
        activate_and_drain(store, rid, executor)  # applies the back-off, passivates
        state = load_state(store, rid)[0]
        p = state.pending["m1"]
        assert p.backing_off and state.status == "waiting"
        assert t0 + 8.0 <= p.retry_at_ms / 1000 <= time.time() + 8.9
        # nothing out, nothing held: no dispatch record, no lease, no task, not queued
        assert store.fx_records(rid) == {} and store.fx_overdue(now_ms=p.retry_at_ms) == []
        assert store.lease_owner(rid) is None and not store.is_queued(rid)
        assert executor.tasks == set() and executor.claimed == {}
        assert fire_due_timers(store, p.retry_at_ms - 1) == []  # not due yet
        assert fire_due_timers(store, p.retry_at_ms) == ["retry:m1:1"]
        activate_and_drain(store, rid, executor)  # dispatched again: attempt 2
        assert store.fx_records(rid) == {"m1": "2|q"}
        await asyncio.gather(*executor.tasks)  # a 500 (slept: 0.25 s), then the answer
        assert len(seen) == 3 and sleeps.delays == [0.5]  # backoff(retry 1) = 0.25 * 2
        activate_and_drain(store, rid, executor)

    asyncio.run(go())
    state = load_state(store, rid)[0]
    assert state.status == "finished" and state.result == "the answer"
    assert state.usage.retries == 2 and state.usage.model_calls == 1
    calls = model_calls(store, rid)
    assert [(c.outcome, c.attempt) for c in calls] == [("backoff", 1), ("reply", 2)]
    assert [r["attempt"] for c in calls for r in c.retries] == [1, 2]  # counted across
    events = [decode_event(store, rid, e) for e in store.read_events(rid)]
    kinds = [e.kind for e in events]
    assert kinds == ["start", "model_retry", "timer", "model_reply"]
    assert events[1].summary.startswith(
        "model call m1 backs off 8.8 s (http_429, Retry-After 8 s; after 1 attempt): "
        "passivated until ")
    assert events[2].summary == "back-off over: model call m1 dispatched again (attempt 2)"
    assert events[3].summary == (
        "finished, after 2 retries: http_429 (Retry-After 8 s, waited 8.80 s passivated); "
        "http_500 (waited 0.50 s); waited 9.3 s")
    assert describe_retries(calls[0].retries).endswith("passivated)")


def decode_event(store: MemoryStore, rid: str, entry: Any) -> Any:
    from undying.actors import StepEvent
    from undying.persistence import decode

    return decode("event", StepEvent, entry.data, run_id=rid)


def test_a_run_cancelled_while_it_backs_off_never_calls_again() -> None:
    handler, seen = script(too_many("30"), httpx.Response(200, json=ok_body()))
    store = MemoryStore()
    rid = create_run(store, over_mock(), "t")

    async def go() -> None:
        executor = Executor(store, "exec", passivate_waits=True, model_factory=lambda s: OpenAIModel(
            s, transport=httpx.MockTransport(handler), sleep=Sleeps(), rng=TopRng(0)))
        activate_and_drain(store, rid, executor)
        await asyncio.gather(*executor.tasks)
        activate_and_drain(store, rid, executor)
        store.send(rid, encode_message(Cancel(id="cancel:r", reason="no longer needed"), rid))
        activate_and_drain(store, rid, executor)
        assert fire_due_timers(store, int(time.time() * 1000) + 60_000) == ["retry:m1:1"]
        assert load_state(store, rid)[0].status == "cancelled"
        assert executor.tasks == set()

    asyncio.run(go())
    assert len(seen) == 1 and load_state(store, rid)[0].error == "no longer needed"


def test_a_reply_that_needed_retries_says_so_in_its_step() -> None:
    """No back-off on a timer: the retries the executor slept through, in the summary."""
    s = started()
    msg = ModelReply(id="reply:m1:1", effect_id="m1",
                     message=ChatMessage(role="assistant", content="", tool_calls=()),
                     retries=({"kind": "http_429", "waited_s": 0.52, "retry_after_s": 0.5},
                              {"kind": "http_500", "waited_s": 0.31}))
    from undying.actors._engine import _summary

    new, _ = decide(s, msg)  # an empty reply: the model is asked again
    assert _summary(new, "model_reply", s, msg) == (
        "model: reply, after 2 retries: http_429 (Retry-After 0.5 s, waited 0.52 s); "
        "http_500 (waited 0.31 s); waited 0.8 s")
    assert _summary(new, "model_reply", s, msg.model_copy(update={"retries": ()})) == (
        "model: reply")
