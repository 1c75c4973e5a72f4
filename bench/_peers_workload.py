"""The one workload every system of `python -m bench.peers` runs: the same scripted turns.

A run of N steps: step k (0 <= k < N) is one model turn (~1 KB of assistant text and
one call of the tool ``lookup(k)``) followed by that tool's result (~1 KB); then one
final model turn with no tool call ends the run. The texts are 1,000-character slices
of the bundled corpus, drawn once with a fixed seed when this module is imported, so
every system handles the same bytes. Each system calls these functions from its own
nodes, steps or tools:

    model_turn(k, n, tag)  what the model says at step k (the final answer at k == n)
    tool_result(k)         what the tool returns at step k
    maybe_crash(k, key)    SIGKILL this process in the tool call of a crash trial's step

Every model turn records ``time.monotonic()`` under the run's tag: in ``MARKS`` in this
process, or, where model turns run in Ray workers (``UNDYING_BENCH_MARK_FILES=1``),
appended to ``$UNDYING_BENCH_DIR/marks-<tag>.txt`` (one write of ~20 bytes). A run starts
at its first model turn. After a resume, the first model turn of the new incarnation
starts only once the redone tool result of the crash step is committed (each system runs
its next step after the previous one is stored, when its durability is synchronous), so
it marks the first newly committed step. On Linux ``time.monotonic`` is CLOCK_MONOTONIC,
one clock for every process of the machine, so marks taken in a Ray worker compare with
the driver's.

undying's side is here too: a scripted policy (``scripted:bench-peers``) and a
``@tool`` over the same functions, in an agent with an importable name.
"""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path
from typing import Any

from undying.actors import Agent, Budgets, ChatMessage, ToolCallRequest, ToolContext, tool
from undying.actors.scripted import policy

from ._util import corpus_texts

TEXT_SIZE = 1000
SEED = 11
MAX_STEPS = 1000
TOOL = "lookup"
BENCH_DIR_ENV = "UNDYING_BENCH_DIR"  # crash markers and marks files
MARK_FILES_ENV = "UNDYING_BENCH_MARK_FILES"

# 2 texts per step, drawn at import so that no step (and no resume) pays for it
TEXTS: tuple[str, ...] = tuple(corpus_texts(2 * MAX_STEPS, size=TEXT_SIZE, seed=SEED))

# tag -> time.monotonic() of each model turn of that run in this process
MARKS: dict[str, list[float]] = {}
_MARK_FDS: dict[str, int] = {}

_TASK = re.compile(r"through (\d+) lookups, one per step, then answer\. \(run ([\w.-]+)\)")
_CRASH = re.compile(r"-c(\d+)-")


def task_text(n: int, tag: str) -> str:
    if not 1 <= n <= MAX_STEPS:
        raise ValueError(f"n must be 1..{MAX_STEPS}, not {n}")
    return f"Work through {n} lookups, one per step, then answer. (run {tag})"


def parse_task(task: str) -> tuple[int, str]:
    m = _TASK.search(task)
    if not m:
        raise ValueError(f"not a bench task: {task[:80]!r}")
    return int(m.group(1)), m.group(2)


def model_turn(k: int, n: int, tag: str) -> tuple[str, dict[str, Any] | None]:
    """(content, tool call or None) of the model's turn at step ``k`` of ``n``."""
    now = time.monotonic()
    if os.environ.get(MARK_FILES_ENV) == "1":
        _append_mark(tag, now)
    else:
        MARKS.setdefault(tag, []).append(now)
    if k >= n:
        return f"Done: {n} lookups.", None
    return TEXTS[2 * k], {"id": f"call-{k}", "name": TOOL, "args": {"k": k}}


def tool_result(k: int) -> str:
    return TEXTS[2 * k + 1]


# -- crash trials ------------------------------------------------------------------------
# A key (run id, thread id, workflow id) names its crash step as "-c<k>-". A marker file
# per key makes the run crash once, not again when it is resumed; it holds the
# time.monotonic() of the kill.


def crash_key(prefix: str, tag: str, crash_at: int | None = None) -> str:
    return f"{prefix}-c{crash_at}-{tag}" if crash_at is not None else f"{prefix}-{tag}"


def _bench_dir() -> Path | None:
    d = os.environ.get(BENCH_DIR_ENV)
    return Path(d) if d else None


def maybe_crash(k: int, key: str) -> None:
    m = _CRASH.search(key)
    folder = _bench_dir()
    if m is None or int(m.group(1)) != k or folder is None:
        return
    marker = folder / f"crashed-{key}"
    if marker.exists():
        return
    marker.write_text(repr(time.monotonic()))
    os.kill(os.getpid(), signal.SIGKILL)


def crash_time(key: str) -> float | None:
    folder = _bench_dir()
    marker = folder / f"crashed-{key}" if folder else None
    return float(marker.read_text()) if marker is not None and marker.exists() else None


def _append_mark(tag: str, now: float) -> None:
    fd = _MARK_FDS.get(tag)
    if fd is None:
        folder = _bench_dir()
        if folder is None:
            return
        if len(_MARK_FDS) > 64:  # a long-lived worker: close the files of old runs
            for old in list(_MARK_FDS)[:32]:
                os.close(_MARK_FDS.pop(old))
        fd = _MARK_FDS[tag] = os.open(folder / f"marks-{tag}.txt",
                                      os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(fd, f"{now!r}\n".encode())  # one O_APPEND write: atomic across processes


def read_marks(tag: str) -> list[float]:
    """The marks of ``tag`` written to its file by any process, in time order."""
    folder = _bench_dir()
    path = folder / f"marks-{tag}.txt" if folder else None
    if path is None or not path.exists():
        return []
    return sorted(float(x) for x in path.read_text().split())


# -- undying: a scripted policy and a tool over the same functions ------------------------


@policy("bench-peers")
def _bench_policy(messages: tuple[ChatMessage, ...], tools: list[dict[str, Any]]) -> ChatMessage:
    # the conversation is [user, (assistant, tool) * k]: k steps are done
    n, tag = parse_task(messages[0].content)
    content, call = model_turn((len(messages) - 1) // 2, n, tag)
    if call is None:
        return ChatMessage(role="assistant", content=content)
    return ChatMessage(role="assistant", content=content, tool_calls=(
        ToolCallRequest(id=call["id"], name=call["name"], arguments=call["args"]),))


@tool(name=TOOL, side_effect="idempotent")
def _lookup(k: int, ctx: ToolContext) -> str:
    """Look up item k (the bench tool: a fixed ~1 KB text per k)."""
    maybe_crash(k, ctx.run_id)
    return tool_result(k)


agent = Agent("bench-peers", version="1", model="scripted:bench-peers", tools=[_lookup],
              memory=False,
              budgets=Budgets(max_steps=4 * MAX_STEPS + 10, max_tokens=10**12,
                              max_tool_calls=2 * MAX_STEPS + 10),
              ref="bench._peers_workload:agent")
