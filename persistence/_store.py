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


@dataclass(frozen=True)
class CommitResult:
    journal_bytes: int
    snapshot_bytes: int
    journal_len: int


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
