"""The supervisor actor: the thin adapter that carries out `_policy.handle`.

One named, detached actor (``undying-supervisor``) on the head node, restarted
by Ray when it dies. It holds nothing it cannot rebuild from Redis.

What it watches, and what it does:
- the pool (`undying.actors.pool`): keeps a host pool and two executors (one a
  hot standby) on every live node; a pending ``wait()`` call on each tells it of a death at once;
- activations that died: a run whose lease expired (a dead, hung or
  partitioned host, or a node Ray has not yet declared dead: Ray's default
  health checks take ~15 s, a lease 3 s), whose host Ray reported dead, or
  whose host stopped renewing its registration. The policy decides: queue the
  run again now (a host activates it under a new epoch, which fences the old
  one), later (back-off), or end it ``failed`` (crash-loop guard);
- calls that were lost: a dispatch no executor claimed in time, or whose claim
  was not renewed, or that a dead executor held, gets `EffectLost` in its
  run's inbox; the run's `decide` chooses by side-effect class;
- durable timers that are due: a `Timer` message to their run.
"""

from __future__ import annotations

import asyncio
import collections
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import ray

from undying.actors import StepEvent
from undying.actors._engine import encode_message, end_run
from undying.actors._executor import rec_started, report_lost
from undying.actors._state import Timer
from undying.actors.pool import (
    EXECUTOR,
    HOST,
    alive_nodes,
    ensure_pool,
    executor_names,
    node_of,
)
from undying.persistence import TERMINAL, Quarantined, RedisStore, RunNotFound, encode

from ._observe import Housekeeping, note_lease_expired, note_restart
from ._policy import (
    ActorDied,
    Adopt,
    Command,
    Event,
    Forget,
    MarkFailed,
    Policy,
    Restart,
    RestartFailed,
    RestartSucceeded,
    RunFinished,
    ScheduleTick,
    SupervisorView,
    Tick,
    handle,
)

SUPERVISOR_NAME = "undying-supervisor"
HOST_STALE_S = 3.0  # hosts renew their registration every 0.5 s
LOST_RECHECK_S = 30.0  # a call reported lost is reported again if nothing happened by then
FORGET_AFTER_S = 10.0  # a restarted run leaves the view (its restart times stay in Redis)


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=0)
class SupervisorActor:
    def __init__(self, redis_url: str, namespace: str, policy: dict[str, Any] | None = None,
                 options: dict[str, Any] | None = None) -> None:
        self.redis_url = redis_url
        self.namespace = namespace
        self.options = dict(options or {})
        self.scan_s = float(self.options.pop("scan_interval_s", 0.2))
        self.housekeeping = Housekeeping(self.options)  # retention sweep, exporter (observability)
        self.died_at: dict[str, float] = {}  # run -> when its death was noticed (recovery time)
        self.store = RedisStore(redis_url)
        self.view = SupervisorView(policy=Policy(**(policy or {})))
        self.watchers: dict[str, asyncio.Task[None]] = {}
        self.events: asyncio.Queue[Event] | None = None
        self.alive_nodes: set[str] = set()
        self.stats: dict[str, Any] = {"restarts": 0, "failed": 0, "lease_expiries": 0,
                                      "host_deaths": 0, "executor_deaths": 0, "nodes_lost": 0,
                                      "lost_calls": 0, "timers": 0, "boots": 1}
        self._boot: asyncio.Task[None] | None = None
        self.log: collections.deque[str] = collections.deque(maxlen=300)  # recent events, for `info`
        # Ray restarts this actor with no caller; it boots itself, from a thread that asks
        # until a boot succeeds: a call made while Ray still reports the actor restarting
        # fails ("The actor is restarting"), and a boot can fail (Redis down)
        threading.Thread(target=self._boot_self, args=(ray.get_runtime_context().current_actor,),
                         name="self-boot", daemon=True).start()

    def _boot_self(self, me: Any) -> None:
        delay = 0.05
        while True:
            try:
                ray.get(me.boot.remote(), timeout=120)
                return
            except Exception as exc:
                self.log.append(f"{time.time():.3f} self-boot -> {type(exc).__name__}"[:300])
                time.sleep(delay)
                delay = min(delay * 2, 2.0)

    # -- lifecycle ----------------------------------------------------------------

    async def boot(self) -> dict[str, Any]:
        """Start supervising (and make the pool); every caller waits for the same boot."""
        if self._boot is None:
            self._boot = asyncio.get_running_loop().create_task(self._do_boot())
        try:
            await asyncio.shield(self._boot)
        except Exception:
            self._boot = None  # let the next call try again (Redis may be back)
            raise
        return self.summary()

    async def _do_boot(self) -> None:
        self.events = asyncio.Queue()
        self.loop = asyncio.get_running_loop()
        # Blocking calls (Redis, Ray's GCS) run in threads. Ray lookups can hang for seconds
        # while a node dies: they get a pool of their own, so they never starve the scan,
        # which runs in a thread of its own.
        self.loop.set_default_executor(ThreadPoolExecutor(16, thread_name_prefix="sup"))
        self.scan_pool = ThreadPoolExecutor(1, thread_name_prefix="scan")
        # supervision first: the pool may be half dead right now (that may be why we restarted)
        self._bg = [self.loop.create_task(self._event_loop()),
                    self.loop.create_task(self._scan_loop())]
        try:
            problem = self.housekeeping.start_exporter(self.redis_url)
        except Exception as exc:  # observability must never stop supervision
            problem = f"exporter not started: {exc!r}"
        if problem:
            self.log.append(f"{time.time():.3f} {problem}")
        for attempt in range(1000):
            try:
                await self.ensure_pool()
                return
            except Exception as exc:
                self.log.append(f"{time.time():.3f} boot: ensure_pool -> {exc!r}")
                await asyncio.sleep(min(2.0, 0.1 * (attempt + 1)))

    async def ensure_pool(self) -> int:
        """Create what is missing of the pool on every live node, and watch it."""
        self.alive_nodes = set(await asyncio.to_thread(alive_nodes))
        actors = await asyncio.to_thread(ensure_pool, self.redis_url, self.namespace,
                                         self.options, sorted(self.alive_nodes))
        for name, h in actors.items():
            if name not in self.watchers or self.watchers[name].done():
                self.watchers[name] = self.loop.create_task(self._watch(name, h))
        return len(actors)

    async def ping(self) -> bool:
        return True

    def summary(self) -> dict[str, Any]:
        states: dict[str, int] = {}
        for r in self.view.runs.values():
            states[r.state] = states.get(r.state, 0) + 1
        booted = (self._boot is not None and self._boot.done() and not self._boot.cancelled()
                  and self._boot.exception() is None)
        return {**self.stats, "booted": booted, "runs": len(self.view.runs), "states": states,
                "nodes": sorted(self.alive_nodes), "pid": os.getpid(),
                "pool": sorted(n for n, t in self.watchers.items() if not t.done())}

    async def info(self, log: bool = False) -> dict[str, Any]:
        out = self.summary()
        if log:
            out["log"] = list(self.log)
        return out

    # -- the pool -----------------------------------------------------------------

    async def _watch(self, name: str, actor: Any) -> None:
        last: dict[str, Any] = {}
        while True:
            try:
                last = await actor.info.remote()
                await actor.wait.remote()
            except ray.exceptions.ActorUnavailableError:
                await asyncio.sleep(0.5)  # "maybe dead" (a network blip): its lease decides
                continue
            except ray.exceptions.RayActorError as exc:
                await self._pool_actor_died(name, last, _short(exc))
                self.watchers.pop(name, None)
                self.loop.create_task(self._quiet_pool())  # a new one in its place
                return
            except Exception as exc:
                self.log.append(f"{time.time():.3f} watching {name} -> {exc!r}"[:300])
                await asyncio.sleep(0.5)  # a transient error talking to it: watch again

    async def _quiet_pool(self) -> None:
        try:
            await self.ensure_pool()
        except Exception as exc:
            self.log.append(f"{time.time():.3f} ensure_pool -> {exc!r}")

    async def _pool_actor_died(self, name: str, last: dict[str, Any], why: str) -> None:
        """A pool actor died (no Ray restarts: its name is free until we replace it)."""
        self.log.append(f"{time.time():.3f} {name} died: {why}")
        if name.startswith(HOST + ":"):
            self.stats["host_deaths"] += 1
            # every incarnation under this name is dead now: its runs were lost with it
            await self._host_gone(f"{name}#", f"host {name} died: {why}")
        elif name.startswith(EXECUTOR + ":"):
            self.stats["executor_deaths"] += 1
            await asyncio.to_thread(self._executor_gone, name, last.get("incarnation"),
                                    f"executor {name} died: {why}")

    async def _host_gone(self, hid: str, reason: str) -> None:
        """``hid``: a host id, or a name followed by '#' for every incarnation of it."""
        held = await asyncio.to_thread(self.store.held_by, hid)
        hosts = await asyncio.to_thread(self.store.hosts)
        for h in hosts if hid.endswith("#") else [hid]:
            if h == hid or h.startswith(hid):
                await asyncio.to_thread(self.store.forget_host, h)
        for run_id, epoch in held:
            self._run_died(run_id, epoch, reason)

    def _executor_gone(self, name: str, incarnation: str | None, reason: str) -> None:
        """Report the calls a dead executor claimed. Without its incarnation, every claim
        under its name but those of a live successor (a host may have made one already)."""
        if incarnation is not None or not lost_node_ok(name, self.alive_nodes):
            keep = None  # its node is gone: no successor can be running under its name
        else:
            keep = _live_incarnation(name, self.namespace)
        claims = [c for c in self.store.executor_claims(name)
                  if (c[3] == incarnation if incarnation is not None else c[3] != keep)]
        for run_id, eid, attempt, _inc in claims:
            rec = self.store.fx_records(run_id).get(eid, "")
            if rec.startswith(f"{attempt}|"):
                report_lost(self.store, run_id, eid, attempt, started=rec_started(rec), record=rec,
                            reason=reason)
                self.stats["lost_calls"] += 1
        self.store.executor_forget(name, claims)

    # -- runs -----------------------------------------------------------------------

    def _run_died(self, run_id: str, epoch: int, reason: str) -> None:
        """An activation of the run died: the policy decides what happens."""
        if run_id not in self.view.runs:
            recent = tuple(self.store.restarts(run_id))
            self._emit(Adopt(run_id, "", time.time() + 3600, epoch, recent))
        self.died_at.setdefault(run_id, time.time())
        self._emit(ActorDied(run_id, reason, epoch))

    def _emit(self, event: Event) -> None:
        assert self.events is not None
        self.events.put_nowait(event)

    async def _event_loop(self) -> None:
        assert self.events is not None
        while True:
            event = await self.events.get()
            try:
                self.view, commands = handle(self.view, event, time.time())
            except Exception as exc:  # a bad event must not stop supervision
                self.log.append(f"{time.time():.3f} {event!r} -> error {exc!r}")
                continue
            if not isinstance(event, (Tick, Forget)) or commands:
                self.log.append(f"{time.time():.3f} {event!r} -> {commands!r}")
            for cmd in commands:
                self._carry_out(cmd)

    def _carry_out(self, cmd: Command) -> None:
        if isinstance(cmd, Restart):
            self.loop.create_task(self._restart(cmd))
        elif isinstance(cmd, MarkFailed):
            self.loop.create_task(self._fail(cmd))
        elif isinstance(cmd, ScheduleTick):
            self.loop.call_later(max(0.0, cmd.at - time.time()), self._emit, Tick())

    async def _restart(self, cmd: Restart) -> None:
        run_id = cmd.run_id
        run = self.view.runs.get(run_id)
        reason = run.last_error if run is not None else ""
        now = time.time()
        try:
            info = await asyncio.to_thread(self.store.info, run_id)
            if info.status in TERMINAL:
                self._emit(RunFinished(run_id, info.status))  # type: ignore[arg-type]
                return
            ev = StepEvent(step=info.step, kind="restart", status=info.status,  # type: ignore[arg-type]
                           epoch=info.epoch + 1, at_ms=int(now * 1000),
                           summary=f"restart {cmd.attempt}: {reason}"[:300])
            await asyncio.to_thread(self.store.record_restart, run_id, now,
                                    encode("event", ev, run_id=run_id))
            self.stats["restarts"] += 1
            await asyncio.to_thread(note_restart, self.store, run_id, reason or "",
                                    self.died_at.pop(run_id, now))  # metrics
            # forced: the host that held it is dead or presumed so; the next activation's
            # epoch fences it if it was only paused
            await asyncio.to_thread(self.store.requeue, run_id, force=True)
        except (Quarantined, RunNotFound) as exc:
            self._emit(RunFinished(run_id, "quarantined" if isinstance(exc, Quarantined)
                                   else "cancelled"))
            return
        except Exception as exc:
            self._emit(RestartFailed(run_id, _short(exc)))
            return
        self._emit(RestartSucceeded(run_id, "", info.epoch + 1))
        self.loop.call_later(FORGET_AFTER_S, self._emit, Forget(run_id))

    async def _fail(self, cmd: MarkFailed) -> None:
        self.died_at.pop(cmd.run_id, None)
        try:
            await asyncio.to_thread(end_run, self.store, cmd.run_id, "failed", cmd.reason)
            self.stats["failed"] += 1
        except Exception as exc:
            self.log.append(f"{time.time():.3f} failing {cmd.run_id} -> error {exc!r}")
        self._emit(RunFinished(cmd.run_id, "failed"))

    # -- scanning -------------------------------------------------------------------

    async def _scan_loop(self) -> None:
        last_nodes = 0.0
        while True:
            await asyncio.sleep(self.scan_s)
            check_nodes = time.time() - last_nodes > 1.0
            try:
                await self.loop.run_in_executor(self.scan_pool, self._scan)
                await asyncio.to_thread(self.housekeeping.sweep, self.store)  # retention
                if check_nodes:
                    last_nodes = time.time()
                    await self._check_nodes()
            except Exception as exc:  # Redis or GCS unavailable: keep scanning
                self.log.append(f"{time.time():.3f} scan -> {exc!r}")

    def _scan(self) -> None:
        """(In a thread.) Expired leases, stale hosts, lost calls, due timers."""
        now = time.time()
        for run_id, _exp in self.store.expired_leases():
            info = _info_or_none(self.store, run_id)
            if info is None:
                self.store.forget_lease(run_id)
            elif info.status in TERMINAL:
                self.store.forget_lease(run_id)
                if self.store.load(run_id).outbox:  # it ended before relaying: finish that
                    self.store.requeue(run_id, force=True)
            else:
                self.stats["lease_expiries"] += 1
                note_lease_expired(self.store)  # metrics
                crash = self.store.last_crash(run_id, clear=True)
                reason = f"activation crashed: {crash}" if crash else "lease expired"
                self.loop.call_soon_threadsafe(self._run_died, run_id, info.epoch, reason)
        for hid, (beat_ms, _record) in self.store.hosts().items():
            if now - beat_ms / 1000 > HOST_STALE_S:
                held = self.store.held_by(hid)
                self.store.forget_host(hid)
                for run_id, epoch in held:
                    self.loop.call_soon_threadsafe(self._run_died, run_id, epoch,
                                                   f"host {hid} stopped answering")
        for run_id, eid, rec in self.store.fx_overdue():
            if not rec:
                self.store.fx_forget(run_id, eid)
                continue
            attempt = int(rec.split("|")[0])
            state = "never claimed" if rec.endswith("|q") else "claim not renewed"
            report_lost(self.store, run_id, eid, attempt, started=rec_started(rec), record=rec,
                        reason=f"dispatch {state} in time")
            self.stats["lost_calls"] += 1
            self.store.fx_postpone(run_id, eid, int((now + LOST_RECHECK_S) * 1000))
        for run_id, timer_id in self.store.timers_due():
            try:
                self.store.deliver(run_id, encode_message(
                    Timer(id=f"timer:{timer_id}", timer_id=timer_id), run_id))
            except RunNotFound:
                pass
            self.store.timer_done(run_id, timer_id)
            self.stats["timers"] += 1

    async def _check_nodes(self) -> None:
        alive = set(await asyncio.to_thread(alive_nodes))
        lost, new = self.alive_nodes - alive, alive - self.alive_nodes
        for node in lost:
            self.stats["nodes_lost"] += 1
            # its executors' calls are lost now, not when their claims go overdue
            for name in executor_names(node, self.options):
                await asyncio.to_thread(self._executor_gone, name, None, f"node {node} lost")
        if new or lost:
            await self.ensure_pool()
        self.alive_nodes = alive


def lost_node_ok(executor: str, alive: set[str]) -> bool:
    """Whether the executor's node is (still) alive, so a successor may run under its name."""
    return node_of(executor) in alive


def _live_incarnation(name: str, namespace: str) -> str | None:
    try:
        ref: Any = ray.get_actor(name, namespace=namespace).info.remote()
        info: Any = ray.get(ref, timeout=3)
        return str(info["incarnation"])
    except Exception:
        return None


def _info_or_none(store: RedisStore, run_id: str) -> Any:
    try:
        return store.info(run_id)
    except RunNotFound:
        return None


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def get_supervisor(redis_url: str, namespace: str, policy: dict[str, Any] | None = None,
                   options: dict[str, Any] | None = None) -> Any:
    """The cluster's supervisor, created on first use (named, detached, restarted by Ray)."""
    try:
        return ray.get_actor(SUPERVISOR_NAME, namespace=namespace)
    except ValueError:
        pass
    # On the head node: losing a worker node must not take the supervisor with it
    # (Ray would only restart it after its ~15 s node health check); the head's loss
    # stops the cluster anyway unless GCS fault tolerance is on.
    return SupervisorActor.options(  # type: ignore[attr-defined, misc, operator]
        name=SUPERVISOR_NAME, namespace=namespace, lifetime="detached", get_if_exists=True,
        resources={"node:__internal_head__": 0.001},
    ).remote(redis_url, namespace, policy, options)
