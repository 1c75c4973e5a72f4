"""`RunActor`: one named, detached Ray actor per run incarnation, a thin adapter around `RunEngine`.

Run actors use no Ray restarts and no task retries (RAY-NOTES: a Ray restart
re-runs the constructor with no state, and a task retry silently executes a
call twice). A run is recreated from its checkpoint instead, under a new
epoch that its launcher claims first. The actor's name carries that epoch
(``run:<id>@<epoch>``): a paused zombie keeps its own name, so the new
incarnation can start beside it, and the zombie's commits are then fenced.

The actor holds a lease in Redis while it runs. It exits when its run ends or
is fenced. On SIGTERM (a deploy, a drained node) Ray exits the worker and runs
its atexit hooks: the hook gives the lease back at once, so the supervisor
restarts the run without waiting out the lease; the step in progress is
either committed already or abandoned and redelivered.
"""

from __future__ import annotations

import asyncio
import atexit
import os
from typing import Any

import ray

from undying.persistence import Fenced, RedisStore

from ._engine import RunEngine

LEASE_TTL_S = 3.0


def actor_name(run_id: str, epoch: int) -> str:
    return f"run:{run_id}@{epoch}"


def new_run_actor(run_id: str, redis_url: str, epoch: int, namespace: str,
                  options: dict[str, Any], scheduling_strategy: Any = None) -> Any:
    """Create the detached actor of one incarnation; its launcher claimed ``epoch``."""
    extra = {} if scheduling_strategy is None else {"scheduling_strategy": scheduling_strategy}
    return RunActor.options(  # type: ignore[attr-defined, misc, operator]
        name=actor_name(run_id, epoch), namespace=namespace, lifetime="detached", **extra,
    ).remote(run_id, redis_url, epoch, options)


@ray.remote(num_cpus=0, max_restarts=0, max_task_retries=0)
class RunActor:
    def __init__(self, run_id: str, redis_url: str, epoch: int | None = None,
                 options: dict[str, Any] | None = None) -> None:
        self.run_id = run_id
        self.redis_url = redis_url
        self.epoch = epoch
        self.options = dict(options or {})
        self.engine: RunEngine | None = None
        self.task: asyncio.Task[Any] | None = None
        self.node_id = ray.get_runtime_context().get_node_id()
        atexit.register(self._drain)

    async def start(self) -> dict[str, Any]:
        """Activate the run and return once it is running; idempotent.

        The step loop runs as a task of the actor's own event loop, so it does
        not depend on the caller: a CLI that resumes a run and exits leaves the
        run going. (A call still queued at its caller when the caller exits is
        dropped by Ray, so callers wait for this one to return.)
        """
        if self.task is None:
            store = RedisStore(self.redis_url)
            ttl = self.options.get("lease_ttl_s", LEASE_TTL_S)
            self.engine = RunEngine(
                self.run_id, store,
                effect_concurrency=int(self.options.get("effect_concurrency", 8)),
                compact_ratio=float(self.options.get("compact_ratio", 2.0)),
                lease_ttl_s=float(ttl) if ttl else None,
                owner=f"{self.epoch}|{self.node_id}|{os.getpid()}")
            activated: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self.task = asyncio.get_running_loop().create_task(self._main(activated))
            await activated
            await asyncio.sleep(0)  # let a failed activation finish the task
        if self.task.done():
            return self.task.result()  # type: ignore[no-any-return]
        return await self.info()

    async def _main(self, activated: asyncio.Future[None]) -> dict[str, Any]:
        assert self.engine is not None
        try:
            try:
                await self.engine.activate(self.epoch)
            finally:
                if not activated.done():
                    activated.set_result(None)
            state = await self.engine.run()
            outcome = {"run_id": self.run_id, "status": state.status, "step": state.step}
        except Fenced as exc:
            outcome = {"run_id": self.run_id, "status": "fenced", "error": str(exc)}
        except Exception as exc:
            outcome = {"run_id": self.run_id, "status": "crashed",
                       "error": f"{type(exc).__name__}: {exc}"}
        # the work is done or owned by another incarnation: give the process back
        asyncio.get_running_loop().call_later(0.2, _exit_self)
        return outcome

    async def wait(self) -> dict[str, Any]:
        """Returns when the run ends here. Holding this call's reference tells the
        holder of the actor's death (ActorDiedError) without polling."""
        if self.task is None:
            await self.start()
        assert self.task is not None
        return await asyncio.shield(self.task)

    async def deliver(self) -> bool:
        """Wake-up: a message was stored in this run's inbox."""
        if self.engine is None or self.engine.state is None:
            return False
        self.engine.pull_inbox()
        return True

    async def info(self) -> dict[str, Any]:
        e = self.engine
        return {
            "run_id": self.run_id,
            "pid": os.getpid(),
            "node_id": self.node_id,
            "epoch": e.epoch if e else self.epoch,
            "step": e.state.step if e and e.state else 0,
            "status": e.state.status if e and e.state else "activating",
        }

    def _drain(self) -> None:
        e = self.engine
        if e is None or e.state is None or e.fenced is not None:
            return
        try:
            e.stop_reason = "draining"
            e.store.release_lease(self.run_id, e.epoch, done=False)  # type: ignore[attr-defined]
        except Exception:
            pass  # the lease then simply expires


def _exit_self() -> None:
    # exit_actor() only works from inside a method; a detached actor that is done
    # is killed through its own handle instead, which frees its name at once.
    try:
        ray.kill(ray.get_runtime_context().current_actor, no_restart=True)
    except Exception:
        os._exit(0)
