"""Crash points: cut a reference run after every store write, resume, and require the same end.

The reference run records its N store writes. Then for every k in 1..N a fresh
run "dies" right after write k (`CrashAfter` raises `SimulatedCrash`, a
BaseException nothing can swallow, like a SIGKILL) and is resumed from what
the store holds. Each must finish with the reference's final state and the
same side-effect ledger: every tool call executed exactly once, none lost.

Effects run one at a time (effect_concurrency=1) so that no effect starts
before the previous result is committed, which makes the ledger exact.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from tests.conftest import unique_id
from undying.actors import (
    Agent,
    ChatMessage,
    RunState,
    StepEvent,
    ToolCallRequest,
    load_state,
    tool,
)
from undying.actors.research import agent
from undying.persistence import MemoryStore, RedisStore, decode
from undying.testing import CrashAfter, RecordingStore, SimulatedCrash, policy, resume_inline, run_inline

TASK = "How do fencing tokens and idempotency keys prevent duplicates?"
OPTS: dict[str, Any] = {"effect_concurrency": 1}
TERMINAL = ("finished", "failed", "cancelled", "quarantined")
RID = "run-crash"


def comparable(state: RunState) -> dict[str, Any]:
    """The state with what legitimately differs between two executions taken out: the run
    id (in keys), the creation time, inbox entry ids (clock-derived), and the step numbers
    that a recovery step shifts (a call lost with its executor is dispatched again in a step
    of its own, recorded in the history). The journal is compared by call, not by key."""
    data = state.model_dump(mode="json")
    data["context"].pop("created_ms")
    for k in ("inbox_cursor", "step", "journal", "pending"):
        data.pop(k)
    # results of concurrent calls enter the conversation in the order they complete, and
    # a call dispatched again completes later: compare each block of tool results as a set
    convo, block = [], []
    for m in data.pop("conversation") + [None]:
        if m is not None and m["role"] == "tool":
            block.append(m)
            continue
        convo += sorted(block, key=lambda x: x["tool_call_id"] or "")
        block = []
        if m is not None:
            convo.append(m)
    data["conversation"] = convo
    data["calls"] = sorted(
        json.dumps([e.tool, e.arguments, e.status, e.result], sort_keys=True)
        for e in state.journal.values())
    out: dict[str, Any] = json.loads(json.dumps(data).replace(state.run_id, "RUN"))
    return out


def normalized(ledger: dict[str, int], state_or_run: Any) -> dict[str, int]:
    """Ledger keys ("tool|run:step:i") as the call they count: (tool, arguments)."""
    if isinstance(state_or_run, str):  # no state: keys with the run id taken out
        return {k.replace(state_or_run, "RUN"): v for k, v in ledger.items()}
    by_key = {e.key: json.dumps([e.tool, e.arguments], sort_keys=True)
              for e in state_or_run.journal.values()}
    out: dict[str, int] = {}
    for k, n in ledger.items():
        call = by_key.get(k.split("|", 1)[1], k)
        out[call] = out.get(call, 0) + n
    return out


def reference() -> tuple[RunState, list[str], dict[str, int]]:
    inner = MemoryStore()
    recorder = RecordingStore(inner)
    state = run_inline(recorder, agent, TASK, run_id=RID, **OPTS)
    assert state.status == "finished" and state.result
    return state, list(recorder.writes), normalized(inner.ledger(RID), state)


def resume_to_the_end(store: Any, run_id: str, tries: int = 3) -> RunState:
    for _ in range(tries):
        state = resume_inline(store, run_id, **OPTS)
        if state.status in TERMINAL:
            return state
    raise AssertionError(f"run {run_id} did not end after {tries} resumes: {state.status}")


def event_steps(store: Any, run_id: str) -> list[int]:
    return [decode("event", StepEvent, e.data, run_id=run_id).step for e in store.read_events(run_id)]


def recovery_steps(store: Any, run_id: str) -> int:
    return sum(1 for e in store.read_events(run_id)
               if decode("event", StepEvent, e.data, run_id=run_id).kind == "effect_lost")


def check(k: int, state: RunState, ledger: dict[str, int], steps: list[int],
          ref: RunState, ref_ledger: dict[str, int], recoveries: int = 0) -> list[str]:
    problems = []
    if state.status != "finished" or state.result != ref.result:
        problems.append(f"k={k}: ended {state.status} with {state.result!r:.60}")
    elif comparable(state) != comparable(ref):
        problems.append(f"k={k}: final state differs from the reference")
    if set(ledger) != set(ref_ledger):
        problems.append(f"k={k}: tool calls {sorted(ledger)} != reference {sorted(ref_ledger)}")
    twice = {key: n for key, n in ledger.items() if n != 1}
    if twice:
        problems.append(f"k={k}: tool calls executed more than once: {twice}")
    if steps != list(range(1, ref.step + recoveries + 1)):
        problems.append(f"k={k}: committed steps {steps}, expected 1..{ref.step} once each "
                        f"(+{recoveries} recovery steps)")
    return problems


def crash_at(make_store: Callable[[], tuple[Any, str]], k: int) -> tuple[Any, str]:
    inner, rid = make_store()
    with pytest.raises(SimulatedCrash):
        run_inline(CrashAfter(inner, k=k), agent, TASK, run_id=rid, **OPTS)
    return inner, rid


# a lost effect shows as a resumed run that waits forever: fail fast instead
pytestmark = pytest.mark.timeout(120)


def test_every_crash_point_resumes_to_the_same_end(capsys: pytest.CaptureFixture[str]) -> None:
    ref, writes, ref_ledger = reference()
    n = len(writes)
    with capsys.disabled():
        print(f"\ncrash points (memory): N={n} writes: {' '.join(writes)}")
    assert writes[0] == "create" and writes.count("commit") == ref.step
    assert ref_ledger and all(v == 1 for v in ref_ledger.values())
    problems: list[str] = []
    for k in range(1, n + 1):
        inner, rid = crash_at(lambda: (MemoryStore(), RID), k)
        state = resume_to_the_end(inner, rid)
        problems += check(k, state, normalized(inner.ledger(rid), state), event_steps(inner, rid),
                          ref, ref_ledger, recovery_steps(inner, rid))
    assert problems == []


def test_a_crash_during_recovery_also_resumes_to_the_same_end() -> None:
    """Die at write k, then die again at write j of the resume, then resume for good."""
    ref, writes, ref_ledger = reference()
    problems: list[str] = []
    for k in range(1, len(writes) + 1):
        for j in (1, 2, 3):
            inner, rid = crash_at(lambda: (MemoryStore(), RID), k)
            try:
                resume_inline(CrashAfter(inner, k=j), rid, **OPTS)
            except SimulatedCrash:
                pass
            state = resume_to_the_end(inner, rid)
            problems += [f"{p} then j={j}" for p in check(
                k, state, normalized(inner.ledger(rid), state), event_steps(inner, rid), ref,
                ref_ledger, recovery_steps(inner, rid))]
    assert problems == []


def test_crash_points_on_redis(store: RedisStore, capsys: pytest.CaptureFixture[str]) -> None:
    ref, writes, ref_ledger = reference()
    sample = list(range(1, len(writes) + 1, 3))
    if sample[-1] != len(writes):
        sample.append(len(writes))  # and the crash after the final commit
    with capsys.disabled():
        print(f"\ncrash points (redis): N={len(writes)}, k in {sample}")
    problems: list[str] = []
    for k in sample:
        _, rid = crash_at(lambda: (store, unique_id("crash")), k)
        state = resume_to_the_end(store, rid)
        problems += check(k, state, normalized(store.ledger(rid), state), event_steps(store, rid),
                          ref, ref_ledger, recovery_steps(store, rid))
        assert load_state(store, rid)[0] == state
    assert problems == []


# -- at-most-once: a committed intent with no result is never re-run ---------------------------


@tool(side_effect="at_most_once")
def pay(cents: int) -> str:
    """Move money (a test double: the ledger counts its executions)."""
    return f"paid {cents}"


@policy("pay-once")
def _pay_once(messages: tuple[ChatMessage, ...], tools: list[dict[str, Any]]) -> ChatMessage:
    if not any(m.role == "tool" for m in messages):
        return ChatMessage(role="assistant", content="paying",
                           tool_calls=(ToolCallRequest(id="p0", name="pay", arguments={"cents": 500}),))
    return ChatMessage(role="assistant", content="done")


pay_agent = Agent("payer", tools=[pay], model="scripted:pay-once", memory=False,
                  ref="tests.integration.test_crash_points:pay_agent")


def _nth(writes: list[str], name: str, n: int) -> int:
    """1-based index of the n-th write called ``name``."""
    return [i for i, w in enumerate(writes, start=1) if w == name][n - 1]


@pytest.mark.parametrize("backend", ["memory", "redis"])
@pytest.mark.parametrize("cut", ["after the intent", "after the claim", "after the start",
                                 "after the result"])
def test_an_at_most_once_call_runs_once_or_is_in_doubt_never_twice(
        backend: str, cut: str, request: pytest.FixtureRequest) -> None:
    """Cut the run around an at-most-once call, then resume:
    - after its intent is committed, or after an executor claimed it but before it began:
      it never started, so it runs once;
    - after the executor marked it begun (it may have happened): in doubt, never run again;
    - after its result was stored: the result is applied, it ran once."""
    recorder = RecordingStore(MemoryStore())
    run_inline(recorder, pay_agent, "pay 5 dollars", run_id="ref", **OPTS)
    # writes: create, activate, commit (start), passivate, claim + complete (the model call),
    # activate, commit (the intent to pay), passivate, claim (the payment), complete, ...
    k = {"after the intent": _nth(recorder.writes, "commit", 2),
         "after the claim": _nth(recorder.writes, "fx_claim", 2),
         "after the start": _nth(recorder.writes, "fx_start", 1),
         "after the result": _nth(recorder.writes, "fx_complete", 2)}[cut]
    inner: Any = MemoryStore() if backend == "memory" else request.getfixturevalue("store")
    rid = unique_id("pay")
    with pytest.raises(SimulatedCrash):
        run_inline(CrashAfter(inner, k=k), pay_agent, "pay 5 dollars", run_id=rid, **OPTS)
    committed, _ = load_state(inner, rid)
    call_id = next(iter(committed.journal))
    assert committed.journal[call_id].status == "intent"

    state = resume_inline(inner, rid, **OPTS)
    ran = sum(inner.ledger(rid).values())
    if cut == "after the start":
        assert ran <= 1  # it may have run before the crash; it is never run again
        assert state.journal[call_id].status == "in_doubt" and state.status == "waiting"
        assert call_id not in state.pending and "in doubt" in (state.error or "")
        assert resume_inline(inner, rid, **OPTS).journal[call_id].status == "in_doubt"
    else:
        assert ran == 1, f"the payment ran {ran} times"
        assert state.status == "finished" and state.journal[call_id].status == "done"
