"""Delegation as pure logic: spawns, waiting for all / any / first K, cancellation down the tree,
budgets flowing down, lost calls and timers. No Ray, no Redis."""

from __future__ import annotations

import json
from typing import Any

import pytest

from undying.actors import (
    Agent,
    Budgets,
    Cancel,
    ChatMessage,
    ChildResult,
    ModelReply,
    RunState,
    Start,
    ToolCallRequest,
    decide,
)
from undying.actors._engine import cap_budgets
from undying.actors._state import (
    CallModel,
    SendMessage,
    SetTimer,
    Spawn,
    Timer,
)
from undying.actors.research import lead
from undying.testing import MemoryStore, run_inline

RID = "root"
WALL_CHILD = Agent("wall-child", version="1", budgets=Budgets(max_wall_s=5.0))
NO_WALL_CHILD = Agent("no-wall-child", version="1")


def fresh(budgets: Budgets | None = None, **context: Any) -> RunState:
    update: dict[str, Any] = {"created_ms": 0, **context}
    if budgets is not None:
        update["budgets"] = budgets
    return RunState(run_id=RID, context=lead.context().model_copy(update=update))


def started(state: RunState | None = None) -> RunState:
    s, effects = decide(state or fresh(), Start(id="start", task="a question"))
    assert effects[0] == CallModel(effect_id="m1")
    return s


def delegate(state: RunState, tasks: list[str], **args: Any) -> tuple[RunState, list[Any]]:
    eid = next(k for k, p in state.pending.items() if p.kind == "model")
    call = ToolCallRequest(id="d0", name="delegate", arguments={"tasks": tasks, **args})
    return decide(state, ModelReply(id=f"reply:{eid}", effect_id=eid,
                                    message=ChatMessage(role="assistant", tool_calls=(call,))))


def spawns(effects: list[Any]) -> list[SendMessage]:
    return [e for e in effects if isinstance(e, SendMessage) and isinstance(e.message, Spawn)]


def child_done(state: RunState, child: str, status: str = "finished", answer: str = "A",
               tokens: int = 10) -> tuple[RunState, list[Any]]:
    return decide(state, ChildResult(id=f"result:{child}", child_id=child, status=status,  # type: ignore[arg-type]
                                     answer=answer if status == "finished" else None,
                                     error=None if status == "finished" else "boom",
                                     tokens=tokens, steps=3))


def test_delegate_spawns_children_with_ids_from_the_parent_and_step() -> None:
    s, effects = delegate(started(), ["x", "y", "z"])
    sent = spawns(effects)
    assert [e.to for e in sent] == ["root.2-0", "root.2-1", "root.2-2"]
    assert [e.message.task for e in sent] == ["x", "y", "z"]  # type: ignore[union-attr]
    assert all(e.message.parent_id == RID and e.message.depth == 1 for e in sent)  # type: ignore[union-attr]
    assert s.delegation.pending == {"root.2-0": "x", "root.2-1": "y", "root.2-2": "z"}
    assert s.delegation.spawned == 3 and list(s.delegation.groups) == ["d2.0"]
    assert s.status == "running" and not s.pending  # waits on its children only
    # the same reply again is a duplicate (its call is no longer pending): nothing new
    again = ModelReply(id="reply:m1:2", effect_id="m1",
                       message=ChatMessage(role="assistant", content="late"))
    assert decide(s, again) == (s, [])


def test_wait_all_answers_the_model_when_every_child_ended_in_the_order_asked() -> None:
    s, _ = delegate(started(), ["x", "y"])
    s, effects = child_done(s, "root.2-1", answer="Y")
    assert effects == [] and s.conversation[-1].role == "assistant"  # still waiting
    s, effects = child_done(s, "root.2-0", answer="X")
    assert effects == [CallModel(effect_id=f"m{s.step}")]
    tool = s.conversation[-1]
    assert (tool.role, tool.name, tool.tool_call_id) == ("tool", "delegate", "d0")
    body = json.loads(tool.content)
    assert [(r["task"], r["answer"]) for r in body["results"]] == [("y", "Y"), ("x", "X")]
    assert s.delegation.tokens == 20 and s.delegation.steps == 6


def test_a_child_result_is_applied_once_and_strangers_are_ignored() -> None:
    s, _ = delegate(started(), ["x", "y"])
    s1, _ = child_done(s, "root.2-0")
    assert child_done(s1, "root.2-0") == (s1, [])  # re-sent after a crash
    assert child_done(s1, "someone-else") == (s1, [])


@pytest.mark.parametrize("wait,need", [("any", 1), (2, 2)])
def test_wait_any_or_first_k_cancels_the_rest(wait: Any, need: int) -> None:
    s, _ = delegate(started(), ["a", "b", "c"], wait=wait)
    for i in range(need):
        s, effects = child_done(s, f"root.2-{i}")
    cancels = [e for e in effects if isinstance(e, SendMessage) and isinstance(e.message, Cancel)]
    assert [e.to for e in cancels] == [f"root.2-{i}" for i in range(need, 3)]
    assert any(isinstance(e, CallModel) for e in effects)
    body = json.loads(s.conversation[-1].content)
    assert len(body["results"]) == need and body["cancelled"] == [f"root.2-{i}" for i in range(need, 3)]
    # the late ones are recorded when they come back, without waking the model
    s2, effects = child_done(s, "root.2-2", status="cancelled")
    assert effects == [] and s2.delegation.done["root.2-2"] == "cancelled"
    assert s2.conversation == s.conversation


def test_failed_children_count_as_ended_and_the_group_resolves_when_all_ended() -> None:
    s, _ = delegate(started(), ["a", "b"], wait="any")
    s, effects = child_done(s, "root.2-0", status="failed")
    assert not any(isinstance(e, CallModel) for e in effects)  # any means any *finished*
    s, effects = child_done(s, "root.2-1", status="failed")
    body = json.loads(s.conversation[-1].content)
    assert [r["status"] for r in body["results"]] == ["failed", "failed"]
    assert any(isinstance(e, CallModel) for e in effects)


@pytest.mark.parametrize("args,problem", [
    ({"tasks": []}, "non-empty list"),
    ({"tasks": ["a", ""]}, "non-empty strings"),
    ({"tasks": ["a"], "wait": 3}, "'wait' must be"),
    ({"tasks": ["a"], "wait": "some"}, "'wait' must be"),
    ({"tasks": ["a"], "cancel_rest": "yes"}, "cancel_rest"),
])
def test_bad_delegate_arguments_are_an_error_the_model_sees(args: dict[str, Any], problem: str) -> None:
    s = started()
    call = ToolCallRequest(id="d0", name="delegate", arguments=args)
    new, effects = decide(s, ModelReply(id="reply:m1", effect_id="m1", message=ChatMessage(
        role="assistant", tool_calls=(call,))))
    assert not spawns(effects) and effects == [CallModel(effect_id=f"m{new.step}")]
    assert problem in new.conversation[-1].content and new.model_errors == 0


def test_depth_and_fan_out_budgets_refuse_to_delegate() -> None:
    deep = fresh(depth=1)  # the lead allows depth 1: its children cannot delegate further
    s, effects = delegate(started(deep), ["a"])
    assert not spawns(effects) and "depth limit" in s.conversation[-1].content
    s, effects = delegate(started(fresh(Budgets(max_children=2))), ["a", "b", "c"])
    assert not spawns(effects) and "fan-out budget" in s.conversation[-1].content


def test_children_get_at_most_what_the_parent_has_left() -> None:
    parent = started(fresh(Budgets(max_steps=20, max_tokens=1000, max_children=5, max_depth=2),
                           deadline_ms=123456))
    parent = parent.model_copy(update={"usage": parent.usage.model_copy(update={"tokens_in": 300})})
    _, effects = delegate(parent, ["a", "b"])
    caps = spawns(effects)[0].message.budgets  # type: ignore[union-attr]
    assert (caps.max_steps, caps.max_tokens, caps.max_children) == (19, 700, 3)
    assert spawns(effects)[0].message.deadline_ms == 123456  # type: ignore[union-attr]
    # the child's own budget is capped field by field
    own = Budgets(max_steps=60, max_tokens=10_000, max_children=100, max_wall_s=30)
    assert cap_budgets(own, caps) == Budgets(max_steps=19, max_tokens=700, max_children=3,
                                             max_depth=2, max_wall_s=30,
                                             max_tool_calls=caps.max_tool_calls)


def test_children_tokens_count_against_the_parent_and_overrun_fails_it_cancelling_the_rest() -> None:
    s, _ = delegate(started(fresh(Budgets(max_tokens=100, max_children=5))), ["a", "b", "c"])
    s, effects = child_done(s, "root.2-0", tokens=150)
    assert s.status == "failed" and "budget exceeded: tokens" in (s.error or "")
    assert sorted(e.to for e in effects if isinstance(e.message, Cancel)) == ["root.2-1", "root.2-2"]


def test_cancel_reaches_every_pending_child_and_the_parent() -> None:
    child = RunState(run_id="root.2-0", parent_id=RID, context=lead.context().model_copy(
        update={"depth": 1}))
    child = started(child)
    child, _ = delegate(child.model_copy(update={"context": child.context.model_copy(
        update={"budgets": Budgets(max_depth=2)})}), ["deeper"])
    done, effects = decide(child, Cancel(id="cancel:root.2-0", reason="parent root cancelled"))
    assert done.status == "cancelled"
    assert [(e.to, type(e.message).__name__) for e in effects] == [
        ("root.2-0.2-0", "Cancel"), (RID, "ChildResult")]
    assert effects[1].message.status == "cancelled"  # type: ignore[union-attr]


def test_a_deadline_sets_a_durable_timer_and_firing_it_fails_the_run() -> None:
    s, effects = decide(fresh(Budgets(max_wall_s=5), deadline_ms=5000),
                        Start(id="start", task="a question"))
    assert SetTimer(timer_id="deadline", at_ms=5000) in effects
    s, _ = delegate(s, ["a"])
    s, effects = decide(s, Timer(id="timer:deadline", timer_id="deadline"))
    assert s.status == "failed" and "wall time of 5" in (s.error or "")
    assert [e.to for e in effects if isinstance(e.message, Cancel)] == ["root.2-0"]


def test_a_lead_and_its_sub_agents_run_in_process_with_passivation() -> None:
    store = MemoryStore()
    q = "How do fencing tokens stop zombie writers, and what does appendfsync always guarantee?"
    state = run_inline(store, lead, q, run_id=RID)
    assert state.status == "finished" and state.result
    assert sorted(state.delegation.done) == ["root.2-0", "root.2-1"]
    assert all(v == "finished" for v in state.delegation.done.values())
    for child in state.delegation.done:
        info = store.info(child)
        assert (info.status, info.parent) == ("finished", RID)
    assert store.counters()["passivations_total"] >= 10  # every run gave its process back


@pytest.mark.parametrize("own_s, parent_deadline, expect", [
    (5.0, None, "own"),          # the child's own wall time, from its creation
    (5.0, 10**15, "own"),        # ... when it ends before its parent's
    (5.0, 1_000, "parent"),      # never past its parent's deadline
    (None, 1_000, "parent"),     # no budget of its own: its parent's deadline
])
def test_a_childs_own_wall_time_gives_it_a_deadline_no_later_than_its_parents(
        own_s: float | None, parent_deadline: int | None, expect: str) -> None:
    from undying.actors._engine import load_state, spawn_child

    child_agent = WALL_CHILD if own_s is not None else NO_WALL_CHILD
    store = MemoryStore()
    spawn = Spawn(id="spawn:c", parent_id=RID, task="t", depth=1, budgets=Budgets(),
                  deadline_ms=parent_deadline, agent_ref=child_agent.ref,
                  agent_version=child_agent.version)
    spawn_child(store, "c", spawn)
    ctx = load_state(store, "c")[0].context
    if expect == "parent":
        assert ctx.deadline_ms == parent_deadline
    else:
        assert ctx.deadline_ms == ctx.created_ms + 5000
