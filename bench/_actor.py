"""The bench actor: one step per call, with or without its checkpoint.

Modes (all share one process, one event loop, interleaved calls):
  noop        return at once: the Ray call itself
  bare        the copy-on-write step only (append a ~1 KB message, bump step/usage)
  diff        bare + diff_states: the step minus pack and commit (the baseline)
  checkpoint  bare + diff + pack delta (+ snapshot when the rule says so) + encode
              event + RedisStore.commit: what RunEngine does per message
Each mode keeps its own state, so each grows to the same size.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import ray

from undying.persistence import RedisStore, diff_states

from ._util import Checkpointer, advance, base_state, corpus_texts, make_message


@ray.remote(num_cpus=0, max_restarts=0, max_task_retries=0)
class StepActor:
    def __init__(self, redis_url: str, n: int, compact_ratio: float = 2.0) -> None:
        self.texts = corpus_texts(n + 1)
        self.store = RedisStore(redis_url)
        self.ck = Checkpointer(self.store, f"bench-actor-{uuid.uuid4().hex[:8]}",
                               compact_ratio=compact_ratio)
        self.states = {m: base_state("bench-actor-mem") for m in ("bare", "diff")}
        self.snapshots = 0

    async def step(self, mode: str) -> int:
        """One step in ``mode``; returns the in-actor work time in ns."""
        t0 = time.perf_counter_ns()
        if mode == "noop":
            return 0
        if mode == "checkpoint":
            s = self.ck.state
            i = s.step + 1
            new = advance(s, make_message(i, self.texts[i % len(self.texts)]), f"{i}-0")
            if self.ck.step(new).snapshot:
                self.snapshots += 1
        else:
            s = self.states[mode]
            i = s.step + 1
            new = advance(s, make_message(i, self.texts[i % len(self.texts)]), f"{i}-0")
            if mode == "diff":
                diff_states(s, new)
            self.states[mode] = new
        return time.perf_counter_ns() - t0

    async def stats(self) -> dict[str, Any]:
        return {"snapshots": self.snapshots, "steps": self.ck.state.step,
                "conversation": len(self.ck.state.conversation)}

    async def close(self) -> None:
        self.store.close()
