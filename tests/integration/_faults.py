"""Helpers the fault tests share: where to aim a kill, and how to compare runs."""

from __future__ import annotations

import contextlib
import os
import signal
import time
import uuid
from collections.abc import Iterator
from typing import Any

from undying import Settings, Undying
from undying.actors.pool import executor_name, shutdown_pool
from undying.persistence import TERMINAL, RunNotFound

TASK = "How do fencing tokens stop zombie writers, and what does appendfsync always guarantee?"


def in_model_call(ud: Undying, run_id: str, min_step: int, timeout: float = 60) -> int:
    """Wait until the run has committed at least ``min_step``, waits only on a model call,
    and an executor has claimed that call (it is running there).

    Killing the executor then lands in the (slow, scripted) model call, never inside a
    tool: a tool that completed but whose result was not yet stored would, being
    idempotent, rightly run again, and these tests require every tool exactly once.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = ud.state(run_id)
        if state.status in TERMINAL:
            break
        if state.step >= min_step and state.pending and all(
                p.kind == "model" for p in state.pending.values()):
            records = ud.store.fx_records(run_id)  # type: ignore[attr-defined]
            if all("|c|" in records.get(eid, "") for eid in state.pending):
                return state.step
        time.sleep(0.01)
    raise AssertionError(f"run {run_id} never reached step {min_step} in a model call")


def while_active(ud: Undying, run_id: str, timeout: float = 60,
                 min_step: int = 0) -> dict[str, Any]:
    """Wait until a host holds the run (use a pool with ``pause_after_commit_s``, so that
    the host is then paused between a commit and its relays and dispatches), and the run
    has committed at least ``min_step`` steps (a host caught just after activating it has
    committed nothing yet in that activation)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = ud.actor_info(run_id)
        if info is not None and info["pid"] and ud.info(run_id).step >= min_step:
            return info
        try:
            status = ud.info(run_id).status
        except RunNotFound:  # a child whose spawn is committed but not yet relayed
            time.sleep(0.01)
            continue
        if status in TERMINAL:
            raise AssertionError(f"run {run_id} ended before a host could be caught holding it")
        time.sleep(0.005)
    raise AssertionError(f"run {run_id} was never active")


def executor_pid(ud: Undying, node_id: str | None = None) -> int:
    import ray

    node = node_id or ray.get_runtime_context().get_node_id()
    h = ray.get_actor(executor_name(node), namespace=ud.settings.namespace)
    info: Any = ray.get(h.info.remote(), timeout=30)
    return int(info["pid"])


def kill(pid: int, sig: int = signal.SIGKILL) -> None:
    os.kill(pid, sig)


def ledger_of(ud: Undying, run_id: str) -> dict[str, int]:
    """The run's tool ledger with the run id taken out of the keys, to compare runs."""
    return {k.replace(f"{run_id}:", ""): v for k, v in ud.ledger(run_id).items()}


def calls_of(ud: Undying, run_id: str) -> dict[str, int]:
    """The ledger as the calls it counts, (tool, arguments), whatever their step numbers."""
    import json

    state = ud.state(run_id)
    by_key = {e.key: json.dumps([e.tool, e.arguments], sort_keys=True)
              for e in state.journal.values()}
    out: dict[str, int] = {}
    for k, n in ud.ledger(run_id).items():
        call = by_key.get(k.split("|", 1)[1], k)
        out[call] = out.get(call, 0) + n
    return out


@contextlib.contextmanager
def pool_client(redis_url: str, tag: str, *, policy: dict[str, Any] | None = None,
                **actor_options: Any) -> Iterator[Undying]:
    """A client on a namespace of its own, with its supervisor (which fires timers and
    restarts runs) and pool started; torn down (by handle) at the end."""
    client = Undying(Settings(redis_url=redis_url, namespace=f"{tag}-{uuid.uuid4().hex[:6]}"),
                     policy=policy, actor_options=actor_options)
    client.supervisor()
    try:
        yield client
    finally:
        teardown(client)


def teardown(ud: Undying) -> None:
    """Kill the namespace's supervisor and pool (by handle), close the client."""
    import ray

    if ray.is_initialized():
        try:
            ray.kill(ray.get_actor("undying-supervisor", namespace=ud.settings.namespace),
                     no_restart=True)
        except ValueError:
            pass
        shutdown_pool(ud.settings.namespace)
    ud.close()
