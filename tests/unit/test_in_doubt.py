"""Calls in doubt (an at-most-once call whose executor died after it began): a reconcile hook
or a person settles them; nothing runs them again blindly. And the cost budget."""

from __future__ import annotations

from typing import Any

import pytest

from undying.actors import Agent, Budgets, ChatMessage, ModelReply, ToolCallRequest, ToolContext, decide, tool
from undying.actors._state import (
    CallTool,
    EffectLost,
    Reconcile,
    Resolve,
    RunState,
    Start,
    ToolInfo,
)
from undying.actors.scripted import policy
from undying.testing import CrashAfter, MemoryStore, SimulatedCrash, resume_inline, run_inline

STORE = MemoryStore()  # the reconcile hook below asks this one what happened


def _paid_before(args: dict[str, Any], ctx: ToolContext) -> Any:
    ran = STORE.ledger(ctx.run_id).get(f"pay|{ctx.key}", 0)
    return ("done", f"paid {args['cents']} (reconciled)") if ran else ("not_done", None)


@tool(side_effect="at_most_once", reconcile=_paid_before)
def pay(cents: int) -> str:
    """Move money."""
    return f"paid {cents}"


@policy("pay-then-answer")
def _pay_then_answer(messages: tuple[ChatMessage, ...], tools: list[dict[str, Any]]) -> ChatMessage:
    results = [m.content for m in messages if m.role == "tool"]
    if not results:
        return ChatMessage(role="assistant", content="paying", tool_calls=(
            ToolCallRequest(id="p", name="pay", arguments={"cents": 500}),))
    return ChatMessage(role="assistant", content=f"done: {results[-1]}")


payer = Agent("reconciling-payer", tools=[pay], model="scripted:pay-then-answer", memory=False,
              ref="tests.unit.test_in_doubt:payer")


def _in_doubt_state() -> RunState:
    tools = {"pay": ToolInfo(name="pay", side_effect="at_most_once", reconcile=True)}
    s = RunState(run_id="r", context=payer.context().model_copy(update={"tools": tools}))
    s, _ = decide(s, Start(id="start", task="pay"))
    s, effects = decide(s, ModelReply(id="reply:m1", effect_id="m1", message=ChatMessage(
        role="assistant", tool_calls=(ToolCallRequest(id="p", name="pay", arguments={"cents": 5}),))))
    assert effects == [CallTool(effect_id="t2.0")]
    s, effects = decide(s, EffectLost(id="lost:t2.0:1", effect_id="t2.0", attempt=1,
                                      started=True, reason="executor died"))
    assert effects == [Reconcile(effect_id="t2.0")]  # ask its hook first
    assert s.journal["t2.0"].status == "in_doubt" and s.status == "waiting"
    return s


def test_settled_done_gives_the_model_the_output_and_goes_on() -> None:
    s = _in_doubt_state()
    done, effects = decide(s, Resolve(id="r1", call_id="t2.0", outcome="done",
                                      output="paid 5", by="alice"))
    assert done.journal["t2.0"].status == "done" and done.journal["t2.0"].result == "paid 5"
    assert done.journal["t2.0"].resolution["by"] == "alice"
    assert done.conversation[-1].content == "paid 5" and done.error is None
    assert [type(e).__name__ for e in effects] == ["CallModel"]
    assert decide(done, Resolve(id="r2", call_id="t2.0", outcome="retry", by="bob")) == (done, [])


def test_settled_failed_tells_the_model_and_retry_dispatches_again_with_the_same_key() -> None:
    s = _in_doubt_state()
    failed, _ = decide(s, Resolve(id="r1", call_id="t2.0", outcome="failed", by="carol",
                                  reason="not in the bank's records"))
    assert "settled as failed by carol" in failed.conversation[-1].content
    retried, effects = decide(s, Resolve(id="r1", call_id="t2.0", outcome="retry", by="dave"))
    assert effects == [CallTool(effect_id="t2.0")]
    assert retried.pending["t2.0"].attempt == 2 and retried.journal["t2.0"].attempt == 2
    assert retried.journal["t2.0"].key == s.journal["t2.0"].key


@pytest.mark.parametrize("ran_before_the_crash", [False, True])
def test_the_reconcile_hook_settles_a_call_cut_after_it_began(ran_before_the_crash: bool) -> None:
    recorder = MemoryStore()
    from undying.testing import RecordingStore

    rec = RecordingStore(recorder)
    run_inline(rec, payer, "pay", run_id="ref", effect_concurrency=1)
    k = rec.writes.index("fx_start") + 1  # cut right after the call began
    rid = f"cut-{ran_before_the_crash}"
    with pytest.raises(SimulatedCrash):
        run_inline(CrashAfter(STORE, k=k), payer, "pay", run_id=rid, effect_concurrency=1)
    if ran_before_the_crash:  # as if it had happened before the process died
        STORE.ledger_record(rid, "pay", STORE.load(rid) and _key(rid))
    state = resume_inline(STORE, rid, effect_concurrency=1)
    assert state.status == "finished", state.error
    entry = state.journal["t2.0"]
    assert entry.resolution["by"] == "reconcile hook of pay"
    assert sum(STORE.ledger(rid).values()) == 1, "it happened exactly once"
    want = "paid 500 (reconciled)" if ran_before_the_crash else "paid 500"
    assert state.result == f"done: {want}"


def _key(run_id: str) -> str:
    from undying.actors import load_state

    return load_state(STORE, run_id)[0].journal["t2.0"].key


def test_children_costs_count_against_the_parents_cost_budget() -> None:
    from undying.actors import ChildResult
    from undying.actors.research import lead

    s = RunState(run_id="p", context=lead.context().model_copy(
        update={"budgets": Budgets(max_cost_usd=0.05, max_children=5)}))
    s, _ = decide(s, Start(id="start", task="q"))
    s, effects = decide(s, ModelReply(id="reply:m1", effect_id="m1", cost_usd=0.01,
                                      message=ChatMessage(role="assistant", tool_calls=(
                                          ToolCallRequest(id="d", name="delegate",
                                                          arguments={"tasks": ["a", "b"]}),))))
    caps = [e.message.budgets for e in effects if hasattr(e, "message")][0]
    assert caps.max_cost_usd == pytest.approx(0.04)  # what the parent has left
    s, _ = decide(s, ChildResult(id="result:p.2-0", child_id="p.2-0", status="finished",
                                 answer="A", cost_usd=0.05))
    assert s.status == "failed" and "budget exceeded: cost" in (s.error or "")
