"""undying: durable execution for AI agents on Ray and Redis."""

from undying.actors import Agent, Budgets, ModelSpec, SecretRef, Tool, ToolContext, tool
from undying.cluster import Settings
from undying.persistence import (
    CorruptCheckpoint,
    Fenced,
    Quarantined,
    RunNotFound,
    StoreUnavailable,
    UndyingError,
)

from ._client import RunHandle, RunResult, RunTimeout, Undying, connect

__version__ = "0.1.0"

__all__ = [
    "Agent",
    "Budgets",
    "CorruptCheckpoint",
    "Fenced",
    "ModelSpec",
    "Quarantined",
    "RunHandle",
    "RunNotFound",
    "RunResult",
    "RunTimeout",
    "SecretRef",
    "Settings",
    "StoreUnavailable",
    "Tool",
    "ToolContext",
    "Undying",
    "UndyingError",
    "__version__",
    "connect",
    "tool",
]
