"""Approvals as pure logic, and in process: a tool call that needs someone's decision waits,
holding nothing; approve runs it (once, for the exact arguments), reject tells the model."""

from __future__ import annotations

import time

from undying._approval_agents import payer
from undying.actors import decide, encode_message, load_state
from undying.actors._state import Approval, CallTool, ToolResult, args_hash
from undying.testing import MemoryStore, resume_inline, run_inline


def _approval(call: str, args: dict, approved: bool = True, by: str = "alice",
              reason: str = "") -> Approval:
    return Approval(id=f"approval:{call}", call_id=call, approved=approved, by=by,
                    at_ms=1, args_hash=args_hash(args), reason=reason)


def _waiting(store: MemoryStore, rid: str) -> tuple[str, dict]:
    state = load_state(store, rid)[0]
    (call, entry), = [(k, e) for k, e in state.journal.items() if e.status == "awaiting_approval"]
    return call, dict(entry.arguments)


def test_the_hash_is_of_the_exact_arguments() -> None:
    assert args_hash({"a": 1, "b": "x"}) == args_hash({"b": "x", "a": 1})
    assert args_hash({"a": 1}) != args_hash({"a": 2})


def test_a_call_that_needs_approval_waits_and_approve_runs_it_once_per_arguments() -> None:
    store = MemoryStore()
    state = run_inline(store, payer, "pay alice", run_id="pay")
    assert state.status == "waiting" and store.ledger("pay") == {}  # waits, nothing ran
    call, args = _waiting(store, "pay")
    assert args == {"cents": 500, "to": "alice"}
    assert [(r, c) for r, c, _ in store.approvals_pending()] == [("pay", call)]

    store.send("pay", encode_message(_approval(call, args), "pay"))
    state = resume_inline(store, "pay")
    # the second payment has other arguments: the first approval does not carry over
    assert state.status == "waiting" and sum(store.ledger("pay").values()) == 1
    call2, args2 = _waiting(store, "pay")
    assert call2 != call and args2 == {"cents": 700, "to": "alice"}
    # an approval of the first arguments is not one of these
    store.send("pay", encode_message(_approval(call2, args), "pay"))
    assert resume_inline(store, "pay").status == "waiting"
    store.send("pay", encode_message(_approval(call2, args2, by="bob"), "pay"))
    state = resume_inline(store, "pay")
    assert state.status == "finished" and state.result == (
        "paid 500 cents to alice; paid 700 cents to alice")
    assert sorted(store.ledger("pay").values()) == [1, 1]
    decided = {k: e.approval for k, e in state.journal.items()}
    assert decided[call]["by"] == "alice" and decided[call2]["by"] == "bob"
    assert decided[call2]["args_hash"] == args_hash(args2)
    assert store.approvals_pending() == []


def test_reject_tells_the_model_and_the_call_never_runs() -> None:
    store = MemoryStore()
    run_inline(store, payer, "pay alice", run_id="rej")
    call, args = _waiting(store, "rej")
    store.send("rej", encode_message(
        _approval(call, args, approved=False, by="carol", reason="too much"), "rej"))
    state = resume_inline(store, "rej")
    assert state.status == "finished" and store.ledger("rej") == {}
    assert "rejected by carol: too much" in (state.result or "")
    assert state.journal[call].status == "error" and state.journal[call].approval["by"] == "carol"


def test_decide_ignores_a_duplicate_or_a_stranger_decision() -> None:
    store = MemoryStore()
    run_inline(store, payer, "pay alice", run_id="dup")
    state = load_state(store, "dup")[0]
    call, args = _waiting(store, "dup")
    approved, effects = decide(state, _approval(call, args))
    assert effects == [CallTool(effect_id=call)] and approved.pending[call].attempt == 2
    assert decide(approved, _approval(call, args)) == (approved, [])
    assert decide(state, _approval("t99.0", args)) == (state, [])
    # a late needs-approval answer to the old dispatch changes nothing
    late = ToolResult(id="tool:x", effect_id="t99.0", needs_approval=True)
    assert decide(approved, late) == (approved, [])
    assert time.time() > 0
