"""The checkpoint store contract: one small protocol, one file per backend.

The store moves bytes; it knows nothing of agents. A run is stored as a
snapshot plus a journal of step deltas since that snapshot, a fencing epoch,
a status in the run index, an event stream, a durable inbox and an outbox of
messages not yet relayed. Every backend passes the same contract tests
(tests/integration/test_store_contract.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

TERMINAL = frozenset({"finished", "failed", "cancelled", "quarantined"})
STATUSES = ("pending", "running", "waiting", "finished", "failed", "cancelled", "quarantined")


@dataclass(frozen=True)
class Commit:
    """One step: everything in it is stored atomically, or nothing is."""

    epoch: int
    step: int
    status: str
    delta: bytes = b""
    snapshot: bytes = b""  # non-empty: a full snapshot replaces snapshot + journal
    events: tuple[bytes, ...] = ()
    outbox: tuple[tuple[str, bytes], ...] = ()  # (message id, encoded envelope)
    seen: tuple[str, ...] = ()  # ids of inbox messages this step consumed
    # model and tool calls this step dispatches: (effect id, attempt). Recorded with the
    # checkpoint so that a call lost with its executor (or never received) is noticed.
    effects: tuple[tuple[str, int], ...] = ()
    timers: tuple[tuple[str, int], ...] = ()  # (timer id, due ms): durable timers
    approvals: tuple[tuple[str, bool], ...] = ()  # (call id, now waiting for approval?)
    kind: str = ""  # the kind of message the step applied (counted by kind for metrics)


@dataclass(frozen=True)
class CommitResult:
    journal_bytes: int
    snapshot_bytes: int
    journal_len: int
    # the first commit after the supervisor restarted the run: ms since it noticed the death
    recovered_ms: int = -1


@dataclass(frozen=True)
class Loaded:
    run_id: str
    epoch: int
    step: int
    status: str
    snapshot: bytes
    snapshot_step: int
    deltas: tuple[bytes, ...]
    journal_bytes: int
    snapshot_bytes: int
    seen: frozenset[str]
    outbox: tuple[tuple[str, bytes], ...]
    agent: str
    parent: str


@dataclass(frozen=True)
class RunInfo:
    run_id: str
    status: str
    step: int = 0
    epoch: int = 0
    agent: str = ""
    parent: str = ""
    created_ms: int = 0
    updated_ms: int = 0
    reason: str = ""


@dataclass(frozen=True)
class Activation:
    """What taking a run's activation lease returned."""

    run_id: str
    epoch: int
    status: str
    clean: bool  # the previous activation ended cleanly (passivated or ended); False: it died
    step: int = 0  # the step the run's checkpoint is at


@dataclass(frozen=True)
class Claim:
    """An executor's claim on one dispatch of a model or tool call."""

    status: str  # "ok": run it; "skip": claimed already, superseded or answered; "gone": run ended
    current: str = ""


@dataclass(frozen=True)
class Delivery:
    """Where a message sent to a run went."""

    entry_id: str  # inbox entry id ("" when the run had ended and nothing was stored)
    route: str  # "queued" (the run will be activated), "active" (its host reads it), "ended"


@dataclass(frozen=True)
class InboxEntry:
    entry_id: str
    data: bytes


@dataclass(frozen=True)
class EventEntry:
    entry_id: str
    data: bytes


@dataclass
class WriteLog:
    """Names of the store writes made, in order (used by crash-point tests)."""

    writes: list[str] = field(default_factory=list)


@runtime_checkable
class CheckpointStore(Protocol):
    # checkpoints
    def create(self, run_id: str, snapshot: bytes, *, agent: str, parent: str = "",
               first_message: bytes = b"") -> None: ...
    def load(self, run_id: str) -> Loaded: ...
    def commit(self, run_id: str, c: Commit) -> CommitResult: ...
    def claim_epoch(self, run_id: str) -> int: ...
    def list_runs(self, status: str | None = None) -> list[RunInfo]: ...
    def info(self, run_id: str) -> RunInfo: ...
    def quarantine(self, run_id: str, reason: str) -> None: ...
    def delete(self, run_id: str) -> None: ...
    # messages
    def send(self, run_id: str, message: bytes) -> str: ...
    def read_inbox(self, run_id: str, after: str, count: int = 100) -> list[InboxEntry]: ...
    def mark_relayed(self, run_id: str, message_id: str) -> None: ...
    # history
    def read_events(self, run_id: str, after: str = "0-0", count: int = 1000,
                    block_ms: int | None = None) -> list[EventEntry]: ...


@runtime_checkable
class ActivationStore(CheckpointStore, Protocol):
    """What hosts, executors and the supervisor need beyond checkpoints: who hosts a run,
    the queue of runs to activate, dispatch records of model and tool calls, timers.

    A run is *active* while a host holds its lease (``ud:{R}:lease``), *queued* while it
    waits in the ready queue, *passivated* otherwise. A message to a passivated run queues
    it, atomically with storing the message, so no message is ever left unread.
    """

    def deliver(self, run_id: str, message: bytes) -> Delivery: ...
    def take(self, host: str, timeout_s: float) -> str | None: ...
    def activate(self, run_id: str, host: str, owner: str, ttl_ms: int) -> Activation | None: ...
    def passivate(self, run_id: str, epoch: int, cursor: str, host: str = "") -> str: ...
    def requeue(self, run_id: str, *, force: bool = False) -> str: ...
    def fx_claim(self, run_id: str, effect_id: str, attempt: int, executor: str,
                 lease_ms: int) -> Claim: ...
    def fx_complete(self, run_id: str, effect_id: str, attempt: int, executor: str,
                    message: bytes) -> Delivery: ...
    def fx_records(self, run_id: str) -> dict[str, str]: ...
