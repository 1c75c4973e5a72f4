"""Runs driven to their end in this process, with no Ray: tests, examples, debugging.

The same engine and executor as on a cluster, on any store, with the same
activation and passivation: a run is hosted while it has messages, its calls
are claimed, performed and their results sent to its inbox, and it is
re-activated by them. A root and every sub-agent it spawns are hosted here,
one activation at a time.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from undying.persistence import TERMINAL, UndyingError

from ._engine import RunEngine, Warm
from ._executor import EffectRequest, Executor
from ._state import Message, RunState

INLINE = "inline"


class RunBusy(UndyingError):
    def __init__(self, run_id: str) -> None:
        super().__init__(f"run {run_id!r} is active on another host; wait for it or resume later")


class InlineHost:
    """Hosts one tree of runs in this process until its root ends (or waits on nothing here)."""

    def __init__(self, store: Any, *, effect_concurrency: int = 8, compact_ratio: float = 2.0,
                 lease_ttl_s: float = 30.0, model_factory: Any = None, ledger: Any = None,
                 recover: bool = False) -> None:
        """``recover``: the process that hosted these runs before died (a resume): each
        run's first activation here re-sends calls no executor claimed, as after a crash."""
        self.store = store
        self.compact_ratio = compact_ratio
        self.ttl_ms = int(lease_ttl_s * 1000)
        self.owner = f"{INLINE}|local|{os.getpid()}"
        self.wake = asyncio.Event()
        self.crashed: list[BaseException] = []
        self.applied: dict[tuple[str, str], asyncio.Future[None]] = {}
        self.executor = Executor(store, INLINE, concurrency=effect_concurrency,
                                 model_factory=model_factory, ledger=ledger,
                                 hold=self._hold if effect_concurrency == 1 else None,
                                 on_crash=self._on_crash, on_done=self.wake.set)
        self.tree: set[str] = set()
        self.warm: dict[str, Warm] = {}  # runs passivated here: re-activated without a reload
        self.recovered: set[str] | None = set() if recover else None

    def _on_crash(self, exc: BaseException) -> None:
        self.crashed.append(exc)
        self.wake.set()

    async def _hold(self, req: EffectRequest) -> None:
        # one call at a time: the next starts only once this result is committed
        key = (req.run_id, req.effect_id)
        fut = self.applied.setdefault(key, asyncio.get_running_loop().create_future())
        await fut

    def _on_applied(self, run_id: str, msg: Message) -> None:
        eid = getattr(msg, "effect_id", None)
        fut = self.applied.pop((run_id, eid), None) if eid is not None else None
        if fut is not None and not fut.done():
            fut.set_result(None)

    def _lost(self, owner: str) -> bool:
        # every in-process executor but this one is gone with its process
        return owner.startswith(f"{INLINE}#") and owner != f"{INLINE}#{self.executor.incarnation}"

    def host_once(self, run_id: str) -> RunState | None:
        """One activation: apply what is in the inbox, then passivate. None: hosted elsewhere."""
        act = self.store.activate(run_id, INLINE, self.owner, self.ttl_ms)
        if act is None:
            return None
        engine = RunEngine(run_id, self.store, dispatch=self.executor.submit,
                           compact_ratio=self.compact_ratio, lost=self._lost,
                           on_applied=lambda m: self._on_applied(run_id, m),
                           on_spawn=self.tree.add)
        clean = act.clean
        if self.recovered is not None and run_id not in self.recovered:
            self.recovered.add(run_id)
            clean = False
        engine.activate(act.epoch, clean, warm=self.warm.pop(run_id, None), step=act.step)
        while True:
            engine.drain()
            outcome = self.store.passivate(run_id, engine.epoch, engine.read_cursor)
            if outcome == "ok":
                kept = engine.keep()
                if kept is not None:
                    self.warm[run_id] = kept
                return engine.state
            if outcome == "outbox":
                engine.relay_outbox()

    async def run(self, root_id: str) -> RunState:
        from ._engine import load_state

        self.tree.add(root_id)
        try:
            while True:
                if self.crashed:
                    raise self.crashed[0]
                self.wake.clear()
                ready = [r for r in sorted(self.tree) if self.store.is_queued(r)]
                for rid in ready:
                    self.host_once(rid)
                    if self.crashed:
                        raise self.crashed[0]
                if self.store.info(root_id).status in TERMINAL:
                    break
                if not ready:
                    if not self.executor.tasks:
                        break  # nothing out, nothing in: it waits for something outside
                    wait = asyncio.ensure_future(self.wake.wait())
                    await asyncio.wait([wait], timeout=0.5)
                    wait.cancel()
        finally:
            for t in list(self.executor.tasks):
                t.cancel()
            await asyncio.gather(*self.executor.tasks, return_exceptions=True)
        return load_state(self.store, root_id)[0]


def run_until_done(store: Any, run_id: str, **options: Any) -> RunState:
    async def go() -> RunState:
        return await InlineHost(store, **options).run(run_id)

    return asyncio.run(go())
