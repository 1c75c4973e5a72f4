"""`ExecutorActor`: one per node, performs the model and tool calls of every run there.

An async actor: each call is a coroutine, thousands wait on model latency at
once in one process. When its process dies, Ray reports that at once (no Ray
restarts: a restartable actor's death is reported only after ~1.5 s); the
supervisor reports the calls it had claimed as lost (their runs decide, by
side-effect class, whether to run them again) and creates a new one, as does
the first host that needs it. A new incarnation also reports whatever claims
of earlier incarnations under its name are left, so no supervisor is needed
for that.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import ray

from undying.persistence import RedisStore

from ._executor import EffectRequest, Executor


@ray.remote(num_cpus=0, max_restarts=0, max_task_retries=0)
class ExecutorActor:
    def __init__(self, redis_url: str, name: str, options: dict[str, Any] | None = None) -> None:
        opts = dict(options or {})
        self.name = name
        self.store = RedisStore(redis_url)
        self.executor = Executor(self.store, name,
                                 concurrency=int(opts.get("executor_concurrency", 2000)),
                                 claim_lease_ms=int(opts.get("claim_lease_ms", 4000)),
                                 # the supervisor fires runs' timers: a long back-off
                                 # passivates its run instead of sleeping here
                                 passivate_waits=bool(opts.get("passivate_waits", True)))
        self.node_id = ray.get_runtime_context().get_node_id()
        self._boot: asyncio.Task[None] | None = None
        self.reported_lost = 0
        ray.get_runtime_context().current_actor.boot.remote()

    async def boot(self) -> int:
        if self._boot is None:
            self._boot = asyncio.get_running_loop().create_task(self._do_boot())
        await asyncio.shield(self._boot)
        return self.reported_lost

    async def _do_boot(self) -> None:
        self.reported_lost = await asyncio.to_thread(
            self.executor.report_lost, reason="its executor's process died")
        self._hb = asyncio.get_running_loop().create_task(self.executor.heartbeat_forever())

    async def perform(self, requests: list[EffectRequest]) -> int:
        if self._boot is None or not self._boot.done():
            await self.boot()
        self.executor.submit(requests)
        return len(requests)

    async def wait(self) -> None:
        """Never returns: a caller holding this call learns of the actor's death."""
        await asyncio.Event().wait()

    async def info(self) -> dict[str, Any]:
        return {"name": self.name, "pid": os.getpid(), "node_id": self.node_id,
                "incarnation": self.executor.incarnation, "in_flight": len(self.executor.claimed),
                "tasks": len(self.executor.tasks), "reported_lost": self.reported_lost,
                **self.executor.stats}
