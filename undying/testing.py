"""Test doubles users need too: a fake clock, the scripted model, an in-memory store,
a store that records its writes and crashes after the k-th, and an inline runner.

    from undying.testing import MemoryStore, run_inline
    state = run_inline(MemoryStore(), my_agent, "a task")
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from undying.actors import Agent, RunState, create_run
from undying.actors.http_sink import HttpSink
from undying.actors.inline import run_until_done
from undying.actors.scripted import POLICIES, ScriptedModel, policy
from undying.persistence import CheckpointStore, MemoryStore

__all__ = [
    "POLICIES",
    "CrashAfter",
    "FakeClock",
    "HttpSink",
    "MemoryStore",
    "RecordingStore",
    "ScriptedModel",
    "SimulatedCrash",
    "echo_agent",
    "fanout_agent",
    "policy",
    "resume_inline",
    "run_inline",
    "sink_agent",
    "sink_answer",
    "sink_task",
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


_WRITES = ("create", "commit", "claim_epoch", "quarantine", "delete", "send", "deliver",
           "mark_relayed", "activate", "passivate", "requeue", "fx_claim", "fx_start", "fx_complete")


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
    """Crashes (raises `SimulatedCrash`) right after write number ``k`` (1-based), and on
    every write after it: a dead process writes nothing more, whichever task tries."""

    k: int = 1

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if name not in _WRITES:
            return attr

        def write(*args: Any, **kwargs: Any) -> Any:
            if len(self.writes) >= self.k:
                raise SimulatedCrash(f"write {name} after the crash at write {self.k}")
            out = attr(*args, **kwargs)
            self.writes.append(name)
            self.after_write(len(self.writes), name)
            return out

        return write

    def after_write(self, n: int, name: str) -> None:
        if n == self.k:
            raise SimulatedCrash(f"crash after write {n} ({name})")


def run_inline(store: CheckpointStore, agent: Agent, task: str, *, run_id: str | None = None,
               **options: Any) -> RunState:
    """Create a run and drive it (and any sub-agents it spawns) to its end in this process,
    with no Ray. Options: effect_concurrency, compact_ratio, model_factory, ledger."""
    rid = create_run(store, agent, task, run_id=run_id)
    return run_until_done(store, rid, **options)


def resume_inline(store: CheckpointStore, run_id: str, **options: Any) -> RunState:
    """Continue a run from its latest checkpoint in this process (after a crash, say)."""
    # whatever hosted it before is gone (this is a resume after a crash): take it over
    store.requeue(run_id, force=True)  # type: ignore[attr-defined]
    return run_until_done(store, run_id, recover=True, **options)


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


def fanout_agent(latency_s: float = 0.0, latency_max_s: float | None = None,
                 max_children: int = 5000, max_depth: int = 3,
                 max_wall_s: float | None = None) -> Agent:
    """A tree of sub-agents (scripted policy ``fanout``): give it the task
    ``undying.actors.scripted.fanout_task(width, depth, label)``. Every run of the tree makes
    its model calls with the given simulated latency."""
    from undying.actors import Agent as _Agent
    from undying.actors import Budgets, ModelSpec

    options: dict[str, Any] = {"latency_s": latency_s}
    if latency_max_s is not None:
        options["latency_max_s"] = latency_max_s
    spec = ModelSpec(provider="scripted", name="fanout", options=options)
    return _Agent("fanout", version="1", model=spec, subagent="undying.testing:fanout",
                  subagent_model=spec, budgets=Budgets(max_children=max_children,
                                                       max_depth=max_depth, max_steps=10_000,
                                                       max_wall_s=max_wall_s),
                  ref="undying.testing:fanout")


fanout = fanout_agent()


# -- side effects against a local HTTP sink (`HttpSink`) ------------------------------------


def sink_task(url: str, item: str, mode: str) -> str:
    """The task for `sink_agent`: deliver ``item`` to the sink at ``url`` once, with the
    ``keyed`` tool (``http_post``) or the ``at_most_once`` one (``http_post_once``)."""
    if mode not in ("keyed", "once"):
        raise ValueError(f"mode must be 'keyed' or 'once', not {mode!r}")
    return f"deliver {item} to {url} {mode}"


def sink_answer(item: str, output: str) -> str:
    """What `sink_agent` answers once its call returned ``output`` (a tool message's text)."""
    import json

    if output.startswith("error"):
        return f"{item}: not delivered: {output}"
    reply = json.loads(output)
    receipt = json.loads(reply["body"]).get("receipt") if reply["status"] == 200 else None
    return f"{item}: HTTP {reply['status']}, receipt {receipt}"


@policy("sink")
def _sink_policy(messages: Any, tools: Any) -> Any:
    """One delivery, then an answer built from what the sink said (no model turn in between
    depends on timing, so every run of one delivery answers the same)."""
    from undying.actors import ChatMessage, ToolCallRequest

    task = next(m.content for m in messages if m.role == "user")
    _, item, _, url, mode = task.split()
    results = [m for m in messages if m.role == "tool"]
    if results:
        return ChatMessage(role="assistant", content=sink_answer(item, results[-1].content))
    name = "http_post" if mode == "keyed" else "http_post_once"
    return ChatMessage(role="assistant", content=f"delivering {item}", tool_calls=(
        ToolCallRequest(id="d0", name=name, arguments={
            "url": f"{url}/deliveries", "body": {"key": item, "item": item}}),))


def _make_sink_agent() -> Agent:
    from undying.actors import Agent as _Agent
    from undying.actors import Budgets, ModelSpec
    from undying.actors.builtin_tools import http_post, http_post_once

    return _Agent("sink-client", version="1", model=ModelSpec(provider="scripted", name="sink"),
                  tools=[http_post, http_post_once], memory=False,
                  # the sink listens on a free loopback port, named in the task
                  config={"http_allow": ["127.0.0.1:*"], "http_timeout_s": 60,
                          "http_retries": 2},
                  budgets=Budgets(max_steps=20), ref="undying.testing:sink_agent")


sink_agent = _make_sink_agent()


# -- one model call and an answer (load tests: the model is all there is) ---------------------


@policy("echo")
def _echo_policy(messages: Any, tools: Any) -> Any:
    from undying.actors import ChatMessage

    task = next((m.content for m in messages if m.role == "user"), "")
    return ChatMessage(role="assistant", content=f"echo: {task}")


def _make_echo_agent() -> Agent:
    from undying.actors import Agent as _Agent
    from undying.actors import ModelSpec

    # runs override the model (a provider's URL is configuration): the spec travels in the
    # run's checkpoint; executors import this module only for its tools (none) and policies
    return _Agent("echo", version="1", model=ModelSpec(provider="scripted", name="echo"),
                  memory=False, ref="undying.testing:echo_agent")


echo_agent = _make_echo_agent()
