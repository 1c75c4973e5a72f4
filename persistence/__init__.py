"""Persistence: codec, checkpoint store on Redis, run index, event log, embedded Redis."""

from ._codec import MAX_RECORD_BYTES, SCHEMA_VERSION, decode, encode, pack, plain, unpack, validate
from ._delta import apply as apply_delta
from ._delta import diff as diff_states
from ._errors import (
    CorruptCheckpoint,
    Fenced,
    NeedsUpgrade,
    Quarantined,
    RecordTooLarge,
    RecordUnencodable,
    RunExists,
    RunNotFound,
    StepConflict,
    StoreUnavailable,
    UndyingError,
)
from ._store import (
    STATUSES,
    TERMINAL,
    CheckpointStore,
    Commit,
    CommitResult,
    EventEntry,
    InboxEntry,
    Loaded,
    RunInfo,
)
from .embedded import RedisServer, ensure_embedded, find_redis_server, free_port
from .memory_store import MemoryStore
from .redis_store import RedisStore

__all__ = [
    "MAX_RECORD_BYTES",
    "SCHEMA_VERSION",
    "STATUSES",
    "TERMINAL",
    "CheckpointStore",
    "Commit",
    "CommitResult",
    "CorruptCheckpoint",
    "EventEntry",
    "Fenced",
    "InboxEntry",
    "Loaded",
    "MemoryStore",
    "NeedsUpgrade",
    "Quarantined",
    "RecordTooLarge",
    "RecordUnencodable",
    "RedisServer",
    "RedisStore",
    "RunExists",
    "RunInfo",
    "RunNotFound",
    "StepConflict",
    "StoreUnavailable",
    "UndyingError",
    "apply_delta",
    "decode",
    "diff_states",
    "encode",
    "ensure_embedded",
    "find_redis_server",
    "free_port",
    "pack",
    "plain",
    "unpack",
    "validate",
]
