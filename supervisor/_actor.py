"""The supervisor actor: the thin adapter that carries out `_policy.handle`.

One named, detached actor (``undying-supervisor``), restarted by Ray when it
dies. It holds nothing it cannot rebuild: on (re)start it reads the run index,
the leases and the recorded restart times from Redis, feeds them to the policy
as `Adopt` events, and re-attaches a death watcher to every live run actor.

Signals it turns into events: a run actor's pending ``wait()`` failing
(ActorDiedError: the process or node died) or returning ``crashed``; a lease
that expired in Redis (a hung or partitioned actor, or a node Ray has not yet
declared dead: Ray's default health checks take ~15 s, a lease 3 s); a node
that Ray reports dead. Commands it carries out: claim a new epoch and start a
`RunActor` for the run on a live node other than the one that failed; end a
crash-looping run as ``failed``; arm timers for back-off.
"""

from __future__ import annotations

import asyncio
import collections
import os
import random
import time
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from undying.actors import StepEvent
from undying.actors._engine import end_run
from undying.actors.ray_actor import LEASE_TTL_S, actor_name, new_run_actor
from undying.persistence import TERMINAL, Quarantined, RedisStore, RunNotFound, encode

from ._policy import (
    ActorDied,
    Adopt,
    Command,
    Event,
    LeaseExpired,
    MarkFailed,
    NodeLost,
    Policy,
    Restart,
    RestartFailed,
    RestartSucceeded,
    RunFinished,
    RunStarted,
    ScheduleTick,
    SupervisorView,
    Tick,
    handle,
)

SUPERVISOR_NAME = "undying-supervisor"
ACTIVE = ("pending", "running", "waiting")


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=0)
class SupervisorActor:
    def __init__(self, redis_url: str, namespace: str, policy: dict[str, Any] | None = None,
                 options: dict[str, Any] | None = None) -> None:
        self.redis_url = redis_url
        self.namespace = namespace
        self.options = dict(options or {})
        self.scan_s = float(self.options.pop("scan_interval_s", 0.2))
        self.start_timeout_s = float(self.options.pop("start_timeout_s", 20.0))
        self.store = RedisStore(redis_url)
        self.view = SupervisorView(policy=Policy(**(policy or {})))
        self.node_of: dict[str, str] = {}  # run -> node of its last incarnation
        self.watchers: dict[str, asyncio.Task[None]] = {}
        self.events: asyncio.Queue[Event] | None = None
        self.alive_nodes: set[str] = set()
        self.suspect: dict[str, float] = {}  # node -> until when it is avoided
        self.stats: dict[str, Any] = {"restarts": 0, "failed": 0, "adopted": 0,
                                      "lease_expiries": 0, "nodes_lost": 0, "boots": 1}
        self.booted = False
        self._boot: asyncio.Task[None] | None = None
        self.log: collections.deque[str] = collections.deque(maxlen=200)  # recent events, for `info`
        # Ray restarts this actor with no caller; it boots itself.
        ray.get_runtime_context().current_actor.boot.remote()

    # -- lifecycle ----------------------------------------------------------------

    async def boot(self) -> dict[str, Any]:
        """Rebuild the view and start supervising; every caller waits for the same boot."""
        if self._boot is None:
            self._boot = asyncio.get_running_loop().create_task(self._do_boot())
        try:
            await asyncio.shield(self._boot)
        except Exception:
            self._boot = None  # let the next call try again (Redis may be back)
            self.booted = False
            raise
        return self.summary()

    async def _do_boot(self) -> None:
        self.booted = True
        self.events = asyncio.Queue()
        loop = self.loop = asyncio.get_running_loop()
        self.alive_nodes = await asyncio.to_thread(_alive_nodes)
        for adopt in await asyncio.to_thread(self._read_active_runs):
            self._emit(adopt)
            self.stats["adopted"] += 1
            await asyncio.to_thread(self._attach, adopt.run_id, adopt.epoch or 0)
        self._bg = [loop.create_task(self._event_loop()), loop.create_task(self._scan_loop())]

    def _read_active_runs(self) -> list[Adopt]:
        """The whole view, from Redis: nothing is lost when the supervisor dies."""
        leases = self.store.leases()
        out = []
        for status in ACTIVE:
            for info in self.store.list_runs(status):
                owner = self.store.lease_owner(info.run_id) or ""
                node = owner.split("|")[1] if owner.count("|") >= 2 else ""
                self.node_of[info.run_id] = node
                expires = leases.get(info.run_id, 0) / 1000
                out.append(Adopt(info.run_id, node, expires, info.epoch,
                                 tuple(self.store.restarts(info.run_id))))
        return out

    def _attach(self, run_id: str, epoch: int) -> None:
        """(In a thread.) Watch the live actor of the run's current epoch, if any."""
        try:
            actor = ray.get_actor(actor_name(run_id, epoch), namespace=self.namespace)
        except ValueError:
            return  # no live actor: its lease will expire (or has) and the policy restarts it
        self.loop.call_soon_threadsafe(self._watch, run_id, epoch, actor)

    async def ping(self) -> bool:
        return True

    def summary(self) -> dict[str, Any]:
        states: dict[str, int] = {}
        for r in self.view.runs.values():
            states[r.state] = states.get(r.state, 0) + 1
        return {**self.stats, "runs": len(self.view.runs), "states": states,
                "nodes": sorted(self.alive_nodes), "pid": os.getpid()}

    async def info(self, log: bool = False) -> dict[str, Any]:
        out = self.summary()
        if log:
            out["log"] = list(self.log)
        return out

    # -- launching ------------------------------------------------------------------

    async def launch(self, run_id: str) -> dict[str, Any]:
        """Start a run's first incarnation (or resume one that has no live actor)."""
        await self.boot()
        known = self.view.runs.get(run_id)
        if known is not None and known.state != "running":
            return {"run_id": run_id, "status": known.state}
        if known is not None and run_id in self.watchers and not self.watchers[run_id].done():
            return {"run_id": run_id, "status": "running"}
        try:
            info = await self._start_actor(run_id, frozenset())
        except Exception:
            # hand the run to the restart path (back-off, crash-loop guard) instead of
            # leaving it pending with no actor and no lease
            self._emit(Adopt(run_id, "", 0.0, None, ()))
            raise
        if info.get("status") in TERMINAL:
            self._emit(RunFinished(run_id, info["status"]))
        elif info.get("status") not in ("crashed", "fenced"):
            self._emit(RunStarted(run_id, info["node_id"], info["epoch"]))
        return info

    async def _start_actor(self, run_id: str, avoid: frozenset[str]) -> dict[str, Any]:
        node = await asyncio.to_thread(self._pick_node, run_id, avoid)
        epoch = await asyncio.to_thread(self.store.claim_epoch, run_id)
        opts = {"lease_ttl_s": LEASE_TTL_S, **self.options}
        actor = new_run_actor(run_id, self.redis_url, epoch, self.namespace, opts,
                              NodeAffinitySchedulingStrategy(node, soft=False))
        try:
            info: dict[str, Any] = await asyncio.wait_for(_await(actor.start.remote()),
                                                          self.start_timeout_s)
        except BaseException:
            ray.kill(actor, no_restart=True)
            raise
        if info.get("status") in ("crashed", "fenced"):
            raise RuntimeError(info.get("error", "activation failed"))
        self.node_of[run_id] = node
        info.setdefault("node_id", node)
        self._watch(run_id, epoch, actor)
        return info

    def _pick_node(self, run_id: str, avoid: frozenset[str]) -> str:
        alive = _alive_nodes()
        # not the node that just failed, nor one whose runs lost their leases lately (Ray
        # lists a dead node as alive for ~15 s), when there is another one
        now = time.time()
        suspects = {n for n, until in self.suspect.items() if until > now}
        excluded = set(avoid) | {self.node_of.get(run_id, "")} | suspects
        candidates = sorted(alive - excluded) or sorted(alive - set(avoid)) or sorted(alive)
        if not candidates:
            raise RuntimeError("no live Ray node to place the run on")
        load = {n: 0 for n in candidates}
        for rid, n in self.node_of.items():
            if n in load and rid in self.view.runs:
                load[n] += 1
        least = min(load.values())
        return random.choice([n for n in candidates if load[n] == least])

    def _watch(self, run_id: str, epoch: int, actor: Any) -> None:
        old = self.watchers.get(run_id)
        if old is not None and not old.done():
            old.cancel()
        self.watchers[run_id] = asyncio.get_running_loop().create_task(
            self._watch_ref(run_id, epoch, actor))

    async def _watch_ref(self, run_id: str, epoch: int, actor: Any) -> None:
        while True:
            try:
                out = await actor.wait.remote()
                break
            except ray.exceptions.ActorUnavailableError:
                # "maybe dead" (RAY-NOTES): the actor may come back and still be running
                # its tools. Restarting now would run a second copy beside it; the lease
                # decides instead, and this watch goes on.
                await asyncio.sleep(0.5)
            except ray.exceptions.RayActorError as exc:
                self._emit(ActorDied(run_id, _short(exc), epoch))
                return
        status = out.get("status")
        if status in TERMINAL:
            self._emit(RunFinished(run_id, status))
        elif status == "crashed":
            self._emit(ActorDied(run_id, out.get("error", "crashed"), epoch))
        # "fenced": a newer incarnation owns the run; nothing to do

    # -- the loop --------------------------------------------------------------------

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
            if not isinstance(event, Tick) or commands:
                self.log.append(f"{time.time():.3f} {event!r} -> {commands!r}")
            for cmd in commands:
                self._carry_out(cmd)

    def _carry_out(self, cmd: Command) -> None:
        loop = asyncio.get_running_loop()
        if isinstance(cmd, Restart):
            loop.create_task(self._restart(cmd))
        elif isinstance(cmd, MarkFailed):
            loop.create_task(self._fail(cmd))
        elif isinstance(cmd, ScheduleTick):
            loop.call_later(max(0.0, cmd.at - time.time()), self._emit, Tick())

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
            started = await self._start_actor(run_id, cmd.avoid_nodes)
        except (Quarantined, RunNotFound) as exc:
            self._emit(RunFinished(run_id, "quarantined" if isinstance(exc, Quarantined)
                                   else "cancelled"))
            return
        except Exception as exc:
            self._emit(RestartFailed(run_id, _short(exc)))
            return
        if started.get("status") in TERMINAL:
            self._emit(RunFinished(run_id, started["status"]))
        else:
            self._emit(RestartSucceeded(run_id, started["node_id"], started["epoch"]))

    async def _fail(self, cmd: MarkFailed) -> None:
        try:
            await asyncio.to_thread(end_run, self.store, cmd.run_id, "failed", cmd.reason)
            self.stats["failed"] += 1
        except Exception as exc:
            self.log.append(f"{time.time():.3f} failing {cmd.run_id} -> error {exc!r}")
        self._emit(RunFinished(cmd.run_id, "failed"))

    async def _scan_loop(self) -> None:
        last_nodes = 0.0
        while True:
            await asyncio.sleep(self.scan_s)
            try:
                await self._scan(time.time() - last_nodes > 1.0)
            except Exception:
                continue  # Redis or GCS unavailable: keep scanning
            if time.time() - last_nodes > 1.0:
                last_nodes = time.time()

    async def _scan(self, check_nodes: bool) -> None:
        expired = await asyncio.to_thread(self.store.expired_leases)
        for run_id, _exp in expired:
            run = self.view.runs.get(run_id)
            if run is None:
                info = await asyncio.to_thread(_info_or_none, self.store, run_id)
                if info is None or info.status in TERMINAL:
                    await asyncio.to_thread(self.store.forget_lease, run_id)
                else:
                    self._emit(Adopt(run_id, "", 0.0, info.epoch,
                                     tuple(await asyncio.to_thread(self.store.restarts, run_id))))
                continue
            if run.state == "running":
                self.stats["lease_expiries"] += 1
                if run.node_id:
                    self.suspect[run.node_id] = time.time() + 20.0
                self._emit(LeaseExpired(run_id))
        if check_nodes:
            alive = await asyncio.to_thread(_alive_nodes)
            for node in self.alive_nodes - alive:
                self.stats["nodes_lost"] += 1
                self._emit(NodeLost(node))
            self.alive_nodes = alive


async def _await(ref: Any) -> Any:
    return await ref


def _alive_nodes() -> set[str]:
    return {n["NodeID"] for n in ray.nodes() if n.get("Alive")}


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
