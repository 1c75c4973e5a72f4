"""The systems of `python -m bench.peers` that run on Ray, in a worker process of their own
(which owns a private local Ray, so a hang can be ended by killing it):

  undying    the product: `undying.Undying(Settings(redis_url=..., namespace=...))`,
             `start` / `wait`; runs are started by the supervisor, and a run whose
             process is killed is brought back by undying itself, from its checkpoint
  ray-plain  the floor for Ray overhead: one Ray actor call per step (the actor does the
             model turn and the tool call and keeps the conversation in memory); no
             checkpoint, so nothing to resume from

Only the public API is used, so whatever shape the engine and its actors take (one actor
per run; warm hosts and shared executors) this measures the same thing. Model turns and
tool calls may run in any Ray worker process, so here every model turn appends its mark
to a file (``_peers_workload.MARK_FILES_ENV``), and every Ray worker imports the workload
module when it starts (Ray's ``worker_process_setup_hook``): a scripted policy is
registered by importing its module, and a process that only performs model calls may
otherwise never import it (it did not, during the pool/executor rewrite).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from . import _peers_workload as W
from . import _util as U


def worker_setup() -> None:
    """Ray's worker_process_setup_hook: register the ``bench-peers`` policy everywhere."""
    from . import _peers_workload  # noqa: F401


class RaySystems:
    def __init__(self, root: Path) -> None:
        import ray

        os.environ[W.MARK_FILES_ENV] = "1"  # before ray.init: Ray's workers inherit it
        U.ray_env()
        self.temp = root / "ray"
        self.temp.mkdir(parents=True, exist_ok=True)
        ray.init(address="local", include_dashboard=False, log_to_driver=False, num_cpus=2,
                 object_store_memory=100 << 20, namespace="undying-bench-peers",
                 _temp_dir=str(self.temp),
                 runtime_env={"worker_process_setup_hook": "bench._peers_ray.worker_setup"})
        self.clients: dict[str, Any] = {}
        self.actor: Any = None

    # -- undying ------------------------------------------------------------------------------

    def client(self, variant: dict[str, Any]) -> Any:
        from undying import Settings, Undying

        url = variant["redis_url"]
        if url not in self.clients:
            self.clients[url] = Undying(Settings(redis_url=url, namespace=variant["namespace"]))
        return self.clients[url]

    def run(self, system: str, n: int, key: str, variant: dict[str, Any],
            timeout: float) -> dict[str, Any]:
        if system == "ray-plain":
            return self._plain(n, key, timeout)
        ud = self.client(variant)
        t0 = time.monotonic()
        ud.start(W.agent, W.task_text(n, key), run_id=key)
        t_started = time.monotonic()
        res = ud.wait(key, timeout=timeout)
        t_end = time.monotonic()
        return {"t0": t0, "t_started": t_started, "t_end": t_end, "result": res.answer,
                "status": res.status, "run_error": None if res.error is None else str(res.error),
                "marks": W.read_marks(key)}

    def crash_and_resume(self, n: int, key: str, variant: dict[str, Any],
                         timeout: float) -> dict[str, Any]:
        """The process that performs the crash step's tool call SIGKILLs itself; undying
        brings the run back on its own. Timed from the kill (its time is in the marker)."""
        ud = self.client(variant)
        ud.start(W.agent, W.task_text(n, key), run_id=key)
        res = ud.wait(key, timeout=timeout)
        t_end = time.monotonic()
        killed = W.crash_time(key)
        if killed is None:
            raise RuntimeError(f"run {key} ended ({res.status}) without crashing")
        return {"t0": killed, "t_end": t_end, "result": res.answer, "status": res.status,
                "run_error": None if res.error is None else str(res.error),
                "marks": [m for m in W.read_marks(key) if m > killed]}

    # -- the plain actor ----------------------------------------------------------------------

    def _plain(self, n: int, key: str, timeout: float) -> dict[str, Any]:
        import ray

        if self.actor is None:
            self.actor = PlainAgent.remote()  # type: ignore[attr-defined]
            ray.get(self.actor.__ray_ready__.remote(), timeout=timeout)
        t0 = time.monotonic()
        k = 0
        while ray.get(self.actor.step.remote(key, n, k), timeout=timeout):
            k += 1
        t_end = time.monotonic()
        result = ray.get(self.actor.finish.remote(key), timeout=timeout)
        return {"t0": t0, "t_end": t_end, "result": result, "status": "finished",
                "marks": W.read_marks(key)}

    def close(self) -> None:
        import ray

        for c in self.clients.values():
            try:
                c.close()
            except Exception:
                pass
        ray.shutdown()
        U._kill_leftovers(str(self.temp))


def _plain_agent_class() -> Any:
    import ray

    @ray.remote(num_cpus=0, max_restarts=0, max_task_retries=0)
    class PlainAgent:
        """A run held in a Ray actor's memory: one call per step, nothing stored."""

        def __init__(self) -> None:
            self.convos: dict[str, list[dict[str, Any]]] = {}

        def step(self, key: str, n: int, k: int) -> bool:
            convo = self.convos.setdefault(key, [{"role": "user",
                                                  "content": W.task_text(n, key)}])
            content, call = W.model_turn(k, n, key)
            convo.append({"role": "assistant", "content": content, "tool_call": call})
            if call is None:
                return False
            convo.append({"role": "tool", "content": W.tool_result(k),
                          "tool_call_id": call["id"]})
            return True

        def finish(self, key: str) -> str:
            return str(self.convos.pop(key)[-1]["content"])

    return PlainAgent


PlainAgent = _plain_agent_class()
