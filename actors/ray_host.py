"""`RunHost`: a warm actor that hosts one run at a time, a thin adapter around `RunEngine`.

A host takes a run from the ready queue, takes its lease with a new epoch,
applies every message in its inbox (committing after each), and passivates
it when the inbox is empty: the run then holds no process until its next
message queues it again, for any host on any node. Model and tool calls go
to the executor of this node (to its standby while a dead one is replaced).
Runs are activated in well under a millisecond of Ray time: nothing is
created per run.

Liveness: the host renews its registration and its current run's lease
every ~0.5 s. If its process dies, Ray reports it at once (hosts use no Ray
restarts: a restartable actor's death is reported only after ~1.5 s); the
supervisor restarts the run it was hosting from its checkpoint under a new
epoch, and creates a new host in its place. Its lease expiring (3 s) is the
backstop when Ray cannot tell (a paused or partitioned host). A paused host
that wakes up has its next commit refused (fenced) and drops the run. On
SIGTERM (a deploy, a drained node) the atexit hook gives the current run's
lease back at once, so it is restarted without waiting.
"""

from __future__ import annotations

import atexit
import collections
import os
import random
import threading
import time
import uuid
from typing import Any

import ray

from undying.persistence import (
    CorruptCheckpoint,
    Fenced,
    Quarantined,
    RedisStore,
    RunNotFound,
    UndyingError,
)

from ._decide import TERMINAL
from ._engine import RunEngine, Warm
from ._executor import EffectRequest
from ._state import RunState

LEASE_TTL_S = 3.0
LINGER_MS = 20


# A threaded actor, not an async one: the host's own threads block on Redis and on
# Ray's acknowledgements; its methods (a death watch that never returns, `info`) each
# get a thread of their own.
@ray.remote(num_cpus=0, max_restarts=0, max_task_retries=0,  # type: ignore[call-overload]
            max_concurrency=4)
class RunHost:
    def __init__(self, redis_url: str, namespace: str, name: str,
                 options: dict[str, Any] | None = None) -> None:
        opts = dict(options or {})
        self.redis_url = redis_url
        self.namespace = namespace
        self.name = name
        self.hid = f"{name}#{uuid.uuid4().hex[:8]}"  # one per incarnation
        self.store = RedisStore(redis_url)
        self.node_id = ray.get_runtime_context().get_node_id()
        self.pid = os.getpid()
        self.owner = f"{self.hid}|{self.node_id}|{self.pid}"
        self.ttl_ms = int(float(opts.get("lease_ttl_s", LEASE_TTL_S)) * 1000)
        self.compact_ratio = float(opts.get("compact_ratio", 2.0))
        self.pause_s = float(opts.get("pause_after_commit_s", 0.0))  # tests: a crash window
        # how long an activation waits for a call's result before passivating (when no
        # other run is queued): a fast tool or model call then costs no passivation, no
        # wake-up and no activation (see _linger)
        self.linger_ms = int(float(opts.get("linger_ms", LINGER_MS)))
        self.options = opts
        self.current: tuple[str, int] | None = None
        # this node's executors: calls go to the first one alive (the standby takes over
        # while a dead one is replaced); the watchers keep `down` up to date
        from .pool import executor_names

        self.n_executors = len(executor_names(self.node_id, opts))
        self.down: set[int] = set()
        self.executor: Any = None
        self.executor_i = 0
        # dispatches not yet confirmed by the executor: a call to an executor that is
        # dying or restarting fails, and is sent again (the claim makes that harmless)
        self.unconfirmed: dict[Any, list[EffectRequest]] = {}
        self.sent_to: dict[Any, int] = {}  # which of the node's executors each went to
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.stats = {"activations": 0, "steps": 0, "busy": 0, "fenced": 0, "crashed": 0,
                      "lingered": 0,
                      "warm": 0, "loaded": 0}
        # runs this host passivated, kept to re-activate them without a reload (see
        # RunEngine.activate); their next wake-up is queued to this host first
        self.warm: collections.OrderedDict[str, Warm] = collections.OrderedDict()
        self.warm_max = int(opts.get("warm_runs", 256))
        self.last_error = ""
        atexit.register(self._drain)
        self.store.host_heartbeat(self.hid, self._record())
        for target in (self._serve, self._heartbeat, self._confirm):
            threading.Thread(target=target, name=f"{target.__name__}", daemon=True).start()
        for i in range(self.n_executors):
            threading.Thread(target=self._watch_executor, args=(i,), name=f"watch-executor-{i}",
                             daemon=True).start()

    # -- serving -------------------------------------------------------------------

    def _serve(self) -> None:
        while not self.stopping.is_set():
            try:
                run_id = self.store.take(self.hid, 1.0)
            except Exception:
                time.sleep(0.5)
                continue
            if run_id is not None:
                self._host(run_id)

    def _host(self, run_id: str) -> None:
        try:
            act = self.store.activate(run_id, self.hid, self.owner, self.ttl_ms)
        except (RunNotFound, Quarantined):
            return
        except UndyingError:
            self._give_back()
            return
        if act is None:
            self.stats["busy"] += 1  # another host holds it: it reads the inbox before passivating
            return
        self.current = (run_id, act.epoch)
        self.stats["activations"] += 1
        engine = RunEngine(run_id, self.store, dispatch=self._dispatch,
                           compact_ratio=self.compact_ratio,
                           after_commit=self._pause if self.pause_s else None,
                           ship_tails=True)  # one executor per node: it keeps conversations
        try:
            engine.activate(act.epoch, act.clean, warm=self.warm.pop(run_id, None),
                            step=act.step)
            self.stats["warm" if engine.warm_hit else "loaded"] += 1
            while True:
                engine.drain()
                if self._linger(run_id, engine):
                    continue
                outcome = self.store.passivate(run_id, engine.epoch, engine.read_cursor,
                                               self.hid)
                if outcome == "ok":
                    break
                if outcome == "outbox":
                    engine.relay_outbox()
            kept = engine.keep()
            if kept is not None:
                self.warm[run_id] = kept
                while len(self.warm) > self.warm_max:
                    self.warm.popitem(last=False)  # the least recently passivated
        except Fenced:
            self.stats["fenced"] += 1  # a newer activation owns the run: drop it
        except (CorruptCheckpoint, Quarantined, RunNotFound):
            pass  # quarantined (it names why) or deleted: nothing to host
        except Exception as exc:
            # the supervisor restarts it (with its crash-loop guard) and names this reason
            self.stats["crashed"] += 1
            self.last_error = f"{type(exc).__name__}: {exc}"[:500]
            try:
                self.store.note_crash(run_id, self.last_error)
                self.store.release_lease(run_id, act.epoch, done=False)
            except UndyingError:
                pass
        finally:
            self.stats["steps"] += engine.steps
            self.current = None

    def _linger(self, run_id: str, engine: RunEngine) -> bool:
        """Keep the run active a little while a call it dispatched may answer at once."""
        state = engine.state
        if (self.linger_ms <= 0 or state is None or state.status in TERMINAL
                or self.stopping.is_set()
                or all(p.backing_off for p in state.pending.values())):  # (or none pending)
            return False
        got = self.store.wait_inbox(run_id, engine.read_cursor, self.hid, self.linger_ms)
        if got:
            engine.feed(got)  # what XREAD returned: no second read
            self.stats["lingered"] += 1
            return True
        return False

    def _give_back(self) -> None:
        try:
            self.store.forget_host(self.hid)
        except UndyingError:
            pass

    def _pause(self, state: RunState) -> None:
        time.sleep(self.pause_s)

    def _dispatch(self, requests: list[EffectRequest]) -> None:
        from .pool import get_executor

        i = next((k for k in range(self.n_executors) if k not in self.down), 0)
        if self.executor is None or self.executor_i != i:
            self.executor = get_executor(self.redis_url, self.namespace, self.node_id,
                                         self.options, i)
            self.executor_i = i
        try:
            ref = self.executor.perform.remote(requests)
        except Exception:
            self.executor = None  # a stale handle: look it up again on the next try
            ref = None
        with self.lock:
            key = ref if ref is not None else object()
            self.unconfirmed[key] = requests
            self.sent_to[key] = i

    def _confirm(self) -> None:
        """Wait for the executor to acknowledge each dispatch; send again what failed."""
        while not self.stopping.is_set():
            with self.lock:
                items = list(self.unconfirmed.items())
            refs = [r for r, _ in items if isinstance(r, ray.ObjectRef)]
            failed = [reqs for r, reqs in items if not isinstance(r, ray.ObjectRef)]
            if refs:
                done, _ = ray.wait(refs, num_returns=len(refs), timeout=0.2)
                for ref in done:
                    try:
                        ray.get(ref)
                    except Exception as exc:
                        with self.lock:
                            failed.append(self.unconfirmed.get(ref, []))
                            if isinstance(exc, ray.exceptions.RayActorError):
                                # dead: its standby takes the re-sends (its watcher makes a
                                # new one and brings the calls back when it is up)
                                self.down.add(self.sent_to.get(ref, self.executor_i))
                    with self.lock:
                        self.unconfirmed.pop(ref, None)
                        self.sent_to.pop(ref, None)
            with self.lock:
                for key in [k for k in self.unconfirmed if not isinstance(k, ray.ObjectRef)]:
                    del self.unconfirmed[key]
                    self.sent_to.pop(key, None)
            if failed:
                self.stats["redispatched"] = self.stats.get("redispatched", 0) + len(failed)
                self.executor = None
                if len(self.down) >= self.n_executors:
                    time.sleep(0.2)  # every executor is being replaced: give them a moment
                for reqs in failed:
                    if reqs:
                        self._dispatch(reqs)
            elif not refs:
                self.stopping.wait(0.05)

    def _watch_executor(self, i: int) -> None:
        """Keep this node's executor ``i`` alive, supervisor or not: when it dies, calls go
        to the next one alive at once, and a new one is made, whose boot reports the calls
        the dead one had claimed as lost; calls come back to it once it is up."""
        from .pool import get_executor

        while not self.stopping.is_set():
            try:
                handle = get_executor(self.redis_url, self.namespace, self.node_id,
                                      self.options, i)
                ray.get(handle.__ray_ready__.remote())
                if i in self.down:
                    self.down.discard(i)
                    if i < self.executor_i:
                        self.executor = None  # back to the first executor alive
                ray.get(handle.wait.remote())
            except ray.exceptions.RayActorError:
                self.down.add(i)
                if self.executor_i == i:
                    self.executor = None
                time.sleep(0.05 + random.random() * 0.2)  # the hosts of a node race to make it
            except Exception:
                time.sleep(1.0)

    # -- liveness ------------------------------------------------------------------

    def _record(self) -> str:
        run, epoch = self.current or ("", 0)
        return f"{self.name}|{self.node_id}|{self.pid}|{run}|{epoch}"

    def _heartbeat(self) -> None:
        while not self.stopping.is_set():
            try:
                self.store.host_heartbeat(self.hid, self._record())
                cur = self.current
                if cur is not None:
                    self.store.renew_lease(cur[0], cur[1], self.owner, self.ttl_ms)
            except Fenced:
                pass  # the engine's next commit is refused too, and it drops the run
            except Exception:
                pass  # the store is down: leases may expire; fencing keeps that safe
            self.stopping.wait(0.5)

    def _drain(self) -> None:
        self.stopping.set()
        cur = self.current
        if cur is not None:
            try:
                self.store.release_lease(cur[0], cur[1], done=False)
            except Exception:
                pass  # the lease then simply expires

    # -- calls -----------------------------------------------------------------------

    def wait(self) -> None:
        """Never returns: a caller holding this call learns of the actor's death."""
        threading.Event().wait()

    def info(self) -> dict[str, Any]:
        run, epoch = self.current or (None, 0)
        return {"name": self.name, "host": self.hid, "pid": self.pid, "node_id": self.node_id,
                "run": run, "epoch": epoch, "last_error": self.last_error, **self.stats}
