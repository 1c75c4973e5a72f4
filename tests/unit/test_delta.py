"""Step deltas: folding a delta onto the old state's plain data gives exactly the new state.

The updates are made copy-on-write, the way `decide` makes them, and every
delta goes through the real codec (pack/unpack) as it would through Redis.
"""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from undying.actors import ChatMessage, JournalEntry, RunState, ToolCallRequest
from undying.actors._state import Delegation, PendingEffect, Usage
from undying.actors.research import agent
from undying.persistence import apply_delta, diff_states, encode, pack, unpack

CONTEXT = agent.context().model_copy(update={"created_ms": 0})
RID = "run-delta"

text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
keys = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=12)
json_scalars = st.none() | st.booleans() | st.integers(-(2**53), 2**53) | text
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(keys, inner, max_size=3), max_leaves=8)

messages = st.builds(
    ChatMessage,
    role=st.sampled_from(["system", "user", "assistant", "tool"]),
    content=text,
    tool_calls=st.lists(st.builds(ToolCallRequest, id=keys, name=keys,
                                  arguments=st.dictionaries(keys, json_values, max_size=3)),
                        max_size=2).map(tuple),
    tool_call_id=st.none() | keys,
    name=st.none() | keys,
)
entries = st.builds(
    JournalEntry, call_id=keys, model_call_id=keys, tool=keys,
    arguments=st.dictionaries(keys, json_values, max_size=3), key=keys,
    side_effect=st.sampled_from(["pure", "idempotent", "keyed", "at_most_once"]),
    step=st.integers(0, 10_000),
    status=st.sampled_from(["intent", "done", "error", "in_doubt"]),
    result=st.none() | text, error=st.none() | text,
)
usages = st.builds(Usage, model_calls=st.integers(0, 10**6), tool_calls=st.integers(0, 10**6),
                   tokens_in=st.integers(0, 10**9), tokens_out=st.integers(0, 10**9))


@st.composite
def base_states(draw: st.DrawFn) -> RunState:
    return RunState(
        run_id=RID, task=draw(text), step=draw(st.integers(0, 100)),
        conversation=tuple(draw(st.lists(messages, max_size=4))),
        memory=draw(st.dictionaries(keys, text, max_size=4)),
        plan=tuple(draw(st.lists(text, max_size=3))),
        journal=draw(st.dictionaries(keys, entries, max_size=3)),
        pending={k: PendingEffect(effect_id=k, kind="tool", step=1)
                 for k in draw(st.lists(keys, max_size=2))},
        context=CONTEXT,
    )


UPDATES = ["append_messages", "truncate_conversation", "set_memory", "delete_memory",
           "add_journal", "replace_journal", "delete_journal", "pending", "scalars", "usage",
           "plan", "delegation", "nothing"]


def update_once(draw: st.DrawFn, s: RunState) -> RunState:
    """One copy-on-write update of the kind `decide` makes."""
    kind = draw(st.sampled_from(UPDATES))
    if kind == "append_messages":
        return s.model_copy(update={"conversation": (*s.conversation,
                                                     *draw(st.lists(messages, min_size=1, max_size=3)))})
    if kind == "truncate_conversation":
        return s.model_copy(update={"conversation": s.conversation[:draw(st.integers(0, 3))]})
    if kind == "set_memory":
        return s.model_copy(update={"memory": {**s.memory, draw(keys): draw(text)}})
    if kind == "delete_memory" and s.memory:
        gone = draw(st.sampled_from(sorted(s.memory)))
        return s.model_copy(update={"memory": {k: v for k, v in s.memory.items() if k != gone}})
    if kind == "add_journal":
        return s.model_copy(update={"journal": {**s.journal, draw(keys): draw(entries)}})
    if kind == "replace_journal" and s.journal:
        cid = draw(st.sampled_from(sorted(s.journal)))
        done = s.journal[cid].model_copy(update={"status": "done", "result": draw(text)})
        return s.model_copy(update={"journal": {**s.journal, cid: done}})
    if kind == "delete_journal" and s.journal:
        cid = draw(st.sampled_from(sorted(s.journal)))
        return s.model_copy(update={"journal": {k: v for k, v in s.journal.items() if k != cid}})
    if kind == "pending":
        eid = draw(keys)
        pending = {k: v for k, v in s.pending.items() if draw(st.booleans())}
        return s.model_copy(update={"pending": {**pending, eid: PendingEffect(
            effect_id=eid, kind=draw(st.sampled_from(["model", "tool"])), step=s.step + 1)}})
    if kind == "scalars":
        return s.model_copy(update=draw(st.fixed_dictionaries({}, optional={
            "step": st.integers(0, 10**6),
            "status": st.sampled_from(["running", "waiting", "finished", "failed"]),
            "task": text, "inbox_cursor": st.from_regex(r"\A[0-9]{1,13}-[0-9]{1,3}\Z"),
            "result": st.none() | text, "error": st.none() | text,
            "model_errors": st.integers(0, 5), "parent_id": st.none() | keys,
        })))
    if kind == "usage":
        return s.model_copy(update={"usage": draw(usages)})
    if kind == "plan":
        return s.model_copy(update={"plan": (*s.plan, draw(text)) if draw(st.booleans())
                                    else tuple(draw(st.lists(text, max_size=3)))})
    if kind == "delegation":
        d = s.delegation
        cid = draw(keys)
        return s.model_copy(update={"delegation": Delegation(
            pending={k: v for k, v in d.pending.items() if k != cid},
            done={**d.done, cid: "finished"}, results={**d.results, cid: draw(text)})})
    return s.model_copy()


@st.composite
def histories(draw: st.DrawFn) -> list[RunState]:
    states = [draw(base_states())]
    for _ in range(draw(st.integers(1, 5))):
        s = states[-1]
        for _ in range(draw(st.integers(1, 4))):
            s = update_once(draw, s)
        states.append(s)
    return states


def through_codec(ops: list[Any]) -> list[Any]:
    rec = unpack("delta", pack("delta", {"step": 0, "ops": ops}, run_id=RID), run_id=RID)
    assert isinstance(rec, dict)
    return list(rec["ops"])


PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(histories())
def test_a_delta_applied_to_the_old_data_gives_the_new_state(states: list[RunState]) -> None:
    for old, new in zip(states, states[1:], strict=False):
        ops = through_codec(diff_states(old, new))
        got = RunState.model_validate(apply_delta(old.model_dump(mode="json"), ops))
        assert got == new


@PROPERTY
@given(histories())
def test_a_journal_of_deltas_folds_onto_the_first_snapshot(states: list[RunState]) -> None:
    """What load_state does: snapshot + every delta since, in order."""
    raw = encode("snapshot", states[0], run_id=RID)
    data = unpack("snapshot", raw, run_id=RID)
    for old, new in zip(states, states[1:], strict=False):
        apply_delta(data, through_codec(diff_states(old, new)))
    assert RunState.model_validate(data) == states[-1]


@PROPERTY
@given(base_states())
def test_no_change_is_an_empty_delta(s: RunState) -> None:
    assert diff_states(s, s) == []
    assert diff_states(s, s.model_copy()) == []


def _message(i: int, size: int) -> ChatMessage:
    return ChatMessage(role="tool", content=(f"{i:06d} " * (size // 7 + 1))[:size],
                       tool_call_id=f"c{i}", name="read")


def test_appending_one_message_costs_that_message_not_the_run() -> None:
    old = RunState(run_id=RID, context=CONTEXT, step=1000,
                   conversation=tuple(_message(i, 1000) for i in range(1000)))
    new = old.model_copy(update={"conversation": (*old.conversation, _message(1000, 1024)),
                                 "step": 1001})
    delta = pack("delta", {"step": new.step, "ops": diff_states(old, new)}, run_id=RID)
    snapshot = encode("snapshot", new, run_id=RID)
    assert len(delta) < 1536, len(delta)
    assert len(delta) * 500 < len(snapshot)
    ops = unpack("delta", delta, run_id=RID)["ops"]
    assert RunState.model_validate(apply_delta(old.model_dump(mode="json"), ops)) == new


def test_one_step_of_memory_and_journal_writes_only_what_changed() -> None:
    entry = JournalEntry(call_id="t", model_call_id="c", tool="read", key="k", side_effect="idempotent",
                         step=1)
    old = RunState(run_id=RID, context=CONTEXT,
                   memory={f"k{i}": "x" * 500 for i in range(500)},
                   journal={f"t{i}": entry.model_copy(update={"call_id": f"t{i}"}) for i in range(500)})
    new = old.model_copy(update={
        "memory": {**old.memory, "new": "y"},
        "journal": {**old.journal, "t7": old.journal["t7"].model_copy(update={"status": "done"})}})
    delta = pack("delta", {"step": 1, "ops": diff_states(old, new)}, run_id=RID)
    assert len(delta) < 600, len(delta)


def test_a_change_deep_in_a_nested_model_writes_only_itself() -> None:
    """A sub-agent ledger of thousands of children: one result adds one entry per dict,
    not the whole ledger."""
    from undying.actors import RunState
    from undying.actors._state import Context, Delegation

    children = {f"root.2-{i}": f"task {i}" for i in range(2000)}
    old = RunState(run_id="root", context=Context(agent_ref="m:a", agent_version="1"),
                   delegation=Delegation(pending=children))
    d = old.delegation
    new = old.model_copy(update={"step": 1, "delegation": d.model_copy(update={
        "pending": {k: v for k, v in d.pending.items() if k != "root.2-7"},
        "done": {**d.done, "root.2-7": "finished"},
        "order": (*d.order, "root.2-7")})})
    ops = diff_states(old, new)
    assert ["m", "delegation.pending", {}, ["root.2-7"]] in ops
    assert ["m", "delegation.done", {"root.2-7": "finished"}, []] in ops
    assert ["a", "delegation.order", ["root.2-7"]] in ops
    assert len(pack("delta", {"ops": ops})) < 200
    data = old.model_dump(mode="json")
    assert RunState.model_validate(apply_delta(data, ops)) == new
