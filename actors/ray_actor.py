"""`RunActor`: one named, detached Ray actor per run, a thin adapter around `RunEngine`.

Run actors use no Ray restarts and no task retries (RAY-NOTES: a Ray restart
re-runs the constructor with no state, and a task retry silently executes a
call twice). The actor is recreated from its checkpoint instead, under a new
epoch, by whoever resumes the run. It exits when its run ends or when a
commit is fenced (another incarnation owns the run).
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import ray
from undying.persistence import Fenced, RedisStore

from ._engine import RunEngine

NAMESPACE_DEFAULT = "undying"


def actor_name(run_id: str) -> str:
    return f"run:{run_id}"


@ray.remote(num_cpus=0, max_restarts=0, max_task_retries=0)
class RunActor:
    def __init__(self, run_id: str, redis_url: str, options: dict[str, Any] | None = None) -> None:
        self.run_id = run_id
        self.redis_url = redis_url
        self.options = dict(options or {})
        self.engine: RunEngine | None = None
        self.task: asyncio.Task[Any] | None = None

    async def run(self) -> dict[str, Any]:
        """Activate the run and handle its messages until it ends; then the actor exits.

        The caller may hold this call's reference to learn of the actor's death
        (it fails with ActorDiedError) without polling.
        """
        if self.task is None:
            store = RedisStore(self.redis_url)
            self.engine = RunEngine(
                self.run_id, store,
                effect_concurrency=int(self.options.get("effect_concurrency", 8)),
                compact_ratio=float(self.options.get("compact_ratio", 2.0)))
            self.task = asyncio.get_running_loop().create_task(self.engine.run())
        try:
            state = await asyncio.shield(self.task)
            outcome = {"run_id": self.run_id, "status": state.status, "step": state.step}
        except Fenced as exc:
            outcome = {"run_id": self.run_id, "status": "fenced", "error": str(exc)}
        # the work is done or owned by another incarnation: give the process back
        asyncio.get_running_loop().call_later(0.05, _exit_self)
        return outcome

    async def deliver(self) -> bool:
        """Wake-up: a message was stored in this run's inbox."""
        if self.engine is None or self.engine.state is None:
            return False
        self.engine.pull_inbox()
        return True

    async def info(self) -> dict[str, Any]:
        e = self.engine
        ctx = ray.get_runtime_context()
        return {
            "run_id": self.run_id,
            "pid": os.getpid(),
            "node_id": ctx.get_node_id(),
            "epoch": e.epoch if e else 0,
            "step": e.state.step if e and e.state else 0,
            "status": e.state.status if e and e.state else "activating",
        }


def _exit_self() -> None:
    # exit_actor() only works from inside a method; a detached actor that is done
    # is killed through its own handle instead, which frees its name at once.
    try:
        ray.kill(ray.get_runtime_context().current_actor, no_restart=True)
    except Exception:
        os._exit(0)
