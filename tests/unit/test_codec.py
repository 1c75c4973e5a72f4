"""The codec: versioned msgpack records of pydantic models that refuse what they do not know.

Every defect in a stored record must surface as `CorruptCheckpoint` naming the
run (so the run is quarantined and nothing else stops), never as a stray
KeyError or a msgpack exception.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import undying.persistence
from undying.actors import (
    Cancel,
    ChatMessage,
    ChildResult,
    JournalEntry,
    ModelReply,
    RunState,
    Start,
    StepEvent,
    ToolCallRequest,
    ToolResult,
)
from undying.actors._state import Delegation, Envelope, ModelFailed, PendingEffect, Usage
from undying.actors.research import agent
from undying.persistence import (
    SCHEMA_VERSION,
    CorruptCheckpoint,
    RecordTooLarge,
    decode,
    encode,
    pack,
    unpack,
)
from undying.persistence import _codec as codec

RID = "run-codec"


def rich_state() -> RunState:
    call = ToolCallRequest(id="c0", name="search", arguments={"query": "fencing", "limit": 2})
    return RunState(
        run_id=RID, parent_id="parent-1", status="running", task="what is fencing?", step=4,
        inbox_cursor="1700000000000-3",
        conversation=(ChatMessage(role="system", content="be brief"),
                      ChatMessage(role="user", content="what is fencing? ünïcødé ✓"),
                      ChatMessage(role="assistant", content="", tool_calls=(call,)),
                      ChatMessage(role="tool", content='{"hits": []}', tool_call_id="c0",
                                  name="search")),
        memory={"06-fencing-tokens": "A fencing token solves this."},
        plan=("what is fencing",),
        journal={"t2.0": JournalEntry(call_id="t2.0", model_call_id="c0", tool="search",
                                      arguments={"query": "fencing", "limit": 2}, key=f"{RID}:2:0",
                                      side_effect="idempotent", step=2, status="done",
                                      result='{"hits": []}')},
        delegation=Delegation(pending={"child-a": "sub"}, done={"child-b": "finished"},
                              results={"child-b": "42"}),
        pending={"m4": PendingEffect(effect_id="m4", kind="model", step=4)},
        context=agent.context(),
        usage=Usage(model_calls=1, tool_calls=1, tokens_in=100, tokens_out=20),
        model_errors=1,
    )


MESSAGES = [
    Start(id="start:r", task="a task"),
    ModelReply(id="reply:m1", effect_id="m1", tokens_in=3, tokens_out=4,
               message=ChatMessage(role="assistant", content="x", tool_calls=(
                   ToolCallRequest(id="c", name="read", arguments={"doc": "01"}),))),
    ModelFailed(id="failed:m1", effect_id="m1", error="HTTP 429", retryable=True),
    ToolResult(id="tool:t2.0", effect_id="t2.0", output="out"),
    ToolResult(id="tool:t2.1", effect_id="t2.1", error="boom"),
    ChildResult(id="result:c", child_id="c", status="failed", error="budget"),
    Cancel(id="cancel", reason="user"),
]


# -- round trips -------------------------------------------------------------------------


def test_run_state_round_trips() -> None:
    s = rich_state()
    raw = encode("snapshot", s, run_id=RID)
    assert decode("snapshot", RunState, raw, run_id=RID) == s
    envelope = msgpack.unpackb(raw, raw=False)
    assert envelope["v"] == SCHEMA_VERSION == 2 and envelope["k"] == "snapshot"


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: m.type)
def test_every_message_type_round_trips_in_its_envelope(msg: Any) -> None:
    back = decode("message", Envelope, encode("message", Envelope(message=msg), run_id=RID),
                  run_id=RID).message
    assert back == msg and type(back) is type(msg)


def test_step_event_round_trips() -> None:
    e = StepEvent(step=3, kind="tool_result", status="running", epoch=2, at_ms=1, duration_ms=1.5,
                  delta_bytes=120, summary="tool search: 10 chars")
    assert decode("event", StepEvent, encode("event", e, run_id=RID), run_id=RID) == e


# -- refusals --------------------------------------------------------------------------------


def _reject(raw: Any, kind: str = "snapshot", model: Any = RunState) -> CorruptCheckpoint:
    with pytest.raises(CorruptCheckpoint) as info:
        decode(kind, model, raw, run_id=RID)
    exc = info.value
    assert exc.run_id == RID and repr(RID) in str(exc)
    return exc


def _record(data: Any, *, v: Any = 1, k: str = "snapshot", **extra: Any) -> bytes:
    out: bytes = msgpack.packb({"v": v, "k": k, "d": data, **extra}, use_bin_type=True)
    return out


def test_truncated_record_is_corrupt() -> None:
    raw = encode("snapshot", rich_state(), run_id=RID)
    for cut in (0, 1, len(raw) // 2, len(raw) - 1):
        assert "not valid msgpack" in _reject(raw[:cut]).reason


def test_record_of_another_kind_is_corrupt() -> None:
    raw = encode("event", StepEvent(step=1, kind="start", status="running", epoch=1, at_ms=0))
    assert "expected a snapshot record, found 'event'" in _reject(raw).reason


def test_record_of_a_newer_schema_says_upgrade() -> None:
    exc = _reject(_record(rich_state().model_dump(mode="json"), v=SCHEMA_VERSION + 1))
    assert f"v{SCHEMA_VERSION + 1}" in exc.reason and "upgrade" in exc.reason


@pytest.mark.parametrize("version", [0, -1, "1", 1.0, True, None])
def test_record_with_an_invalid_version_is_corrupt(version: Any) -> None:
    assert "invalid version" in _reject(_record({}, v=version)).reason


@pytest.mark.parametrize("raw", [
    msgpack.packb({"run_id": RID}),  # the data with no envelope around it
    msgpack.packb({"v": 1, "k": "snapshot"}),  # no data
    msgpack.packb({"v": 1, "k": "snapshot", "d": {}, "x": 1}),  # an unknown envelope key
    msgpack.packb([1, "snapshot", {}]),
    msgpack.packb(7),
], ids=["bare", "no-data", "extra-key", "list", "int"])
def test_record_without_its_envelope_is_corrupt(raw: bytes) -> None:
    assert "no version envelope" in _reject(raw).reason


def test_a_field_failing_validation_is_corrupt_and_named() -> None:
    data = rich_state().model_dump(mode="json")
    data["step"] = "many"
    assert "fails its schema at step" in _reject(_record(data)).reason
    data = rich_state().model_dump(mode="json")
    data["conversation"][1]["role"] = "robot"
    assert "conversation.1.role" in _reject(_record(data)).reason


def test_an_unknown_field_is_refused() -> None:
    data = rich_state().model_dump(mode="json")
    data["surprise"] = True
    assert "surprise" in _reject(_record(data)).reason
    data = rich_state().model_dump(mode="json")
    data["usage"]["teleports"] = 1
    assert "usage.teleports" in _reject(_record(data)).reason


def test_an_unknown_message_type_is_refused() -> None:
    raw = _record({"message": {"type": "teleport", "id": "x"}}, k="message")
    _reject(raw, "message", Envelope)


def test_non_bytes_and_oversized_input_are_corrupt() -> None:
    _reject("a str")  # type: ignore[arg-type]
    _reject(None)  # type: ignore[arg-type]
    raw = encode("snapshot", rich_state(), run_id=RID)
    with pytest.raises(CorruptCheckpoint, match="exceeds"):
        decode("snapshot", RunState, raw, run_id=RID, limit=len(raw) - 1)


def test_pack_over_the_limit_raises_record_too_large() -> None:
    with pytest.raises(RecordTooLarge) as info:
        pack("delta", {"ops": [["s", "result", "x" * 1000]]}, run_id=RID, limit=500)
    assert info.value.run_id == RID and info.value.limit == 500 and info.value.size > 1000
    assert RID in str(info.value) and "by reference" in str(info.value)
    with pytest.raises(RecordTooLarge):
        encode("snapshot", rich_state(), run_id=RID, limit=100)
    assert unpack("delta", pack("delta", {"ops": []}, run_id=RID, limit=500), run_id=RID) == {"ops": []}


# -- migrations ------------------------------------------------------------------------------


def test_registered_migrations_lift_old_records(monkeypatch: pytest.MonkeyPatch) -> None:
    v2 = encode("snapshot", rich_state(), run_id=RID)  # written by this (v2) codec
    seen: list[int] = []

    def v2_to_v3(d: dict[str, Any]) -> dict[str, Any]:
        seen.append(2)
        return {**d, "task": d["task"] + " [v3]"}

    def v3_to_v4(d: dict[str, Any]) -> dict[str, Any]:
        seen.append(3)
        return {**d, "memory": {**d["memory"], "migrated": "yes"}}

    monkeypatch.setattr(codec, "SCHEMA_VERSION", 4)
    monkeypatch.setitem(codec.MIGRATIONS, ("snapshot", 2), v2_to_v3)
    monkeypatch.setitem(codec.MIGRATIONS, ("snapshot", 3), v3_to_v4)
    s = decode("snapshot", RunState, v2, run_id=RID)
    assert seen == [2, 3]
    assert s.task == "what is fencing? [v3]" and s.memory["migrated"] == "yes"
    # a v4 record is read as is; a v3 one starts at the second migration
    seen.clear()
    assert decode("snapshot", RunState, encode("snapshot", s), run_id=RID) == s and seen == []
    v3 = _record(rich_state().model_dump(mode="json"), v=3)
    assert decode("snapshot", RunState, v3, run_id=RID).memory["migrated"] == "yes" and seen == [3]
    # a v1 record goes through every step, the real v1 -> v2 first
    v1 = _record(rich_state().model_dump(mode="json"), v=1)
    seen.clear()
    assert decode("snapshot", RunState, v1, run_id=RID).task.endswith("[v3]") and seen == [2, 3]
    # migrations are per kind: an event of v2 has none here
    ev = _record({"step": 1, "kind": "k", "status": "running", "epoch": 1, "at_ms": 0}, v=2, k="event")
    assert "no migration for event v2" in _reject(ev, "event", StepEvent).reason


def test_migration_patches_are_gone_after_the_test() -> None:
    assert codec.SCHEMA_VERSION == 2 and ("snapshot", 2) not in codec.MIGRATIONS
    assert all((kind, 1) in codec.MIGRATIONS
               for kind in ("snapshot", "delta", "event", "message", "outbox"))


# -- fuzz: nothing but CorruptCheckpoint --------------------------------------------------------


VALID = encode("snapshot", rich_state(), run_id=RID)
VALID_MSG = encode("message", Envelope(message=MESSAGES[1]), run_id=RID)


def _decodes_or_is_corrupt(raw: bytes, kind: str = "snapshot", model: Any = RunState) -> None:
    try:
        out = decode(kind, model, raw, run_id=RID)
    except CorruptCheckpoint as exc:
        assert exc.run_id == RID
    else:
        assert isinstance(out, model)


FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.binary(max_size=600))
def test_random_bytes_are_corrupt(raw: bytes) -> None:
    _decodes_or_is_corrupt(raw)
    _decodes_or_is_corrupt(raw, "message", Envelope)


@FUZZ
@given(st.data())
def test_single_byte_mutations_are_corrupt_or_valid(data: st.DataObject) -> None:
    raw = data.draw(st.sampled_from([VALID, VALID_MSG]))
    kind, model = ("snapshot", RunState) if raw is VALID else ("message", Envelope)
    i = data.draw(st.integers(0, len(raw) - 1))
    b = data.draw(st.integers(0, 255))
    _decodes_or_is_corrupt(raw[:i] + bytes([b]) + raw[i + 1:], kind, model)


@FUZZ
@given(st.integers(0, len(VALID)), st.integers(0, len(VALID)))
def test_truncations_and_cut_outs_are_corrupt(a: int, b: int) -> None:
    _decodes_or_is_corrupt(VALID[:a])
    lo, hi = sorted((a, b))
    _decodes_or_is_corrupt(VALID[:lo] + VALID[hi:])


@FUZZ
@given(st.recursive(st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
                    | st.text(max_size=8) | st.binary(max_size=8),
                    lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=20))
def test_well_formed_envelopes_with_arbitrary_data_are_corrupt_or_valid(data: Any) -> None:
    _decodes_or_is_corrupt(_record(data))
    _decodes_or_is_corrupt(_record({"message": data}, k="message"), "message", Envelope)


# -- no pickle --------------------------------------------------------------------------------


FORBIDDEN = {"pickle", "cPickle", "_pickle", "cloudpickle", "dill", "marshal", "shelve", "jsonpickle"}


def _imports(source: str) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and getattr(node.func, "id", "") == "__import__":
            names.update(str(getattr(a, "value", "")) for a in node.args[:1])
    return names


def test_the_codec_does_not_import_pickle() -> None:
    source = inspect.getsource(codec)
    assert not _imports(source) & FORBIDDEN
    assert "pickle" not in source.replace("No pickle", "").replace("no pickle", "")


def test_no_persistence_module_imports_pickle() -> None:
    folder = Path(undying.persistence.__file__).parent
    for path in sorted(folder.glob("*.py")):
        assert not _imports(path.read_text()) & FORBIDDEN, path.name
