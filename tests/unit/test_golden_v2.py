"""Golden records of schema v2 (written once by tests/golden/make_v2.py, never regenerated):
a parent waiting on its sub-agents, a nested delta, the new messages. A change that can no
longer read them fails here, not in a user's Redis."""

from __future__ import annotations

import json
from pathlib import Path

import msgpack

from undying.actors import RunState, StepEvent
from undying.actors._state import EffectLost, Envelope, ModelFailed, Spawn, Timer
from undying.persistence import apply_delta, decode, unpack, validate

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "v2"
RID = "golden-lead"


def raw(name: str) -> bytes:
    return (GOLDEN / name).read_bytes()


def test_every_v2_golden_file_is_a_v2_record() -> None:
    names = sorted(p.name for p in GOLDEN.glob("*.msgpack"))
    assert len(names) == 9
    for name in names:
        assert msgpack.unpackb(raw(name), raw=False)["v"] == 2, name


def test_a_parent_waiting_on_its_sub_agents() -> None:
    s = decode("snapshot", RunState, raw("snapshot_waiting.msgpack"), run_id=RID)
    assert (s.status, s.step, s.pending) == ("running", 2, {})
    d = s.delegation
    assert d.pending == {f"{RID}.2-0": "fencing tokens", f"{RID}.2-1": "leases"}
    (gid, g), = d.groups.items()
    assert (gid, g.call_id, g.need, g.resolved, g.children) == (
        "d2.0", "d0", 2, False, (f"{RID}.2-0", f"{RID}.2-1"))
    assert d.group_of == {f"{RID}.2-0": "d2.0", f"{RID}.2-1": "d2.0"} and d.spawned == 2
    assert s.usage.cost_usd == 0.0012 and s.usage.retries == 1
    assert (s.context.deadline_ms, s.context.depth) == (1700000600000, 0)
    assert s.context.subagent_ref == "undying.actors.research:agent"


def test_a_nested_delta_folds_the_waiting_parent_into_one_child_done() -> None:
    rec = unpack("delta", raw("delta_child_result.msgpack"), run_id=RID)
    assert any(op[1] == "delegation.done" for op in rec["ops"])  # a dotted path
    data = unpack("snapshot", raw("snapshot_waiting.msgpack"), run_id=RID)
    folded = validate("snapshot", RunState, apply_delta(data, rec["ops"]), run_id=RID)
    want = decode("snapshot", RunState, raw("snapshot_one_child_done.msgpack"), run_id=RID)
    assert folded == want
    assert want.delegation.done == {f"{RID}.2-0": "finished"}
    assert want.delegation.tokens == 900 and want.delegation.ended == {"d2.0": 1}


def test_a_spawn_in_the_outbox_and_the_new_messages() -> None:
    data = unpack("outbox", raw("outbox_spawn.msgpack"), run_id=RID)
    assert data["to"] == f"{RID}.2-1"
    spawn = validate("message", Envelope, data["m"], run_id=RID).message
    assert isinstance(spawn, Spawn) and (spawn.task, spawn.depth, spawn.parent_id) == (
        "leases", 1, RID)
    assert spawn.budgets.max_children == 8 and spawn.deadline_ms == 1700000600000
    m = decode("message", Envelope, raw("message_spawn.msgpack"), run_id=RID).message
    assert isinstance(m, Spawn) and m.task == "fencing tokens"
    lost = decode("message", Envelope, raw("message_effect_lost.msgpack"), run_id=RID).message
    assert lost == EffectLost(id="lost:m3:1", effect_id="m3", attempt=1, started=True,
                              reason="executor undying-executor:n1 died")
    timer = decode("message", Envelope, raw("message_timer.msgpack"), run_id=RID).message
    assert timer == Timer(id="timer:deadline", timer_id="deadline")
    failed = decode("message", Envelope, raw("message_model_failed.msgpack"), run_id=RID).message
    assert isinstance(failed, ModelFailed) and failed.malformed and "not valid JSON" in failed.error


def test_event() -> None:
    e = decode("event", StepEvent, raw("event.msgpack"), run_id=RID)
    assert (e.step, e.kind, e.epoch, e.summary) == (3, "child_result", 4,
                                                    "sub-agent ended (1 done, 1 pending)")
    assert json.loads(json.dumps(e.model_dump(mode="json")))["delta_bytes"] == 120
