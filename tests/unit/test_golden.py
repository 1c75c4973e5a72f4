"""Golden records of schema v1, written once by the v1 encoder and never regenerated.

A change to the models or the codec that can no longer read v1 data fails
here, not in a user's Redis. When the schema moves to v2, keep these files
(add a migration in `_codec.MIGRATIONS`) and add a tests/golden/v2 beside them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgpack
import pytest

from undying.actors import (
    Cancel,
    ChildResult,
    ModelReply,
    RunState,
    Start,
    StepEvent,
    ToolResult,
    load_state,
)
from undying.actors._state import Envelope, ModelFailed
from undying.persistence import Commit, MemoryStore, apply_delta, decode, unpack, validate

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "v1"
RID = "golden-run"
ANSWER = "A fencing token rejects zombie writers [06-fencing-tokens]"
HITS = '{"query": "fencing token", "hits": [{"doc": "06-fencing-tokens", "score": 1.5}]}'

KINDS = {
    "snapshot_running.msgpack": "snapshot",
    "snapshot_finished.msgpack": "snapshot",
    "delta_finish.msgpack": "delta",
    "event.msgpack": "event",
    "outbox.msgpack": "outbox",
    **{f"message_{t}.msgpack": "message" for t in
       ("start", "model_reply", "model_failed", "tool_result", "child_result", "cancel")},
}


def raw(name: str) -> bytes:
    return (GOLDEN / name).read_bytes()


def test_every_golden_file_is_here_and_is_a_v1_record_of_its_kind() -> None:
    assert sorted(p.name for p in GOLDEN.glob("*.msgpack")) == sorted(KINDS)
    for name, kind in KINDS.items():
        envelope = msgpack.unpackb(raw(name), raw=False)
        assert (envelope["v"], envelope["k"]) == (1, kind), name


def test_finished_snapshot() -> None:
    s = decode("snapshot", RunState, raw("snapshot_finished.msgpack"), run_id=RID)
    assert (s.run_id, s.parent_id, s.status, s.step, s.task) == (
        RID, "golden-parent", "finished", 5, "What is a fencing token?")
    assert s.result == ANSWER and s.error is None and s.pending == {}
    assert s.inbox_cursor == "1700000000000-1"
    assert [m.role for m in s.conversation] == [
        "system", "user", "assistant", "tool", "tool", "assistant", "tool", "assistant"]
    assert [c.name for c in s.conversation[2].tool_calls] == ["set_plan", "search"]
    assert s.conversation[2].tool_calls[1].arguments == {"query": "fencing token"}
    assert (s.conversation[4].tool_call_id, s.conversation[4].name, s.conversation[4].content) == (
        "s0", "search", HITS)
    assert s.memory == {"06-fencing-tokens": "A fencing token solves this."}
    assert s.plan == ("fencing token",)
    entry = s.journal["t2.1"]
    assert (entry.tool, entry.key, entry.status, entry.side_effect, entry.step, entry.result) == (
        "search", "golden-run:2:1", "done", "idempotent", 2, HITS)
    assert s.delegation.done == {"golden-child": "finished"}
    assert s.delegation.results == {"golden-child": "42"}
    u = s.usage
    assert (u.model_calls, u.tool_calls, u.tokens_in, u.tokens_out) == (3, 1, 570, 120)
    ctx = s.context
    assert (ctx.agent_ref, ctx.agent_version, ctx.created_ms) == (
        "undying.actors.research:agent", "1", 1700000000000)
    assert (ctx.model.provider, ctx.model.name) == ("scripted", "research")
    assert {n: (t.side_effect, t.builtin) for n, t in ctx.tools.items()} == {
        "search": ("idempotent", False), "read": ("idempotent", False),
        "remember": ("pure", True), "set_plan": ("pure", True)}
    assert ctx.budgets.max_steps == 60 and ctx.budgets.max_model_errors == 3


def test_running_snapshot_waits_for_its_model_call() -> None:
    s = decode("snapshot", RunState, raw("snapshot_running.msgpack"), run_id=RID)
    assert (s.status, s.step, s.result) == ("running", 4, None)
    assert {k: (p.kind, p.step) for k, p in s.pending.items()} == {"m4": ("model", 4)}


def test_delta_folds_the_running_snapshot_into_the_finished_one() -> None:
    rec = unpack("delta", raw("delta_finish.msgpack"), run_id=RID)
    assert rec["step"] == 5 and {op[0] for op in rec["ops"]} <= {"a", "m", "s"}
    data = unpack("snapshot", raw("snapshot_running.msgpack"), run_id=RID)
    folded = validate("snapshot", RunState, apply_delta(data, rec["ops"]), run_id=RID)
    assert folded == decode("snapshot", RunState, raw("snapshot_finished.msgpack"), run_id=RID)


def test_v1_records_load_through_a_store() -> None:
    """The read path a resumed run takes: snapshot + journal from the store, via load_state."""
    store = MemoryStore()
    store.create(RID, raw("snapshot_running.msgpack"), agent="undying.actors.research:agent")
    epoch = store.claim_epoch(RID)
    for step in (1, 2, 3):
        store.commit(RID, Commit(epoch=epoch, step=step, status="running"))
    store.commit(RID, Commit(epoch=epoch, step=4, status="running", snapshot=raw("snapshot_running.msgpack")))
    store.commit(RID, Commit(epoch=epoch, step=5, status="finished", delta=raw("delta_finish.msgpack"),
                             events=(raw("event.msgpack"),), outbox=(("o1", raw("outbox.msgpack")),)))
    state, loaded = load_state(store, RID)
    assert state.status == "finished" and state.result == ANSWER
    assert len(loaded.deltas) == 1 and loaded.outbox == (("o1", raw("outbox.msgpack")),)


def test_event() -> None:
    e = decode("event", StepEvent, raw("event.msgpack"), run_id=RID)
    assert (e.step, e.kind, e.status, e.epoch, e.at_ms, e.duration_ms, e.summary) == (
        5, "model_reply", "finished", 1, 1700000000500, 1.25, "finished")
    assert e.delta_bytes == len(raw("delta_finish.msgpack")) and e.snapshot_bytes == 0


def test_outbox_entry_carries_the_childs_result() -> None:
    data = unpack("outbox", raw("outbox.msgpack"), run_id=RID)
    assert data["to"] == "golden-parent"
    msg = validate("message", Envelope, data["m"], run_id=RID).message
    assert msg == ChildResult(id="result:golden-run", child_id="golden-run", status="finished",
                              answer=ANSWER)


EXPECTED: dict[str, Any] = {
    "start": Start(id="start:golden-run", task="What is a fencing token?"),
    "model_failed": ModelFailed(id="failed:m9", effect_id="m9", error="HTTP 429", retryable=True),
    "tool_result": ToolResult(id="tool:t2.1", effect_id="t2.1", output=HITS),
    "child_result": ChildResult(id="result:golden-child", child_id="golden-child", status="failed",
                                error="budget exceeded: steps 61 > 60"),
    "cancel": Cancel(id="cancel:1", reason="operator"),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_message_envelopes(name: str) -> None:
    msg = decode("message", Envelope, raw(f"message_{name}.msgpack"), run_id=RID).message
    assert msg == EXPECTED[name] and msg.type == name


def test_model_reply_envelope() -> None:
    msg = decode("message", Envelope, raw("message_model_reply.msgpack"), run_id=RID).message
    assert isinstance(msg, ModelReply)
    assert (msg.id, msg.effect_id, msg.tokens_in, msg.tokens_out) == ("reply:m1", "m1", 120, 30)
    assert msg.message.role == "assistant" and msg.message.content == "Plan: fencing token"
    assert [(c.id, c.name, json.dumps(c.arguments)) for c in msg.message.tool_calls] == [
        ("plan", "set_plan", '{"steps": ["fencing token"]}'),
        ("s0", "search", '{"query": "fencing token"}')]
