"""Helpers the fault tests share: where to aim a kill, and how to compare runs."""

from __future__ import annotations

import time

from undying import Undying

TASK = "How do fencing tokens stop zombie writers, and what does appendfsync always guarantee?"


def in_model_call(ud: Undying, run_id: str, min_step: int, timeout: float = 60) -> int:
    """Wait until the run has committed at least ``min_step`` and is inside a model call.

    Killing then lands in the (slow, scripted) model call, never inside a tool:
    a tool that completed but whose result was not yet committed would, being
    idempotent, rightly run again, and these tests require every tool exactly once.
    """
    deadline = time.monotonic() + timeout
    after = "0-0"
    while time.monotonic() < deadline:
        for entry in ud.store.read_events(run_id, after, 100, block_ms=200):
            after = entry.entry_id
            state = ud.state(run_id)
            if state.step >= min_step and any(p.kind == "model" for p in state.pending.values()):
                return state.step
    raise AssertionError(f"run {run_id} never reached step {min_step} in a model call")


def ledger_of(ud: Undying, run_id: str) -> dict[str, int]:
    """The run's tool ledger with the run id taken out of the keys, to compare runs."""
    return {k.replace(f"{run_id}:", ""): v for k, v in ud.ledger(run_id).items()}
