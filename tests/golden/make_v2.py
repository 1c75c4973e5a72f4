"""Writes the schema-v2 golden records once. Never run it again after they are committed:
a golden file is what a released version wrote, and the tests read it back forever.

    python -m tests.golden.make_v2        # refuses to overwrite an existing file
"""

from __future__ import annotations

import sys
from pathlib import Path

from undying.actors import (
    Budgets,
    ChatMessage,
    ChildResult,
    ModelReply,
    RunState,
    Start,
    ToolCallRequest,
    decide,
)
from undying.actors._engine import outbox_entries
from undying.actors._state import EffectLost, Envelope, ModelFailed, Spawn, StepEvent, Timer
from undying.actors.research import lead
from undying.persistence import diff_states, encode, pack

HERE = Path(__file__).resolve().parent / "v2"
RID = "golden-lead"


def records() -> dict[str, bytes]:
    ctx = lead.context().model_copy(update={"created_ms": 1700000000000,
                                            "deadline_ms": 1700000600000})
    s0 = RunState(run_id=RID, context=ctx)
    s1, _ = decide(s0, Start(id=f"start:{RID}", task="fencing tokens, and leases?"))
    call = ToolCallRequest(id="d0", name="delegate",
                           arguments={"tasks": ["fencing tokens", "leases"], "wait": "all"})
    s2, effects = decide(s1, ModelReply(
        id="reply:m1:1", effect_id="m1", tokens_in=100, tokens_out=20, cost_usd=0.0012,
        retries=({"attempt": 1, "kind": "http_429", "waited_s": 0.41, "status": 429,
                  "retry_after_s": 0.4, "model": "openai:gpt"},),
        message=ChatMessage(role="assistant", content="Delegating", tool_calls=(call,))))
    s3, _ = decide(s2, ChildResult(id=f"result:{RID}.2-0", child_id=f"{RID}.2-0",
                                   status="finished", answer="A fencing token [06]",
                                   tokens=900, steps=8))
    spawn = next(e.message for e in effects if isinstance(e.message, Spawn))
    (oid, outbox), = outbox_entries(RID, [next(e for e in effects if e.to == f"{RID}.2-1")])
    event = StepEvent(step=3, kind="child_result", status="running", epoch=4,
                      at_ms=1700000001000, duration_ms=0.8, delta_bytes=120,
                      summary="sub-agent ended (1 done, 1 pending)")
    msgs = {
        "spawn": spawn,
        "effect_lost": EffectLost(id="lost:m3:1", effect_id="m3", attempt=1, started=True,
                                  reason="executor undying-executor:n1 died"),
        "timer": Timer(id="timer:deadline", timer_id="deadline"),
        "model_failed": ModelFailed(id="failed:m5:2", effect_id="m5", malformed=True,
                                    error="MalformedOutput: tool call 'search' has arguments "
                                          "that are not valid JSON"),
    }
    out = {
        "snapshot_waiting.msgpack": encode("snapshot", s2, run_id=RID),
        "delta_child_result.msgpack": pack("delta", {"step": s3.step,
                                                     "ops": diff_states(s2, s3)}, run_id=RID),
        "snapshot_one_child_done.msgpack": encode("snapshot", s3, run_id=RID),
        "outbox_spawn.msgpack": outbox,
        "event.msgpack": encode("event", event, run_id=RID),
    }
    for name, m in msgs.items():
        out[f"message_{name}.msgpack"] = encode("message", Envelope(message=m), run_id=RID)
    assert oid and Budgets
    return out


def main() -> int:
    HERE.mkdir(exist_ok=True)
    recs = records()
    existing = [n for n in recs if (HERE / n).exists()]
    if existing:
        print(f"refusing to overwrite {existing}: golden files are written once", file=sys.stderr)
        return 1
    for name, raw in recs.items():
        (HERE / name).write_bytes(raw)
    print(f"wrote {len(recs)} v2 golden records to {HERE.name}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
