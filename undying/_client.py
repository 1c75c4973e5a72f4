"""The Python API: start runs, wait for them, read their status and history, resume them.

    import undying
    from undying.actors.research import agent

    ud = undying.connect()                 # embedded Redis + local Ray by default
    run = ud.start(agent, "What is a fencing token?")
    print(run.result(timeout=60).answer)

The CLI is a thin layer over this module.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from undying.actors import Agent, RunState, StepEvent, create_run, encode_message, load_state
from undying.actors._state import Cancel
from undying.cluster import Settings, connect_store, init_ray
from undying.persistence import TERMINAL, CheckpointStore, RunInfo, UndyingError, decode


class RunTimeout(UndyingError):
    pass


@dataclass(frozen=True)
class RunResult:
    run_id: str
    status: str
    answer: str | None
    error: str | None
    steps: int
    tokens: int
    tool_calls: int


class Undying:
    def __init__(self, settings: Settings | None = None, *, store: CheckpointStore | None = None,
                 actor_options: dict[str, Any] | None = None, supervise: bool = True,
                 policy: dict[str, Any] | None = None) -> None:
        """``supervise``: runs are started by the cluster's supervisor, which restarts them
        when they die. Without it a dead run waits for `resume`."""
        self.settings = settings or Settings.from_env()
        self.store = store if store is not None else connect_store(self.settings)
        self.redis_url: str = getattr(self.store, "url", "")
        self.actor_options = dict(actor_options or {})
        self.supervise = supervise
        self.policy = policy
        self._refs: dict[str, Any] = {}
        self._supervisor: Any = None

    # -- runs -----------------------------------------------------------------

    def start(self, agent: Agent, task: str, *, run_id: str | None = None) -> RunHandle:
        rid = create_run(self.store, agent, task, run_id=run_id)
        self._start(rid)
        return RunHandle(self, rid)

    def resume(self, run_id: str) -> RunHandle:
        """Start a new incarnation from the latest checkpoint, unless one is alive."""
        info = self.store.info(run_id)
        if info.status not in TERMINAL:
            self._start(run_id)
        return RunHandle(self, run_id)

    def handle(self, run_id: str) -> RunHandle:
        self.store.info(run_id)  # raises RunNotFound
        return RunHandle(self, run_id)

    def cancel(self, run_id: str, reason: str = "cancelled by user") -> None:
        self.send(run_id, Cancel(id=f"cancel:{run_id}", reason=reason))

    def send(self, run_id: str, message: Any) -> str:
        eid = self.store.send(run_id, encode_message(message, run_id))
        actor = self._find_actor(run_id)
        if actor is not None:
            actor.deliver.remote()
        return eid

    # -- reading ----------------------------------------------------------------

    def runs(self, status: str | None = None) -> list[RunInfo]:
        return self.store.list_runs(status)

    def info(self, run_id: str) -> RunInfo:
        return self.store.info(run_id)

    def state(self, run_id: str) -> RunState:
        return load_state(self.store, run_id)[0]

    def history(self, run_id: str) -> list[StepEvent]:
        self.store.info(run_id)
        out: list[StepEvent] = []
        after = "0-0"
        while True:
            batch = self.store.read_events(run_id, after, 1000)
            out.extend(decode("event", StepEvent, e.data, run_id=run_id) for e in batch)
            if len(batch) < 1000:
                return out
            after = batch[-1].entry_id

    def watch(self, run_id: str, after: str = "0-0", timeout: float | None = None):
        """Yield (entry id, event) as the run commits steps; stop when it ends."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = 1000 if deadline is None else int(max(0.0, deadline - time.monotonic()) * 1000)
            if deadline is not None and remaining <= 0:
                raise RunTimeout(f"run {run_id!r} did not end within {timeout}s")
            batch = self.store.read_events(run_id, after, 100, block_ms=max(1, min(remaining, 1000)))
            for e in batch:
                after = e.entry_id
                ev = decode("event", StepEvent, e.data, run_id=run_id)
                yield e.entry_id, ev
                if ev.status in TERMINAL:
                    return
            if not batch and self.store.info(run_id).status in TERMINAL:
                return

    def wait(self, run_id: str, timeout: float | None = None) -> RunResult:
        if self.store.info(run_id).status not in TERMINAL:
            for _ in self.watch(run_id, timeout=timeout):
                pass
        s = self.state(run_id)
        return RunResult(run_id=run_id, status=s.status, answer=s.result, error=s.error,
                         steps=s.step, tokens=s.usage.tokens, tool_calls=s.usage.tool_calls)

    def ledger(self, run_id: str) -> dict[str, int]:
        return self.store.ledger(run_id)  # type: ignore[attr-defined, no-any-return]

    # -- Ray ----------------------------------------------------------------------

    def supervisor(self) -> Any:
        """The cluster's supervisor actor (created on first use, then found by name)."""
        import ray

        from undying.supervisor import get_supervisor

        if self._supervisor is None:
            init_ray(self.settings)
            self._supervisor = get_supervisor(self.redis_url, self.settings.namespace,
                                              self.policy, dict(self.actor_options))
            ray.get(self._supervisor.boot.remote())
        return self._supervisor

    def _start(self, run_id: str) -> None:
        if not self.supervise:
            self._launch(run_id)
            return
        import ray

        # the supervisor raises if the run cannot be activated
        ray.get(self.supervisor().launch.remote(run_id))

    def _find_actor(self, run_id: str) -> Any:
        """The actor of the run's current epoch, if one is registered."""
        import ray

        from undying.actors.ray_actor import actor_name

        if not ray.is_initialized():
            return None
        epoch = self.store.info(run_id).epoch
        try:
            return ray.get_actor(actor_name(run_id, epoch), namespace=self.settings.namespace)
        except ValueError:
            return None

    def _launch(self, run_id: str) -> None:
        import ray

        from undying.actors.ray_actor import new_run_actor

        init_ray(self.settings)
        existing = self._find_actor(run_id)
        if existing is not None:
            try:
                ray.get(existing.info.remote(), timeout=5)
                return  # a live incarnation is already running the run
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                pass  # dead or hung: a new epoch fences it
        epoch = self.store.claim_epoch(run_id)
        actor = new_run_actor(run_id, self.redis_url, epoch, self.settings.namespace,
                              self.actor_options)
        started = ray.get(actor.start.remote())
        if started.get("status") in ("crashed", "fenced"):
            raise UndyingError(f"run {run_id!r} could not be activated: {started.get('error')}")
        self._refs[run_id] = actor.wait.remote()

    def actor_info(self, run_id: str, timeout: float = 5.0) -> dict[str, Any] | None:
        import ray

        actor = self._find_actor(run_id)
        if actor is None:
            return None
        try:
            return ray.get(actor.info.remote(), timeout=timeout)  # type: ignore[no-any-return]
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            return None

    def close(self) -> None:
        close = getattr(self.store, "close", None)
        if close:
            close()


class RunHandle:
    def __init__(self, client: Undying, run_id: str) -> None:
        self.client = client
        self.run_id = run_id

    def result(self, timeout: float | None = None) -> RunResult:
        return self.client.wait(self.run_id, timeout)

    def status(self) -> RunInfo:
        return self.client.info(self.run_id)

    def history(self) -> list[StepEvent]:
        return self.client.history(self.run_id)

    def resume(self) -> RunHandle:
        return self.client.resume(self.run_id)

    def cancel(self, reason: str = "cancelled by user") -> None:
        self.client.cancel(self.run_id, reason)

    def __repr__(self) -> str:
        return f"RunHandle({self.run_id!r})"


def connect(settings: Settings | None = None, **kw: Any) -> Undying:
    return Undying(settings, **kw)
