"""The agent loop as a pure function: scripted conversations through `decide`, no Ray, no Redis.

Every test builds a `RunState` from the research agent's context, feeds it
messages as the engine would, and checks the state and the effects it asks for.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from undying.actors import (
    Budgets,
    Cancel,
    ChatMessage,
    ChildResult,
    ModelReply,
    ModelRequest,
    RunState,
    ScriptedModel,
    Start,
    ToolCallRequest,
    ToolContext,
    ToolResult,
    decide,
    recover,
)
from undying.actors._state import (
    CallModel,
    CallTool,
    Delegation,
    EffectLost,
    ModelFailed,
    PendingEffect,
    SendMessage,
    ToolInfo,
)
from undying.actors.research import INSTRUCTIONS, agent
from undying.testing import MemoryStore, run_inline

RID = "run-decide"
TASK = "How do fencing tokens and idempotency keys prevent duplicates?"
TERMINAL = ("finished", "failed", "cancelled", "quarantined")


def fresh(run_id: str = RID, *, parent_id: str | None = None, budgets: Budgets | None = None,
          **context: Any) -> RunState:
    update: dict[str, Any] = {"created_ms": 0, **context}
    if budgets is not None:
        update["budgets"] = budgets
    return RunState(run_id=run_id, parent_id=parent_id,
                    context=agent.context().model_copy(update=update))


def started(state: RunState | None = None) -> RunState:
    s, effects = decide(state or fresh(), Start(id="start", task=TASK))
    assert effects == [CallModel(effect_id="m1")]
    return s


def model_eid(state: RunState) -> str:
    (eid,) = [k for k, p in state.pending.items() if p.kind == "model"]
    return eid


def reply(state: RunState, content: str = "", *calls: tuple[str, dict[str, Any]],
          tokens: tuple[int, int] = (0, 0)) -> tuple[RunState, list[Any]]:
    eid = model_eid(state)
    reqs = tuple(ToolCallRequest(id=f"c{i}", name=n, arguments=a) for i, (n, a) in enumerate(calls))
    msg = ModelReply(id=f"reply:{eid}", effect_id=eid, tokens_in=tokens[0], tokens_out=tokens[1],
                     message=ChatMessage(role="assistant", content=content, tool_calls=reqs))
    return decide(state, msg)


def result(state: RunState, eid: str, output: str = "ok", error: str | None = None
           ) -> tuple[RunState, list[Any]]:
    return decide(state, ToolResult(id=f"tool:{eid}", effect_id=eid, output=output, error=error))


# -- start ---------------------------------------------------------------------------


def test_start_appends_system_and_user_messages_and_calls_the_model_once() -> None:
    s, effects = decide(fresh(), Start(id="start", task=TASK))
    assert effects == [CallModel(effect_id="m1")]
    assert [(m.role, m.content) for m in s.conversation] == [("system", INSTRUCTIONS), ("user", TASK)]
    assert s.task == TASK and s.step == 1 and s.status == "running"
    assert s.pending == {"m1": PendingEffect(effect_id="m1", kind="model", step=1)}


def test_start_without_instructions_has_no_system_message() -> None:
    s, _ = decide(fresh(instructions=""), Start(id="start", task=TASK))
    assert [m.role for m in s.conversation] == ["user"]


def test_a_second_start_is_ignored() -> None:
    s = started()
    again, effects = decide(s, Start(id="start-2", task="another task"))
    assert again is s and effects == []


# -- tool calls ----------------------------------------------------------------------


def test_tool_calls_are_journaled_with_derived_keys_and_emitted() -> None:
    s0 = started()
    s, effects = reply(s0, "searching", ("search", {"query": "fencing"}), ("read", {"doc": "06"}),
                       ("search", {"query": "keys"}), tokens=(10, 5))
    assert s.step == 2 and s.status == "running"
    assert effects == [CallTool(effect_id=f"t2.{i}") for i in range(3)]
    assert list(s.journal) == ["t2.0", "t2.1", "t2.2"]
    for i, (name, args) in enumerate([("search", {"query": "fencing"}), ("read", {"doc": "06"}),
                                      ("search", {"query": "keys"})]):
        e = s.journal[f"t2.{i}"]
        assert (e.key, e.tool, e.arguments, e.model_call_id) == (f"{RID}:2:{i}", name, args, f"c{i}")
        assert e.status == "intent" and e.side_effect == "idempotent" and e.step == 2
    assert set(s.pending) == {"t2.0", "t2.1", "t2.2"}  # the model call is no longer pending
    assert all(p.kind == "tool" for p in s.pending.values())
    assert s.conversation[-1].tool_calls[1].name == "read"
    assert (s.usage.model_calls, s.usage.tool_calls, s.usage.tokens_in, s.usage.tokens_out) == (1, 3, 10, 5)


def test_tool_results_are_applied_and_the_model_is_called_after_the_last() -> None:
    s, _ = reply(started(), "", ("search", {"query": "a"}), ("search", {"query": "b"}))
    s1, e1 = result(s, "t2.1", output="B")
    assert e1 == [] and s1.step == 3 and set(s1.pending) == {"t2.0"}
    assert s1.journal["t2.1"].status == "done" and s1.journal["t2.1"].result == "B"
    s2, e2 = result(s1, "t2.0", error="boom")
    assert e2 == [CallModel(effect_id="m4")] and s2.step == 4
    assert s2.journal["t2.0"].status == "error" and s2.journal["t2.0"].error == "boom"
    assert s2.journal["t2.0"].result is None
    # tool messages in the order the results arrived, tied to the model's call ids
    assert [(m.role, m.tool_call_id, m.content) for m in s2.conversation[-2:]] == [
        ("tool", "c1", "B"), ("tool", "c0", "error: boom")]


def test_builtin_tools_change_state_and_need_no_effect() -> None:
    s, effects = reply(started(), "noting", ("remember", {"key": "k", "value": "v"}),
                       ("set_plan", {"steps": ["one", "two"]}))
    assert s.memory == {"k": "v"} and s.plan == ("one", "two")
    assert s.journal == {}
    assert effects == [CallModel(effect_id="m2")]  # results are already in the conversation
    assert [(m.role, m.content) for m in s.conversation[-2:]] == [
        ("tool", "remembered k"), ("tool", json.dumps({"plan": ["one", "two"]}))]
    assert s.usage.tool_calls == 0


def test_builtin_with_bad_arguments_tells_the_model_and_changes_nothing() -> None:
    s, effects = reply(started(), "", ("remember", {"key": 1}), ("set_plan", {"steps": "x"}))
    assert s.memory == {} and s.plan == ()
    assert all(m.content.startswith("error:") for m in s.conversation[-2:])
    assert effects == [CallModel(effect_id="m2")]


def test_builtins_mixed_with_real_tools_keep_their_call_index_in_the_key() -> None:
    s, effects = reply(started(), "", ("set_plan", {"steps": ["q"]}), ("search", {"query": "q"}))
    assert effects == [CallTool(effect_id="t2.1")]
    assert s.journal["t2.1"].key == f"{RID}:2:1" and s.plan == ("q",)


def test_unknown_tool_becomes_an_error_the_model_sees_and_the_model_is_called_again() -> None:
    s, effects = reply(started(), "", ("launch_rockets", {"n": 3}))
    assert effects == [CallModel(effect_id="m2")]
    msg = s.conversation[-1]
    assert msg.role == "tool" and msg.tool_call_id == "c0" and msg.name == "launch_rockets"
    assert msg.content.startswith("error: unknown tool 'launch_rockets'")
    assert "read, remember, search, set_plan" in msg.content
    assert s.model_errors == 1 and s.journal == {} and s.status == "running"


# -- malformed replies and budgets -------------------------------------------------


def test_empty_reply_is_an_error_for_the_model_then_fails_after_max_model_errors() -> None:
    limit = agent.budgets.max_model_errors
    s = started()
    for n in range(1, limit + 1):
        s, effects = reply(s, "   ")
        assert s.status == "running" and s.model_errors == n
        assert effects == [CallModel(effect_id=f"m{s.step}")]
        assert s.conversation[-1].role == "user"
        assert s.conversation[-1].content.startswith("error: your reply was empty")
    s, effects = reply(s, "")
    assert effects == [] and s.status == "failed" and s.pending == {}
    assert s.error is not None and "malformed" in s.error and "empty" in s.error


def test_zero_model_errors_allowed_fails_on_the_first() -> None:
    s, effects = reply(started(fresh(budgets=Budgets(max_model_errors=0))), "")
    assert s.status == "failed" and effects == []


def test_final_reply_finishes_with_the_result() -> None:
    s, effects = reply(started(), "the answer [06]")
    assert effects == [] and s.status == "finished" and s.result == "the answer [06]"
    assert s.pending == {} and s.error is None
    assert s.conversation[-1].content == "the answer [06]"


def test_model_failure_fails_the_run_with_the_error() -> None:
    s = started()
    s, effects = decide(s, ModelFailed(id="f", effect_id="m1", error="HTTP 500"))
    assert effects == [] and s.status == "failed" and "HTTP 500" in (s.error or "")


def test_step_budget_ends_the_run_as_failed_naming_the_budget() -> None:
    s = started(fresh(budgets=Budgets(max_steps=2)))
    s, effects = reply(s, "", ("remember", {"key": "k", "value": "v"}))  # step 2: allowed
    assert s.status == "running" and effects == [CallModel(effect_id="m2")]
    s, effects = reply(s, "", ("remember", {"key": "k2", "value": "v"}))  # step 3 > 2
    assert s.status == "failed" and effects == [] and s.pending == {}
    assert s.error == "budget exceeded: steps 3 > 2"


def test_token_budget_ends_the_run_as_failed_naming_the_budget() -> None:
    s = started(fresh(budgets=Budgets(max_tokens=100)))
    s, effects = reply(s, "", ("remember", {"key": "k", "value": "v"}), tokens=(60, 50))
    assert s.status == "failed" and effects == [] and s.pending == {}
    assert s.error == "budget exceeded: tokens 110 > 100"


def test_tool_call_budget_ends_the_run_as_failed_naming_the_budget() -> None:
    s = started(fresh(budgets=Budgets(max_tool_calls=1)))
    s, _ = reply(s, "", ("search", {"query": "a"}), ("search", {"query": "b"}))
    assert s.status == "failed" and s.pending == {}
    assert s.error == "budget exceeded: tool calls 2 > 1"


@pytest.mark.parametrize("budgets, tokens", [
    (Budgets(max_steps=1), (0, 0)),
    (Budgets(max_tokens=100), (60, 50)),
    (Budgets(max_tool_calls=1), (0, 0)),
])
def test_a_run_failed_on_a_budget_asks_for_no_tool_calls(budgets: Budgets,
                                                         tokens: tuple[int, int]) -> None:
    s = started(fresh(budgets=budgets))
    s, effects = reply(s, "", ("search", {"query": "a"}), ("search", {"query": "b"}), tokens=tokens)
    assert s.status == "failed"
    assert effects == []  # a failed run must not execute (possibly side-effecting) tools


# -- duplicates, cancellation, terminal states -------------------------------------


def test_duplicate_and_late_results_return_the_identical_state_and_no_effects() -> None:
    s, _ = reply(started(), "", ("search", {"query": "a"}), ("search", {"query": "b"}))
    s1, _ = result(s, "t2.0")
    late = [
        ToolResult(id="tool:t2.0", effect_id="t2.0", output="again"),  # applied already
        ToolResult(id="x", effect_id="t9.9", output="never asked"),
        ModelReply(id="reply:m1", effect_id="m1", message=ChatMessage(role="assistant", content="hi")),
        ModelFailed(id="failed:m1", effect_id="m1", error="late"),
    ]
    for msg in late:
        again, effects = decide(s1, msg)
        assert again is s1 and effects == [], msg


def test_cancel_cancels_the_run_and_drops_pending_effects() -> None:
    s, _ = reply(started(), "", ("search", {"query": "a"}))
    s, effects = decide(s, Cancel(id="cancel", reason="user asked"))
    assert s.status == "cancelled" and s.error == "user asked" and s.pending == {} and effects == []


ALL_MESSAGES = [
    Start(id="start-x", task="t"),
    ModelReply(id="r", effect_id="m1", message=ChatMessage(role="assistant", content="late")),
    ModelFailed(id="f", effect_id="m1", error="late"),
    ToolResult(id="t", effect_id="t2.0", output="late"),
    ChildResult(id="c", child_id="child-1", status="finished", answer="a"),
    Cancel(id="cancel"),
]


@pytest.mark.parametrize("status", TERMINAL)
def test_terminal_states_ignore_every_message(status: str) -> None:
    s = started().model_copy(update={"status": status})
    for msg in ALL_MESSAGES:
        again, effects = decide(s, msg)
        assert again is s and effects == [], msg
    assert recover(s) == (s, [])


# -- delegation ------------------------------------------------------------------------


def test_a_child_reaching_a_terminal_status_sends_its_result_to_the_parent() -> None:
    child = started(fresh("child-1", parent_id="parent-1"))
    s, effects = reply(child, "child answer")
    assert effects == [SendMessage(to="parent-1", message=ChildResult(
        id="result:child-1", child_id="child-1", status="finished", answer="child answer",
        steps=2))]
    # once terminal, nothing is sent again
    assert decide(s, Cancel(id="cancel")) == (s, [])


@pytest.mark.parametrize("end", ["cancel", "budget", "model_failed"])
def test_a_child_that_ends_badly_also_reports_to_its_parent(end: str) -> None:
    child = started(fresh("child-2", parent_id="parent-1", budgets=Budgets(max_steps=1)))
    if end == "cancel":
        s, effects = decide(child, Cancel(id="cancel", reason="parent cancelled"))
    elif end == "budget":
        s, effects = reply(child, "", ("remember", {"key": "k", "value": "v"}))
    else:
        s, effects = decide(child, ModelFailed(id="f", effect_id="m1", error="down"))
    sends = [e for e in effects if isinstance(e, SendMessage)]
    assert len(sends) == 1 and sends[0].to == "parent-1"
    msg = sends[0].message
    assert isinstance(msg, ChildResult)
    assert (msg.child_id, msg.status, msg.error) == ("child-2", s.status, s.error)
    assert s.status in ("cancelled", "failed")


def test_a_run_without_parent_sends_nothing_when_it_ends() -> None:
    _, effects = reply(started(), "done")
    assert effects == []


def test_a_child_result_is_applied_once() -> None:
    s = started().model_copy(update={"delegation": Delegation(pending={"child-1": "sub task",
                                                                       "child-2": "other"})})
    msg = ChildResult(id="result:child-1", child_id="child-1", status="finished", answer="A")
    s1, effects = decide(s, msg)
    assert effects == [] and s1.step == s.step + 1
    assert s1.delegation == Delegation(pending={"child-2": "other"}, done={"child-1": "finished"},
                                       results={"child-1": "A"}, order=("child-1",))
    for copy in (msg, msg.model_copy(update={"id": "resent", "answer": "B"})):
        again, effects = decide(s1, copy)
        assert again is s1 and effects == []


# -- recover ------------------------------------------------------------------------------


def test_recover_after_start_calls_the_model_again() -> None:
    s = started()
    assert recover(s) == (s, [CallModel(effect_id="m1")])


def test_recover_lists_every_pending_call() -> None:
    tools = {n: ToolInfo(name=n, side_effect=se) for n, se in
             [("fetch", "idempotent"), ("charge", "keyed"), ("email", "at_most_once")]}
    s, effects = reply(started(fresh(tools=tools)), "", ("fetch", {}), ("charge", {"cents": 5}),
                       ("email", {"to": "x"}))
    assert effects == [CallTool(effect_id=f"t2.{i}") for i in range(3)]
    assert recover(s) == (s, effects)
    s1, _ = result(s, "t2.1")
    assert recover(s1)[1] == [CallTool(effect_id="t2.0"), CallTool(effect_id="t2.2")]


def _three_tools() -> RunState:
    tools = {n: ToolInfo(name=n, side_effect=se) for n, se in
             [("fetch", "idempotent"), ("charge", "keyed"), ("email", "at_most_once")]}
    s, _ = reply(started(fresh(tools=tools)), "", ("fetch", {}), ("charge", {"cents": 5}),
                 ("email", {"to": "x"}))
    return s


def lost(eid: str, attempt: int = 1, started: bool = True) -> EffectLost:
    return EffectLost(id=f"lost:{eid}:{attempt}", effect_id=eid, attempt=attempt, started=started,
                      reason="executor died")


@pytest.mark.parametrize("eid", ["t2.0", "t2.1"])
def test_a_lost_idempotent_or_keyed_call_is_dispatched_again_with_its_key(eid: str) -> None:
    s = _three_tools()
    s1, effects = decide(s, lost(eid))
    assert effects == [CallTool(effect_id=eid)]
    assert s1.pending[eid].attempt == 2 and s1.step == s.step + 1
    assert s1.journal[eid].key == s.journal[eid].key  # the same idempotency key
    # the same report again, or one about the old attempt, changes nothing
    assert decide(s1, lost(eid)) == (s1, [])


def test_a_lost_at_most_once_call_that_started_is_in_doubt_never_rerun() -> None:
    s = _three_tools()
    s1, effects = decide(s, lost("t2.2", started=True))
    assert effects == []
    assert s1.journal["t2.2"].status == "in_doubt" and "t2.2" not in s1.pending
    assert "in doubt" in (s1.error or "")


def test_a_lost_at_most_once_call_that_never_started_is_dispatched_again() -> None:
    s = _three_tools()
    s1, effects = decide(s, lost("t2.2", started=False))
    assert effects == [CallTool(effect_id="t2.2")] and s1.pending["t2.2"].attempt == 2


def test_a_lost_model_call_is_called_again_and_a_call_lost_too_often_fails_the_run() -> None:
    s = started(fresh(budgets=Budgets(max_effect_attempts=3)))
    s1, effects = decide(s, lost("m1"))
    assert effects == [CallModel(effect_id="m1")] and s1.pending["m1"].attempt == 2
    s2, _ = decide(s1, lost("m1", 2))
    s3, effects = decide(s2, lost("m1", 3))
    assert effects == [] and s3.status == "failed"
    assert "model call m1 was lost 3 times" in (s3.error or "")
    # a late reply to the first attempt is still welcome while the call is pending
    late = ModelReply(id="reply:m1:1", effect_id="m1",
                      message=ChatMessage(role="assistant", content="done"))
    assert decide(s2, late)[0].status == "finished"


# -- a whole conversation, twice ---------------------------------------------------------------


async def _drive(state: RunState, task: str) -> RunState:
    """What the engine does, minus the store: decide, then perform effects one at a time."""
    model = ScriptedModel("research")
    queue: list[Any] = [Start(id=f"start:{state.run_id}", task=task)]
    while queue:
        state, effects = decide(state, queue.pop(0))
        for e in effects:
            if isinstance(e, CallModel):
                resp = await model.complete(ModelRequest(messages=state.conversation,
                                                         tools=agent.tool_schemas()))
                queue.append(ModelReply(id=f"reply:{e.effect_id}", effect_id=e.effect_id,
                                        message=resp.message, tokens_in=resp.tokens_in,
                                        tokens_out=resp.tokens_out))
            elif isinstance(e, CallTool):
                entry = state.journal[e.effect_id]
                ctx = ToolContext(run_id=state.run_id, call_id=e.effect_id, key=entry.key)
                out = await agent.tools[entry.tool].invoke(entry.arguments, ctx)
                queue.append(ToolResult(id=f"tool:{e.effect_id}", effect_id=e.effect_id, output=out))
    return state


def test_the_research_conversation_is_deterministic_through_decide() -> None:
    one = asyncio.run(_drive(fresh(), TASK))
    two = asyncio.run(_drive(fresh(), TASK))
    assert one == two
    assert one.status == "finished" and one.result is not None
    assert one.result.startswith(f"Answer to: {TASK}") and "Sources: " in one.result
    assert one.plan and one.memory  # it planned and took notes
    assert {e.tool for e in one.journal.values()} == {"search", "read"}
    assert all(e.status == "done" for e in one.journal.values())


def test_the_research_run_is_deterministic_through_the_engine() -> None:
    a = run_inline(MemoryStore(), agent, TASK, run_id="run-fixed", effect_concurrency=1)
    b = run_inline(MemoryStore(), agent, TASK, run_id="run-fixed", effect_concurrency=1)
    assert a.status == b.status == "finished"
    assert a.result == b.result and a.conversation == b.conversation
    assert (a.memory, a.plan, a.journal, a.usage, a.step) == (b.memory, b.plan, b.journal, b.usage, b.step)
    # and the engine takes exactly the path the pure loop takes
    pure = asyncio.run(_drive(fresh("run-fixed"), TASK))
    assert a.conversation == pure.conversation and a.journal == pure.journal and a.step == pure.step


def test_too_many_unknown_tool_calls_fail_the_run_naming_the_limit_and_the_last_problem() -> None:
    from undying.actors import Budgets, ChatMessage, ModelReply, RunState, Start, ToolCallRequest, decide
    from undying.actors.research import agent as research

    ctx = research.context().model_copy(update={"budgets": Budgets(max_model_errors=1)})
    s, _ = decide(RunState(run_id="r", context=ctx), Start(id="start", task="q"))
    for n in (1, 2):
        eid = next(iter(s.pending))
        call = ToolCallRequest(id=f"c{n}", name="frobnicate", arguments={})
        s, _ = decide(s, ModelReply(id=f"reply:{eid}", effect_id=eid,
                                    message=ChatMessage(role="assistant", tool_calls=(call,))))
    assert s.status == "failed"
    assert (s.error or "").startswith(
        "budget exceeded: malformed model turns 2 > 1, last: unknown tool 'frobnicate'; "
        "available: "), s.error
