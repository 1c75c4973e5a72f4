"""A run's state at any step, and forks: a new run that goes on from a step of another.

The store keeps each step's delta in the run's history and its first snapshot
as its origin (`undying.persistence._redis_history`), so the state after step S
is the origin with the deltas up to S applied, whatever compaction did since.

A fork starts from that state: its conversation, journal, memory, plan, usage
and finished sub-agents are the recorded ones, and nothing before S runs again.
What the run was waiting for at S runs fresh in the fork: its pending model and
tool calls are dispatched again (tool calls under the fork's own idempotency
keys), and its sub-agents still in flight at S are spawned again as the fork's
own children. A fork is a root run (no parent), gets a new id, and its own
wall-time budget from the moment it is made.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import msgpack

from undying.persistence import (
    CorruptCheckpoint,
    UndyingError,
    apply_delta,
    encode,
    unpack,
    validate,
)

from ._decide import DEADLINE, TERMINAL, _child_caps
from ._engine import outbox_entries
from ._state import Effect, PendingEffect, RunState, SendMessage, Spawn, StepEvent


class ForkError(UndyingError):
    pass


def new_fork_id() -> str:
    return f"fork-{uuid.uuid4().hex[:12]}"


def _kind_of(raw: bytes, run_id: str) -> str:
    try:
        env = msgpack.unpackb(raw, raw=False)
        return str(env["k"])
    except Exception:
        raise CorruptCheckpoint(run_id, "a history record is not a versioned record") from None


def state_at(store: Any, run_id: str, step: int) -> RunState:
    """The run's state right after ``step`` was committed."""
    meta, base, origin, records = store.history_records(run_id, step)
    last = int(meta.get("step", 0))
    if step < 0 or step > last:
        raise ForkError(f"run {run_id!r} has steps 0 to {last}, not {step}")
    if step < base:
        source = meta.get("forked_from", "")
        if not source:
            raise ForkError(f"run {run_id!r} keeps its history from step {base} on")
        return state_at(store, source, step)  # a fork's earlier steps are its source's
    if not origin:
        raise ForkError(f"run {run_id!r} has no stored origin: its history cannot be rebuilt")
    data = unpack("snapshot", origin, run_id=run_id)
    at = base
    for raw in records:
        if not raw:
            at += 1
            continue
        kind = _kind_of(raw, run_id)
        rec = unpack(kind, raw, run_id=run_id)
        if kind == "snapshot":
            data = rec
        else:
            if not isinstance(rec, dict) or not isinstance(rec.get("ops"), list):
                raise CorruptCheckpoint(run_id, f"history record of step {at + 1} has no ops")
            apply_delta(data, rec["ops"])
        at += 1
    if at != step:
        raise ForkError(f"run {run_id!r}: its history holds steps up to {at}, not {step} "
                        "(written by an undying that kept no history?)")
    state = validate("snapshot", RunState, data, run_id=run_id)
    if state.step != step:
        raise CorruptCheckpoint(run_id, f"history rebuilds step {state.step}, expected {step}")
    return state


def _renamed(child: str, src: str, dst: str) -> str:
    return dst + child[len(src):] if child.startswith(src + ".") else child


def fork_run(store: Any, run_id: str, at: int, *, new_id: str | None = None,
             now_ms: int | None = None) -> str:
    """Make a new run that starts from ``run_id``'s state after step ``at``; returns its id."""
    state = state_at(store, run_id, at)
    if state.status in TERMINAL:
        raise ForkError(f"run {run_id!r} had {state.status} at step {at}: fork it from an "
                        "earlier step")
    fid = new_id or new_fork_id()
    now = int(time.time() * 1000) if now_ms is None else now_ms
    src = state.run_id
    # what was in flight at `at` runs fresh: its calls under this run's keys, its
    # sub-agents as this run's own children
    journal = dict(state.journal)
    for eid in state.pending:
        entry = journal.get(eid)
        if entry is not None:
            update: dict[str, Any] = {"key": entry.key.replace(f"{src}:", f"{fid}:", 1)}
            if entry.status == "awaiting_approval":
                update["status"] = "intent"  # asked again: the fork's own approval
            journal[eid] = entry.model_copy(update=update)
    pending = {eid: PendingEffect(effect_id=eid, kind=p.kind, step=p.step)
               for eid, p in state.pending.items()}
    d = state.delegation
    moved = {c: _renamed(c, src, fid) for c in d.pending}
    groups = {gid: g.model_copy(update={"children": tuple(moved.get(c, c) for c in g.children)})
              for gid, g in d.groups.items()}
    delegation = d.model_copy(update={
        "pending": {moved[c]: t for c, t in d.pending.items()},
        "groups": groups,
        "group_of": {moved.get(c, c): g for c, g in d.group_of.items()},
    })
    ctx = state.context
    timers: tuple[tuple[str, int], ...] = ()
    if ctx.budgets.max_wall_s is not None:
        deadline = now + int(ctx.budgets.max_wall_s * 1000)
        ctx = ctx.model_copy(update={"deadline_ms": deadline})
        timers = ((DEADLINE, deadline),)
    new = state.model_copy(update={
        "run_id": fid, "parent_id": None, "inbox_cursor": "0-0", "journal": journal,
        "pending": pending, "delegation": delegation, "context": ctx})
    spawns: list[Effect] = []
    if delegation.pending:
        if ctx.subagent_ref is None:
            raise ForkError(f"run {run_id!r} has sub-agents in flight at step {at} but no "
                            "sub-agent to spawn again")
        caps = _child_caps(new, delegation.spawned, new.usage)
        spawns = [SendMessage(to=cid, message=Spawn(
            id=f"spawn:{cid}", task=task, parent_id=fid, agent_ref=ctx.subagent_ref,
            agent_version=ctx.subagent_version, budgets=caps, depth=ctx.depth + 1,
            deadline_ms=ctx.deadline_ms, model=ctx.subagent_model))
            for cid, task in sorted(delegation.pending.items())]
    snapshot = encode("snapshot", new, run_id=fid)
    event = StepEvent(step=at, kind="fork", status=new.status, epoch=0, at_ms=now,
                      snapshot_bytes=len(snapshot),
                      summary=f"forked from {run_id} at step {at}"[:300])
    store.create_fork(fid, snapshot, agent=ctx.agent_ref, step=at, status=new.status,
                      forked_from=run_id, event=encode("event", event, run_id=fid),
                      outbox=outbox_entries(fid, spawns),
                      effects=tuple((eid, 1) for eid in sorted(pending)),
                      timers=timers, now_ms=now)
    return fid
