"""Test doubles users need too: a fake clock, the scripted model, an in-memory store,
a store that records its writes and crashes after the k-th, and an inline runner.

    from undying.testing import MemoryStore, run_inline
    state = run_inline(MemoryStore(), my_agent, "a task")
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from undying.actors import Agent, RunEngine, RunState, create_run
from undying.actors.scripted import POLICIES, ScriptedModel, policy
from undying.persistence import CheckpointStore, MemoryStore

__all__ = [
    "POLICIES",
    "CrashAfter",
    "FakeClock",
    "MemoryStore",
    "RecordingStore",
    "ScriptedModel",
    "SimulatedCrash",
    "policy",
    "resume_inline",
    "run_inline",
]


@dataclass
class FakeClock:
    now: float = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


class SimulatedCrash(BaseException):
    """Raised right after a chosen store write: the process 'dies' there.

    A BaseException so that no `except Exception` in the code under test can
    swallow it, as nothing can swallow a SIGKILL.
    """


_WRITES = ("create", "commit", "claim_epoch", "quarantine", "delete", "send", "mark_relayed")


@dataclass
class RecordingStore:
    """Wraps a store; records the name of every write, in order."""

    inner: Any
    writes: list[str] = field(default_factory=list)

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if name not in _WRITES:
            return attr

        def write(*args: Any, **kwargs: Any) -> Any:
            out = attr(*args, **kwargs)
            self.writes.append(name)
            self.after_write(len(self.writes), name)
            return out

        return write

    def after_write(self, n: int, name: str) -> None:
        pass


@dataclass
class CrashAfter(RecordingStore):
    """Crashes (raises `SimulatedCrash`) right after write number ``k`` (1-based)."""

    k: int = 1

    def after_write(self, n: int, name: str) -> None:
        if n == self.k:
            raise SimulatedCrash(f"crash after write {n} ({name})")


def run_inline(store: CheckpointStore, agent: Agent, task: str, *, run_id: str | None = None,
               **engine_options: Any) -> RunState:
    """Create a run and drive it to its end in this process, with no Ray."""
    rid = create_run(store, agent, task, run_id=run_id)
    return resume_inline(store, rid, **engine_options)


def resume_inline(store: CheckpointStore, run_id: str, **engine_options: Any) -> RunState:
    return asyncio.run(RunEngine(run_id, store, **engine_options).run())


# -- agents for fault tests (importable by every worker: they live in the package) --------


def _crash_process() -> str:
    import os
    import signal

    os.kill(os.getpid(), signal.SIGKILL)
    return "unreachable"


def _make_poison_agent() -> Agent:
    from undying.actors import Agent as _Agent
    from undying.actors import Budgets, ModelSpec, tool

    crash = tool(_crash_process, name="crash_process", side_effect="idempotent",
                 description="Kills the process that runs it (a poison pill for crash-loop tests).")
    return _Agent("poison", version="1", model=ModelSpec(provider="scripted", name="poison"),
                  tools=[crash], budgets=Budgets(max_steps=50), ref="undying.testing:poison_agent")


@policy("poison")
def _poison_policy(messages: Any, tools: Any) -> Any:
    from undying.actors import ChatMessage, ToolCallRequest

    return ChatMessage(role="assistant", tool_calls=(
        ToolCallRequest(id="p", name="crash_process", arguments={}),))


poison_agent = _make_poison_agent()
