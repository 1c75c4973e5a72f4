"""Chaos for the supervisor: research runs in flight while hosts, executors, nodes, the
supervisor and Redis die.

    python -m bench.chaos --seed 1 --runs 30 --duration 180          # a long run
    python -m bench.chaos --seed 21 --runs 4 --duration 20 --hosts-per-node 2   # smoke (CI)
    python -m bench.chaos --mode recovery --kills 20 --executor-kills 10 --node-trials 3

Starts its own redis-server (AOF, ``appendfsync always``, a temp dir, a free port) and
its own multi-node ``ray.cluster_utils.Cluster`` (head ``num_cpus=1`` + ``nodes-1``
workers, Ray's default health checks), an `Undying` client in a namespace of its own whose
pool has ``--hosts-per-node`` warm hosts and one executor per node, and keeps ``--runs``
research runs (``slow_agent(latency)``, four fixed questions over the bundled corpus) in
flight for ``--duration`` seconds, starting a new one as each ends.

The pool's hosts pause ``--pause-after-commit`` seconds (pool option
``pause_after_commit_s``) between each commit and its relays and dispatches, so that a
run is held by a host long enough to be caught there: a host kill aims at the host that
holds a run *now* (its pid from ``ud.actor_info``), not at an idle host.

Faults come from a schedule generated up front from ``random.Random(seed)`` and printed
first (same seed, same schedule):

- ``host_kill``: SIGKILL of the host process holding a run (the run is chosen by the
  schedule's number among the runs in flight; the first of them, in that order, that a
  host holds within 3 s);
- ``executor_kill``: SIGKILL of a node's executor process (``info()["pid"]`` of
  ``undying-executor:<node>``), on a node with calls in flight if there is one;
- ``node_remove``: hard removal of a worker node (``cluster.remove_node(node,
  allow_graceful=False)``), a new node added a few seconds later; never the head;
- ``supervisor_kill``: SIGKILL of the supervisor's process (pid from its ``info``);
- ``redis_restart``: SIGKILL of redis-server and a restart on the same port after a pause.

Every run is then checked against a reference (``run_inline`` on a `MemoryStore`, same
agent and question, no fault): the same final answer; every tool call of the reference,
as (tool, arguments), and no other (not ledger keys: a lost call's redo adds a step, which
shifts the step numbers in the keys); committed steps (history minus ``restart`` events)
exactly 1..final (a duplicate step or an older epoch after a newer one is a zombie commit
accepted, a gap a step lost). A tool executed more than once (its ledger count > 1) is an
``idempotent rerun after executor death`` when that very call (run, effect id) was claimed
by an executor at the moment we killed it (or removed its node) and its class allows a
re-run (pure, idempotent, keyed): the claims are read from Redis just before and after the
kill. Any other extra execution is a side effect duplicated (an invariant).

Recovery: host kill -> the run's next committed step by a newer epoch; executor kill ->
the lost call reported to its run (``effect_lost`` committed) and the next result
committed; node removal -> each run it held or had calls on commits again.

Exit status 1 if any invariant is violated (step lost, side effect duplicated, zombie
commit accepted, a run that did not finish with the reference answer and calls). A bad run
is printed with its history, its decoded inbox and the supervisor's log; a run that never
ended also with its raw Redis state and what each pool actor says it is doing; a killed
host's run not restarted within 10 s with a ``py-spy dump`` of the supervisor; and the
three slowest runs with their events and the faults meanwhile. Everything is shut down by pid at
the end (``ray.shutdown``, ``cluster.shutdown``, redis-server SIGTERM, leftover workers
of our cluster by pid); never ``ray stop``.

``--mode recovery`` measures instead, one run at a time: a host SIGKILLed while it holds a
run that just asked for a model call (``--kills``), an executor SIGKILLed in a model call
(``--executor-kills``); and, over ``--node-trials`` hard node removals with
``--node-runs`` runs in flight, the time until every run held by or calling on the
removed node committed again, with Ray's default health checks.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from undying import Settings, Undying
from undying.actors.pool import executor_name, executor_names, pool_actors
from undying.actors.research import slow_agent
from undying.persistence import TERMINAL, RedisServer, RunExists, RunNotFound, UndyingError
from undying.testing import MemoryStore, run_inline

from . import _util as U

QUESTIONS = (
    "How do fencing tokens stop zombie writers, and what does appendfsync always guarantee?",
    "What is an OTP supervision tree and how does exponential backoff with jitter help?",
    "How does a transactional outbox relate to idempotency keys?",
    "What do Ray actors and tasks offer LLM agents?",
)
KINDS = ("host_kill", "executor_kill", "node_remove", "supervisor_kill", "redis_restart")
WEIGHTS = (0.35, 0.2, 0.1, 0.1, 0.25)
POLICY = {"max_restarts": 10, "window_s": 60, "backoff_base_s": 0.2}
NODE_ARGS = {"num_cpus": 1, "object_store_memory": 80 << 20}
RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # loopback only
           "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}  # no stats, no token files
RERUN_ALLOWED = ("pure", "idempotent", "keyed")  # classes that may run again after a loss
CATCH_S = 3.0  # how long a host kill looks for a host holding a run


# -- the schedule --------------------------------------------------------------------------


@dataclass(frozen=True)
class Fault:
    at: float  # seconds after the workload started
    kind: str
    pick: float  # in [0, 1): which candidate (run, node) is hit, among those of the moment
    pause: float  # node_remove: seconds until a new node is added; redis_restart: seconds down


def make_schedule(seed: int, duration: float, every: float) -> list[Fault]:
    """Fault times and kinds from the seed alone: every kind at least once, then weighted."""
    rng = random.Random(seed)
    margin = min(3.0, duration * 0.15)
    lo, hi = margin, duration - margin
    n = max(len(KINDS), round((hi - lo) / every))
    kinds = list(KINDS) + rng.choices(KINDS, weights=WEIGHTS, k=n - len(KINDS))
    rng.shuffle(kinds)
    slot = (hi - lo) / n
    out = []
    for i, kind in enumerate(kinds):
        at = lo + (i + rng.uniform(0.15, 0.85)) * slot
        pick = rng.random()
        node_pause, redis_pause = rng.uniform(2.0, 5.0), rng.uniform(0.2, 1.0)
        pause = node_pause if kind == "node_remove" else redis_pause if kind == "redis_restart" else 0.0
        out.append(Fault(round(at, 2), kind, round(pick, 4), round(pause, 2)))
    return out


def format_schedule(faults: list[Fault]) -> str:
    rows = [[str(i), f"{f.at:.2f}", f.kind, f"{f.pick:.4f}", f"{f.pause:.2f}" if f.pause else "-"]
            for i, f in enumerate(faults)]
    return U.table(rows, ["#", "at s", "kind", "pick", "pause s"])


# -- bookkeeping -----------------------------------------------------------------------------


@dataclass
class Run:
    run_id: str
    q: int
    submitted: float  # wall time
    launched: float | None = None
    ended: float | None = None
    status: str = "submitted"
    launch_errors: list[str] = field(default_factory=list)
    launch_failed: bool = False


@dataclass
class Probe:
    """A fault that hit a run: it must commit again."""

    run_id: str
    kind: str  # host_kill | executor_kill | node_remove
    fault: int  # index into the executed faults
    t: float  # wall time of the fault
    epoch: int  # host_kill / node_remove (held): the activation that was hit; else 0
    held: bool  # a host on the node held the run (node_remove)


@dataclass
class Reference:
    answer: str
    calls: dict[str, int]  # json [tool, arguments] -> executions
    steps: int


def references() -> list[Reference]:
    out = []
    for q in QUESTIONS:
        store = MemoryStore()
        state = run_inline(store, slow_agent(0.0), q, run_id="ref")
        assert state.status == "finished", state.error
        calls, _ = calls_of(state, store.ledger("ref"))
        out.append(Reference(state.result or "", calls, state.step))
    return out


def _call(tool: str, arguments: dict[str, Any]) -> str:
    return json.dumps([tool, arguments], sort_keys=True)


def calls_of(state: Any, ledger: dict[str, int]) -> tuple[dict[str, int], dict[str, int]]:
    """The ledger as (tool, arguments) -> executions, and effect id -> executions.

    Ledger keys are ``tool|<run>:<step>:<i>``; the journal maps that key to the call.
    A key with no journal entry is kept as it is (it then matches no reference call).
    """
    by_key = {e.key: e for e in state.journal.values()}
    calls: dict[str, int] = {}
    per_effect: dict[str, int] = {}
    for k, n in ledger.items():
        e = by_key.get(k.split("|", 1)[1])
        call = _call(e.tool, e.arguments) if e is not None else k
        calls[call] = calls.get(call, 0) + n
        if e is not None:
            per_effect[e.call_id] = per_effect.get(e.call_id, 0) + n
    return calls, per_effect


def _short(exc: BaseException) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip().splitlines()  # no terminal colours
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:200]


def _is_ray_process(pid: int, marker: str) -> bool:
    """Only ever signal a process of ours: a Ray worker whose title names the actor class."""
    try:
        import psutil

        p = psutil.Process(pid)
        return any(marker in part for part in p.cmdline()) or marker in p.name()
    except Exception:
        return False


class _Pids:
    """Processes we saw, with their start times: a pid reused by another process is never ours."""

    def __init__(self) -> None:
        self.seen: dict[int, float] = {}

    def add(self, pid: int) -> None:
        if pid and pid not in self.seen:
            with contextlib.suppress(Exception):
                import psutil

                self.seen[pid] = psutil.Process(pid).create_time()

    def still_ours(self) -> list[int]:
        import psutil

        out = []
        for pid, created in sorted(self.seen.items()):
            with contextlib.suppress(Exception):
                p = psutil.Process(pid)
                if p.create_time() == created and "ray::" in " ".join(p.cmdline()):
                    out.append(pid)
        return out


GAVE_UP = "gave up"


def launch(ud: Undying, agent: Any, task: str, run_id: str, timeout: float) -> list[str]:
    """Start a run, retrying through faults; the errors retried (last GAVE_UP if it gave up).

    Starting a run stores it and queues it for a host. That write can fail while Redis is
    killed, or succeed with its reply lost: the client's retry then finds the run there
    (`RunExists`), and `resume` makes sure it is queued.
    """
    errors: list[str] = []
    created = False
    delay = 0.2
    deadline = time.monotonic() + timeout
    while True:
        try:
            if created:
                ud.resume(run_id)
            else:
                ud.start(agent, task, run_id=run_id)
            return errors
        except RunExists:
            errors.append("RunExists for our own new run (create retried)")
            created = True
            continue
        except Exception as exc:
            errors.append(_short(exc))
            if not created:
                with contextlib.suppress(Exception):
                    ud.info(run_id)
                    created = True
        if time.monotonic() > deadline:
            errors.append(GAVE_UP)
            return errors
        time.sleep(delay)
        delay = min(delay * 2, 2.0)


def _py_spy(pid: int) -> str:
    """The Python stacks of a process (py-spy, if installed): where a stalled actor waits."""
    try:
        out = subprocess.run(["py-spy", "dump", "--pid", str(pid)], capture_output=True,
                             text=True, timeout=30)
        return (out.stdout or out.stderr)[-8000:]
    except Exception as exc:
        return f"py-spy: {_short(exc)}"


def _owner(ud: Undying, rid: str) -> tuple[int, str, str, int]:
    """The run's lease now: (epoch, host, node, pid), epoch -1 when no host holds it."""
    info = ud.actor_info(rid)
    if info is None:
        return -1, "", "", 0
    return int(info["epoch"]), str(info["host"]), str(info["node_id"]), int(info["pid"])


def _claims(ud: Undying, node: str) -> set[tuple[str, str, int]]:
    """Dispatches the node's executors have claimed and not completed: (run, effect, attempt)."""
    return {(r, e, a) for name in executor_names(node)
            for r, e, a, _inc in ud.store.executor_claims(name)}  # type: ignore[attr-defined]


# -- the environment: Redis, a multi-node cluster, the client ---------------------------------


class Env:
    def __init__(self, root: Path, nodes: int, namespace: str, pool: dict[str, Any]) -> None:
        self.root = root
        self.nodes = nodes
        self.namespace = namespace
        self.pool = pool
        self.redis: RedisServer | None = None
        self.cluster: Any = None
        self.ud: Undying | None = None
        self.pids = _Pids()  # pool and supervisor processes we saw, for cleanup
        self.temp = root / "ray"

    def start(self) -> Env:
        os.environ.update(RAY_ENV)  # before Ray starts: the nodes and workers inherit it
        import ray
        from ray.cluster_utils import Cluster

        self.redis = RedisServer(self.root / "redis", appendfsync="always").start()
        self.temp.mkdir(parents=True, exist_ok=True)
        t = time.monotonic()
        self.cluster = Cluster(initialize_head=True, head_node_args={
            **NODE_ARGS, "include_dashboard": False, "temp_dir": str(self.temp)})
        for _ in range(self.nodes - 1):
            self.add_node()
        ray.init(address=self.cluster.address, log_to_driver=False, namespace=self.namespace)
        self.cluster.wait_for_nodes()
        self.cluster_up_s = time.monotonic() - t
        self.ud = Undying(Settings(redis_url=self.redis.url, namespace=self.namespace,
                                   ray_address=self.cluster.address), policy=POLICY,
                          actor_options=self.pool)
        t = time.monotonic()
        self.ud.supervisor()  # boots the pool on every node
        self.wait_pool(60)
        self.pool_up_s = time.monotonic() - t
        return self

    def wait_pool(self, timeout: float) -> None:
        """Until every pool actor answers (their creation is what takes time on 2 cores)."""
        import ray

        deadline = time.monotonic() + timeout
        want = len(self.node_ids()) * (1 + int(self.pool.get("hosts_per_node", 4)))
        while time.monotonic() < deadline:
            actors = pool_actors(self.namespace)
            if len(actors) >= want:
                refs = [h.info.remote() for h in actors.values()]
                left = max(0.1, deadline - time.monotonic())
                ready, _ = ray.wait(refs, num_returns=len(refs), timeout=left)
                if len(ready) == len(refs):
                    for info in ray.get(ready):
                        self.pids.add(int(info["pid"]))
                    return
            time.sleep(0.2)

    def add_node(self) -> Any:
        return self.cluster.add_node(**NODE_ARGS, temp_dir=str(self.temp))

    def workers(self) -> list[Any]:
        return sorted(self.cluster.worker_nodes, key=lambda n: n.node_id)

    def node_ids(self) -> list[str]:
        """Our nodes now (the head first): removed ones are gone from the list at once."""
        return [self.cluster.head_node.node_id, *[n.node_id for n in self.workers()]]

    def supervisor_pid(self, timeout: float = 30) -> int:
        import ray

        info: Any = ray.get(self.ud.supervisor().info.remote(), timeout=timeout)  # type: ignore[union-attr]
        pid = int(info["pid"])
        self.pids.add(pid)
        return pid

    def supervisor_info(self, log: bool = False, timeout: float = 10) -> dict[str, Any]:
        import ray

        try:
            return dict(ray.get(self.ud.supervisor().info.remote(log), timeout=timeout))  # type: ignore[union-attr]
        except Exception as exc:
            return {"error": _short(exc)}

    def executor_pid(self, node: str, timeout: float = 5) -> int:
        import ray

        h = ray.get_actor(executor_name(node), namespace=self.namespace)
        info: Any = ray.get(h.info.remote(), timeout=timeout)
        pid = int(info["pid"])
        self.pids.add(pid)
        return pid

    def _note_pool_pids(self) -> None:
        """The pool's pids, so that a worker which outlives its raylet is still killed."""
        import ray

        with contextlib.suppress(Exception):
            refs = [h.info.remote() for h in pool_actors(self.namespace).values()]
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=3)
            for ref in ready:
                with contextlib.suppress(Exception):
                    self.pids.add(int(ray.get(ref)["pid"]))

    def stop(self) -> None:
        import ray

        if ray.is_initialized():
            self._note_pool_pids()
        with contextlib.suppress(Exception):
            if self.ud is not None:
                self.ud.close()
        with contextlib.suppress(Exception):
            ray.shutdown()
        if self.cluster is not None:
            try:
                self.cluster.shutdown()
            except Exception as exc:
                print(f"cluster.shutdown: {_short(exc)}", file=sys.stderr)
        proc = self.redis.proc if self.redis is not None else None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # fsyncs its AOF and exits
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        U._kill_leftovers(str(self.temp))
        # pool actors rename their process (ray::RunHost): kill stragglers by the pids we saw
        time.sleep(0.5)
        for pid in self.pids.still_ours():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


# -- chaos -------------------------------------------------------------------------------------


class Chaos:
    def __init__(self, env: Env, args: argparse.Namespace, schedule: list[Fault],
                 refs: list[Reference]) -> None:
        self.env = env
        self.ud: Undying = env.ud  # type: ignore[assignment]
        self.args = args
        self.schedule = schedule
        self.refs = refs
        self.agent = slow_agent(args.latency)
        self.runs: dict[str, Run] = {}
        self.inflight: dict[str, Run] = {}
        self.faults: list[dict[str, Any]] = []
        self.probes: list[Probe] = []
        # (run, effect) -> attempts claimed by an executor when we killed it or removed its node
        self.killed_claims: dict[tuple[str, str], set[int]] = {}
        self.pending_adds: list[tuple[float, int]] = []  # (monotonic due, fault index)
        self.pool = ThreadPoolExecutor(max_workers=args.start_concurrency, thread_name_prefix="start")
        self.rng = random.Random(args.seed + 1)  # only question choice: never the schedule
        self.lock = threading.Lock()
        self.threads: list[threading.Thread] = []
        self.held_samples: list[int] = []  # runs held by a host, per poll
        self.done = threading.Event()  # the runs have ended: watchers stop

    # -- runs -----------------------------------------------------------------

    def submit(self) -> None:
        rid = f"chaos-{uuid.uuid4().hex[:12]}"
        run = Run(rid, self.rng.randrange(len(QUESTIONS)), time.time())
        self.runs[rid] = run
        self.inflight[rid] = run
        self.pool.submit(self._launch, run)

    def _launch(self, run: Run) -> None:
        run.launch_errors = launch(self.ud, self.agent, QUESTIONS[run.q], run.run_id,
                                   self.args.launch_timeout)
        if run.launch_errors and run.launch_errors[-1] == GAVE_UP:
            run.launch_failed = True
        else:
            run.launched = time.time()

    def poll(self) -> None:
        for rid, run in list(self.inflight.items()):
            try:
                status = self.ud.info(rid).status
            except RunNotFound:
                if run.launch_failed:
                    run.status = "never created"
                    run.ended = time.time()
                    del self.inflight[rid]
                continue
            run.status = status
            if status in TERMINAL:
                run.ended = time.time()
                del self.inflight[rid]

    # -- faults ---------------------------------------------------------------

    def do_fault(self, i: int, f: Fault, t_rel: float) -> None:
        rec: dict[str, Any] = {"i": i, "at": f.at, "late_s": round(t_rel - f.at, 2), "kind": f.kind}
        try:
            getattr(self, f"_{f.kind}")(f, rec, len(self.faults))
        except Exception as exc:
            rec["error"] = _short(exc)
        self.faults.append(rec)
        detail = {k: v for k, v in rec.items() if k not in ("i", "at", "kind", "t")}
        print(f"  [{t_rel:7.2f}s] fault {i:2d} {f.kind:15s} {detail}", flush=True)

    def _host_kill(self, f: Fault, rec: dict[str, Any], idx: int) -> None:
        """SIGKILL the host holding a run: the run picked, or the next one held within 3 s.

        A host that let its run go between our reading the lease and the kill did not hold
        it: that kill is noted as a miss and the next held run is tried (at most 3 kills).
        """
        candidates = sorted(rid for rid, r in self.inflight.items() if r.launched is not None)
        if not candidates:
            rec["skipped"] = "no run in flight"
            return
        start = int(f.pick * len(candidates))
        order = candidates[start:] + candidates[:start]
        t0 = time.monotonic()
        missed: list[dict[str, Any]] = []
        while time.monotonic() - t0 < CATCH_S and len(missed) < 3:
            held = set(self.ud.store.leases())  # type: ignore[attr-defined]
            for rid in order:
                if rid not in held:
                    continue
                epoch, host, node, pid = _owner(self.ud, rid)
                if epoch < 0 or not _is_ray_process(pid, "RunHost"):
                    continue
                self.env.pids.add(pid)
                if _owner(self.ud, rid)[0] != epoch:
                    continue  # it let the run go while we looked at its process
                if self.ud.info(rid).status in TERMINAL:
                    continue  # paused after the final commit: nothing left to restart
                t = time.time()
                os.kill(pid, signal.SIGKILL)
                # the lease still names the killed activation: the host held the run then
                if _owner(self.ud, rid)[0] != epoch:
                    missed.append({"run": rid, "pid": pid})
                    rec["missed"] = missed
                    break
                self.probes.append(Probe(rid, "host_kill", idx, t, epoch, True))
                rec.update(run=rid, pid=pid, host=host.split("#")[0].rsplit(":", 1)[-1],
                           node=node[:8], epoch=epoch, waited_s=round(time.monotonic() - t0, 2),
                           t=t)
                th = threading.Thread(target=self._watchdog, args=(rid, epoch, t, rec), daemon=True)
                th.start()
                self.threads.append(th)
                return
            time.sleep(0.01)
        rec["skipped"] = (f"no host held one of {len(candidates)} runs for {CATCH_S:g} s "
                          f"({len(missed)} kills missed)")

    def _executor_kill(self, f: Fault, rec: dict[str, Any], idx: int) -> None:
        """SIGKILL a node's executor: one with calls in flight if one has within 3 s."""
        t0 = time.monotonic()
        while True:
            nodes = self.env.node_ids()
            busy = [n for n in nodes if _claims(self.ud, n)]
            if busy or time.monotonic() - t0 > CATCH_S:
                break
            time.sleep(0.02)
        pool = busy or nodes
        start = int(f.pick * len(pool))
        errors = []
        for node in pool[start:] + pool[:start]:  # a new node may not have its executor yet
            try:
                pid = self.env.executor_pid(node)
            except Exception as exc:
                errors.append(f"{node[:8]}: {_short(exc)}")
                continue
            if not _is_ray_process(pid, "ExecutorActor"):
                errors.append(f"{node[:8]}: pid {pid} is not an executor")
                continue
            break
        else:
            rec["skipped"] = f"no executor found: {errors}"
            return
        if errors:
            rec["tried"] = errors
        before = _claims(self.ud, node)
        t = time.time()
        os.kill(pid, signal.SIGKILL)
        after = _claims(self.ud, node)  # claimed in the meantime (the supervisor drops them soon)
        hit = before | after
        self._note_killed(hit)
        for rid in sorted({c[0] for c in hit}):
            self.probes.append(Probe(rid, "executor_kill", idx, t, 0, False))
        rec.update(node=node[:8], pid=pid, calls_in_flight=len(hit),
                   runs_hit=len({c[0] for c in hit}), t=t)

    def _watchdog(self, rid: str, epoch: int, t: float, rec: dict[str, Any],
                  limit_s: float = 10.0) -> None:
        """A run whose host was killed is restarted within ms (Ray's death signal) or within
        the lease TTL; if not within ``limit_s``, keep what the supervisor was doing then."""
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                if any(e.kind == "restart" and e.epoch > epoch for e in self.ud.history(rid)):
                    return
                if self.ud.info(rid).status in TERMINAL:
                    return
            time.sleep(0.2)
        stalled: dict[str, Any] = {"after_s": round(time.time() - t, 1)}
        info = self.env.supervisor_info(log=True, timeout=5)
        stalled["supervisor"] = {k: v for k, v in info.items() if k not in ("log", "nodes", "pool")}
        stalled["log_tail"] = [str(x)[:300] for x in info.get("log", [])[-15:]]
        if "pid" in info:
            stalled["py_spy"] = _py_spy(int(info["pid"]))
        rec["supervisor_stalled"] = stalled
        print(f"  supervisor did not restart {rid} within {limit_s:g} s of its host's kill: "
              f"{json.dumps(stalled, default=str)[:6000]}", flush=True)

    def _note_killed(self, claims: set[tuple[str, str, int]]) -> None:
        with self.lock:
            for rid, eid, attempt in claims:
                self.killed_claims.setdefault((rid, eid), set()).add(attempt)

    def _node_remove(self, f: Fault, rec: dict[str, Any], idx: int) -> None:
        workers = self.env.workers()
        if not workers:
            rec["skipped"] = "no worker node left"
            return
        victim = workers[int(f.pick * len(workers))]
        node = victim.node_id
        held = {}
        for rid in self.ud.store.leases():  # type: ignore[attr-defined]
            epoch, _host, owner_node, pid = _owner(self.ud, rid)
            if epoch >= 0 and owner_node == node:
                held[rid] = epoch
                self.env.pids.add(pid)
        claims = _claims(self.ud, node)
        t = time.time()
        self.env.cluster.remove_node(victim, allow_graceful=False)
        rec.update(node=node[:8], runs_held=len(held), calls_in_flight=len(claims), t=t,
                   remove_s=round(time.time() - t, 2), add_in_s=f.pause)
        self._note_killed(claims)
        # the node's executor may outlive its raylet for a while and claim more: watch its
        # claims until Ray declares the node dead and the supervisor reports them (~15 s)
        th = threading.Thread(target=self._watch_claims, args=(node, 30.0, rec), daemon=True)
        th.start()
        self.threads.append(th)
        for rid in sorted(set(held) | {c[0] for c in claims}):
            self.probes.append(Probe(rid, "node_remove", idx, t, held.get(rid, 0), rid in held))
        self.pending_adds.append((time.monotonic() + f.pause, idx))

    def _watch_claims(self, node: str, seconds: float, rec: dict[str, Any]) -> None:
        deadline = time.monotonic() + seconds
        seen: set[tuple[str, str, int]] = set()
        while time.monotonic() < deadline and not self.done.is_set():
            with contextlib.suppress(Exception):
                seen |= _claims(self.ud, node)
            time.sleep(0.1)
        self._note_killed(seen)
        rec["calls_claimed_on_removed_node"] = len(seen)

    def _add_due_nodes(self, force: bool = False) -> None:
        now = time.monotonic()
        for item in list(self.pending_adds):
            if force or item[0] <= now:
                self.pending_adds.remove(item)
                t = time.monotonic()
                try:
                    node = self.env.add_node()
                    self.faults[item[1]]["added"] = node.node_id[:8]
                    self.faults[item[1]]["add_s"] = round(time.monotonic() - t, 2)
                except Exception as exc:
                    self.faults[item[1]]["add_error"] = _short(exc)

    def _supervisor_kill(self, f: Fault, rec: dict[str, Any], idx: int) -> None:
        pid = self.env.supervisor_pid()
        if not _is_ray_process(pid, "SupervisorActor"):
            rec["skipped"] = f"pid {pid} is not the supervisor"
            return
        t = time.time()
        os.kill(pid, signal.SIGKILL)
        rec.update(pid=pid, t=t)

        def back() -> None:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                try:
                    new = self.env.supervisor_pid(timeout=2)
                    if new != pid:
                        rec["back_s"] = round(time.time() - t, 2)
                        return
                except Exception:
                    pass
                time.sleep(0.05)
            rec["back_s"] = None

        th = threading.Thread(target=back, daemon=True)
        th.start()
        self.threads.append(th)

    def _redis_restart(self, f: Fault, rec: dict[str, Any], idx: int) -> None:
        server = self.env.redis
        assert server is not None
        t = time.time()
        server.kill()
        time.sleep(f.pause)
        server.start(timeout=30)
        rec.update(down_s=round(time.time() - t, 2), t=t)

    # -- the workload -------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        a = self.args
        t0 = time.monotonic()
        end = t0 + a.duration
        next_fault = 0
        last_poll = 0.0
        last_print = t0
        while True:
            now = time.monotonic()
            if now >= end:
                break
            while len(self.inflight) < a.runs:
                self.submit()
            while next_fault < len(self.schedule) and now - t0 >= self.schedule[next_fault].at:
                self.do_fault(next_fault, self.schedule[next_fault], now - t0)
                next_fault += 1
                now = time.monotonic()
            self._add_due_nodes()
            if now - last_poll >= 0.25:
                self.poll()
                last_poll = now
                with contextlib.suppress(Exception):
                    self.held_samples.append(len(self.ud.store.leases()))  # type: ignore[attr-defined]
            if now - last_print >= 30:
                last_print = now
                done = sum(1 for r in self.runs.values() if r.ended)
                print(f"  [{now - t0:7.2f}s] {done} runs ended, {len(self.inflight)} in flight, "
                      f"load {os.getloadavg()[0]:.1f}", flush=True)
            time.sleep(0.05)
        workload_s = time.monotonic() - t0
        # the duration is over: no new runs; let the last ones finish, within a bound
        self._add_due_nodes(force=True)
        drain_t0 = time.monotonic()
        while self.inflight and time.monotonic() - drain_t0 < a.drain_timeout:
            self.poll()
            time.sleep(0.25)
        drain_s = time.monotonic() - drain_t0
        self.done.set()
        self.pool.shutdown(wait=False, cancel_futures=True)
        for th in self.threads:
            th.join(timeout=10)
        return {"workload_s": round(workload_s, 1), "drain_s": round(drain_s, 1),
                "unfinished_at_drain_end": len(self.inflight)}

    # -- checking -------------------------------------------------------------------

    def verify(self) -> tuple[list[dict[str, Any]], dict[str, list[Any]]]:
        results = []
        histories: dict[str, list[Any]] = {}
        for rid, run in self.runs.items():
            results.append(verify_run(self.ud, rid, self.refs[run.q], histories,
                                      self.killed_claims))
            results[-1]["launch_errors"] = len(run.launch_errors)
            results[-1]["launch_error_texts"] = run.launch_errors[:3]
        return results, histories


def verify_run(ud: Undying, rid: str, ref: Reference, histories: dict[str, list[Any]],
               killed_claims: dict[tuple[str, str], set[int]]) -> dict[str, Any]:
    """One run against its reference. ``killed_claims``: (run, effect) -> attempts an
    executor had claimed when we killed it (or removed its node)."""
    out: dict[str, Any] = {"run_id": rid, "status": "never created", "ok": False, "lost": 0,
                           "duplicated": 0, "reruns": 0, "zombie": 0, "answer_ok": False,
                           "calls_ok": False}
    try:
        state = ud.state(rid)
        history = ud.history(rid)
    except RunNotFound:
        return out
    except UndyingError as exc:  # a checkpoint that does not decode: the run is bad, go on
        out["status"] = f"unreadable: {_short(exc)}"
        with contextlib.suppress(UndyingError):
            out["events"] = [(e.step, e.epoch, e.kind, e.at_ms, e.summary[:80])
                             for e in ud.history(rid)]
        return out
    histories[rid] = history
    commits = [e for e in history if e.kind != "restart"]
    final = state.step
    zombie_idx = set()
    seen: set[int] = set()
    top_epoch = -1
    for i, e in enumerate(commits):
        if e.step in seen or e.epoch < top_epoch or e.step > final:
            zombie_idx.add(i)  # a second writer for a step, or an older epoch after a newer one
        seen.add(e.step)
        top_epoch = max(top_epoch, e.epoch)
    lost = len(set(range(1, final + 1)) - {e.step for e in commits})
    calls, per_effect = calls_of(state, ud.ledger(rid))
    # extra executions of one call (one effect id), explained or not by an executor death
    reruns, dup = 0, 0
    dup_detail: dict[str, Any] = {}
    for eid, n in per_effect.items():
        if n <= 1:
            continue
        entry = state.journal[eid]
        in_flight = len(killed_claims.get((rid, eid), ()))
        explained = min(n - 1, in_flight) if entry.side_effect in RERUN_ALLOWED else 0
        reruns += explained
        dup += n - 1 - explained
        dup_detail[eid] = {"tool": entry.tool, "side_effect": entry.side_effect, "executions": n,
                           "attempts_in_flight_on_killed_executors": in_flight}
    # the same call decided twice (two effect ids): never explained by a lost dispatch
    decided: dict[str, int] = {}
    for e in state.journal.values():
        if per_effect.get(e.call_id, 0) > 0:
            c = _call(e.tool, e.arguments)
            decided[c] = decided.get(c, 0) + 1
    for c, k in decided.items():
        if k > ref.calls.get(c, 0) >= 1:
            dup += k - ref.calls[c]
            dup_detail[c] = {"decided": k, "reference": ref.calls[c]}
    finished = state.status == "finished"
    answer_ok = finished and state.result == ref.answer
    calls_ok = finished and set(calls) == set(ref.calls)
    out.update(status=state.status, steps=final, ref_steps=ref.steps, lost=lost, duplicated=dup,
               reruns=reruns, zombie=len(zombie_idx), answer_ok=answer_ok, calls_ok=calls_ok,
               restarts=sum(1 for e in history if e.kind == "restart"),
               restart_reasons=[_reason(e.summary) for e in history if e.kind == "restart"],
               lost_calls=sum(1 for e in commits if e.kind == "effect_lost"),
               epochs=len({e.epoch for e in commits}), error=state.error)
    out["ok"] = answer_ok and calls_ok and lost == 0 and dup == 0 and not zombie_idx
    if dup_detail:
        out["extra_executions"] = dup_detail
    if not out["ok"]:
        out["events"] = [(e.step, e.epoch, e.kind, e.at_ms, e.summary[:80]) for e in history]
        with contextlib.suppress(Exception):
            out["inbox"] = inbox_digest(ud, rid)
        if not calls_ok:
            out["calls_missing"] = sorted(set(ref.calls) - set(calls))
            out["calls_unexpected"] = sorted(set(calls) - set(ref.calls))
    return out


def inbox_digest(ud: Undying, rid: str) -> list[tuple[Any, ...]]:
    """The run's whole inbox (it is never trimmed): (entry ms, type, effect or message id,
    attempt, reason) of each message, to tell where a result or a loss report came from."""
    from undying.actors._state import Envelope
    from undying.persistence import decode

    out: list[tuple[Any, ...]] = []
    after = "0-0"
    while True:
        batch = ud.store.read_inbox(rid, after, 500)
        for entry in batch:
            after = entry.entry_id
            try:
                m = decode("message", Envelope, entry.data, run_id=rid).message
            except Exception as exc:
                out.append((entry.entry_id, "undecodable", _short(exc)))
                continue
            out.append((int(entry.entry_id.split("-")[0]), m.type, getattr(m, "effect_id", m.id),
                        getattr(m, "attempt", None), getattr(m, "reason", "")[:100]))
        if len(batch) < 500:
            return out


def _reason(summary: str) -> str:
    """'restart 1: host undying-host:<node>:0 died: ActorDiedError: ...' -> 'host died'."""
    text = summary.split(": ", 1)[1] if ": " in summary else summary
    if text.startswith("host ") and " died" in text:
        return "host died (Ray)"
    if text.startswith("host ") and "stopped answering" in text:
        return "host stopped answering"
    if text.startswith("activation crashed"):
        return text[:60]
    return text.split(": ")[0][:60] or "?"


def _count(items: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for x in items:
        out[x] = out.get(x, 0) + 1
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def _first(history: list[Any] | None, t: float, pred: Any) -> float | None:
    """Seconds from ``t`` to the first event after it that satisfies ``pred``."""
    for e in history or []:
        if e.at_ms / 1000 >= t - 0.001 and pred(e):
            return e.at_ms / 1000 - t
    return None


def decided_s(p: Probe, history: list[Any] | None) -> float | None:
    """Host kill: from the fault to the supervisor's restart event (a newer epoch)."""
    return _first(history, p.t, lambda e: e.kind == "restart" and e.epoch > p.epoch)


def recovery_s(p: Probe, history: list[Any] | None) -> float | None:
    """From the fault to the run's next committed step that is not the hit activation's."""
    if p.kind == "executor_kill" or (p.kind == "node_remove" and not p.held):
        return _first(history, p.t, lambda e: e.kind != "restart")
    return _first(history, p.t, lambda e: e.kind != "restart" and e.epoch > p.epoch)


def lost_reported_s(p: Probe, history: list[Any] | None) -> float | None:
    return _first(history, p.t, lambda e: e.kind == "effect_lost")


def redone_s(p: Probe, history: list[Any] | None) -> float | None:
    """From the fault to the first result committed after the run's lost call was reported."""
    lost = lost_reported_s(p, history)
    if lost is None:
        return None
    return _first(history, p.t + lost + 0.0005,
                  lambda e: e.kind in ("model_reply", "tool_result", "model_failed"))


def attribute_restarts(faults: list[dict[str, Any]], histories: dict[str, list[Any]],
                       within_s: float = 10.0) -> dict[str, int]:
    """Restart events by the kind of the last fault before them (within ``within_s``), and
    their reason: which fault makes the supervisor restart runs, and why."""
    done = sorted((f["t"], f["kind"]) for f in faults if "t" in f)
    out = []
    for h in histories.values():
        for e in h:
            if e.kind != "restart":
                continue
            at = e.at_ms / 1000
            last = [(t, k) for t, k in done if t <= at][-1:]
            kind = last[0][1] if last and at - last[0][0] <= within_s else "no fault"
            out.append(f"{kind}: {_reason(e.summary)}")
    return _count(out)


def _pcts(xs: list[float]) -> dict[str, Any]:
    if not xs:
        return {"n": 0, "p50": None, "p99": None, "max": None}
    return {"n": len(xs), "p50": round(U.p50(xs), 3), "p99": round(U.pct(xs, 99), 3),
            "max": round(max(xs), 3)}


def _fmt(d: dict[str, Any]) -> str:
    if not d["n"]:
        return "n=0"
    return f"p50 {d['p50']:.2f} s, p99 {d['p99']:.2f} s, max {d['max']:.2f} s (n={d['n']})"


def forensics(env: Env, rids: list[str]) -> dict[str, Any]:
    """What Redis and the pool say about runs that never ended: their raw keys (lease,
    epoch, inbox after the cursor, dispatch records), whether the ready queue or a host's
    list of runs it took holds them, and what each pool actor says it is doing."""
    import ray

    out: dict[str, Any] = {}
    r = env.ud.store.r  # type: ignore[union-attr]

    def s(v: Any) -> Any:
        return v.decode(errors="replace") if isinstance(v, bytes) else v

    try:
        ready = [s(x) for x in r.lrange("ud:ready", 0, -1)]
        taking = {s(k): [s(x) for x in r.lrange(k, 0, -1)] for k in r.scan_iter("ud:taking:*")}
        leases = {s(k): v for k, v in r.zrange("ud:leases", 0, -1, withscores=True)}
        due = {s(k): v for k, v in r.zrange("ud:fx:due", 0, -1, withscores=True)}
        hosts = {s(k): s(v) for k, v in r.hgetall("ud:hosts").items()}
        now_ms = int(time.time() * 1000)
        for rid in rids:
            meta = {s(k): s(v) for k, v in r.hgetall(f"ud:{{{rid}}}:meta").items()}
            cursor = str(env.ud.state(rid).inbox_cursor) if env.ud else "0-0"  # type: ignore[union-attr]
            inbox = r.xrange(f"ud:{{{rid}}}:inbox", f"({cursor}", "+")
            out[rid] = {
                "meta": {k: v for k, v in meta.items() if k in ("status", "epoch", "step", "clean")},
                "lease": s(r.get(f"ud:{{{rid}}}:lease")),
                "lease_ttl_ms": r.pttl(f"ud:{{{rid}}}:lease"),
                "in_leases_zset_expires_in_ms": (int(leases[rid]) - now_ms) if rid in leases else None,
                "in_ready_queue": rid in ready,
                "in_taking_lists": [k for k, v in taking.items() if rid in v],
                "inbox_cursor": cursor,
                "inbox_after_cursor": [(s(eid), len(f.get(b"m", b""))) for eid, f in inbox],
                "fx_records": {s(k): s(v) for k, v in r.hgetall(f"ud:{{{rid}}}:fx").items()},
                "fx_due_in_ms": {k: int(v) - now_ms for k, v in due.items() if k.startswith(rid)},
                "pending": {e: p.model_dump() for e, p in env.ud.state(rid).pending.items()},  # type: ignore[union-attr]
            }
        out["hosts_registered"] = {k: v[:120] for k, v in hosts.items()}
        out["taking_lists"] = {k: v for k, v in taking.items() if v}
        out["ready_len"] = len(ready)
    except Exception as exc:
        out["redis_error"] = _short(exc)
    with contextlib.suppress(Exception):
        if not ray.is_initialized():  # never start a Ray of our own just to look
            return out
        actors = pool_actors(env.namespace)
        refs = {name: h.info.remote() for name, h in actors.items()}
        ready_refs, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=5)
        got = {}
        for name, ref in refs.items():
            try:
                got[name] = ray.get(ref) if ref in ready_refs else "no answer in 5 s"
            except Exception as exc:
                got[name] = _short(exc)
        out["pool"] = got
    return out


def _slow_run(ud: Undying, run: Run, histories: dict[str, list[Any]],
              faults: list[dict[str, Any]]) -> dict[str, Any]:
    """A run of the tail: its events and inbox, and the faults during its life."""
    assert run.ended is not None
    h = histories.get(run.run_id, [])
    out: dict[str, Any] = {
        "run_id": run.run_id, "run_s": round(run.ended - run.submitted, 2),
        "submitted": round(run.submitted, 3),
        "events": [(e.step, e.epoch, e.kind, e.at_ms, e.summary[:60]) for e in h],
        "faults_meanwhile": [(round(f["t"], 2), f["kind"]) for f in faults
                             if "t" in f and run.submitted <= f["t"] <= run.ended]}
    with contextlib.suppress(Exception):
        out["inbox"] = inbox_digest(ud, run.run_id)
    return out


def _sup_evidence(env: Env, bad: list[dict[str, Any]]) -> list[str]:
    """The supervisor's log lines (its last incarnation) about the bad runs, and its last lines."""
    info = env.supervisor_info(log=True)
    log = [str(x) for x in info.get("log", [])]
    ids = {b["run_id"] for b in bad}
    about = [x for x in log if any(i in x for i in ids)]
    return [x[:400] for x in (about + ["-- last lines --"] + log[-30:])] if log else \
        [f"no supervisor log: {info.get('error', '')}"]


def chaos_main(args: argparse.Namespace, env: Env) -> tuple[dict[str, Any], bool]:
    schedule = make_schedule(args.seed, args.duration, args.fault_every)  # printed by main
    refs = references()
    chaos = Chaos(env, args, schedule, refs)
    print(f"workload: {args.runs} runs in flight, slow_agent({args.latency:g}), "
          f"{len(QUESTIONS)} questions; pool: {env.pool}", flush=True)
    phases = chaos.run()
    results, histories = chaos.verify()
    by_id = {r["run_id"]: r for r in results}

    host_rec, host_dec, exec_lost, exec_redo, node_rec = [], [], [], [], []
    unrecovered, host_hits = 0, 0
    for p in chaos.probes:
        h = histories.get(p.run_id)
        finished = by_id.get(p.run_id, {}).get("status") in TERMINAL
        if p.kind == "host_kill":
            d = decided_s(p, h)
            if d is None:
                continue  # the host let the run go before it died: the run was not hit
            host_hits += 1
            host_dec.append(d)
        r = recovery_s(p, h)
        if r is None:
            if not finished:
                unrecovered += 1
            continue
        if p.kind == "host_kill":
            host_rec.append(r)
        elif p.kind == "executor_kill":
            lost, redo = lost_reported_s(p, h), redone_s(p, h)
            if lost is not None:
                exec_lost.append(lost)
            if redo is not None:
                exec_redo.append(redo)
        else:
            node_rec.append(r)
    per_node = []
    for idx, rec in enumerate(chaos.faults):
        if rec["kind"] == "host_kill" and "t" in rec:
            p = next(x for x in chaos.probes if x.fault == idx)
            r = recovery_s(p, histories.get(p.run_id))
            d = decided_s(p, histories.get(p.run_id))
            rec["hit"] = d is not None
            rec["recovered_s"] = round(r, 2) if (r is not None and d is not None) else None
        if rec["kind"] != "node_remove" or "t" not in rec:
            continue
        hit = [p for p in chaos.probes if p.fault == idx]
        rs = [x for x in (recovery_s(p, histories.get(p.run_id)) for p in hit) if x is not None]
        rec["all_recovered_s"] = round(max(rs), 2) if rs else None
        # an activation on the removed node may outlive it for a moment: its commits after
        late = [e.at_ms / 1000 - p.t for p in hit if p.held for e in histories.get(p.run_id, [])
                if e.kind != "restart" and e.epoch == p.epoch and e.at_ms / 1000 > p.t]
        rec["old_epoch_commits_after"] = len(late)
        if rs:
            per_node.append(max(rs))
    attributed = attribute_restarts(chaos.faults, histories)
    sup = env.supervisor_info()
    counters: dict[str, int] = {}
    with contextlib.suppress(Exception):
        counters = env.ud.store.counters()  # type: ignore[union-attr, attr-defined]

    done = [f for f in chaos.faults if "t" in f]
    kinds = [f["kind"] for f in done]
    bad = [r for r in results if not r["ok"]]
    report: dict[str, Any] = {
        "seed": args.seed, "runs_in_flight": args.runs, "duration_s": args.duration,
        "latency_s": args.latency, "nodes": args.nodes, "pool": env.pool, **phases,
        "runs_started": len(results),
        "runs_finished": sum(1 for r in results if r["status"] == "finished"),
        "runs_failed": len(bad),
        "host_kills": kinds.count("host_kill"),
        "host_kills_that_hit_a_run": host_hits,
        "executor_kills": kinds.count("executor_kill"),
        "executor_kill_calls_in_flight": sum(f.get("calls_in_flight", 0) for f in done
                                             if f["kind"] == "executor_kill"),
        "node_removals": kinds.count("node_remove"),
        "runs_hit_by_node_removals": sum(1 for p in chaos.probes if p.kind == "node_remove"),
        "supervisor_kills": kinds.count("supervisor_kill"),
        "redis_restarts": kinds.count("redis_restart"),
        "faults_skipped": sum(1 for f in chaos.faults if "t" not in f),
        "steps_lost": sum(r["lost"] for r in results),
        "side_effects_duplicated": sum(r["duplicated"] for r in results),
        "idempotent_reruns_after_executor_death": sum(r["reruns"] for r in results),
        "zombie_commits_accepted": sum(r["zombie"] for r in results),
        "wrong_answers": sum(1 for r in results if r["status"] == "finished" and not r["answer_ok"]),
        "call_mismatches": sum(1 for r in results if r["status"] == "finished" and not r["calls_ok"]),
        "step_count_differs_from_reference": sum(
            1 for r in results if r["status"] == "finished" and r.get("steps") != r.get("ref_steps")),
        "restarts_recorded": sum(r.get("restarts", 0) for r in results),
        "lost_calls_reported": sum(r.get("lost_calls", 0) for r in results),
        "launch_retries": sum(r["launch_errors"] for r in results),
        "held_runs_mean": round(sum(chaos.held_samples) / max(1, len(chaos.held_samples)), 1),
        "held_runs_max": max(chaos.held_samples, default=0),
        "launch_s": _pcts([r.launched - r.submitted for r in chaos.runs.values() if r.launched]),
        "run_s": _pcts([r.ended - r.submitted for r in chaos.runs.values() if r.ended]),
        "runs_per_s": round(len(results) / max(phases["workload_s"], 1e-9), 2),
        "launch_errors": _count([x[:80] for r in results for x in r["launch_error_texts"]]),
        "restart_reasons": _count([x for r in results for x in r.get("restart_reasons", [])]),
        "restarts_by_last_fault": attributed,
        "restart_decided_host_kill": _pcts(host_dec),
        "recovery_host_kill": _pcts(host_rec),
        "executor_kill_lost_reported": _pcts(exec_lost),
        "executor_kill_redone": _pcts(exec_redo),
        "recovery_node_remove": _pcts(node_rec),
        "node_removal_all_recovered": _pcts(per_node),
        "hit_runs_never_recovered": unrecovered,
        "supervisor_back_s": [f.get("back_s") for f in chaos.faults if f["kind"] == "supervisor_kill"],
        "redis_down_s": [f.get("down_s") for f in chaos.faults if f["kind"] == "redis_restart"],
        # of the last supervisor incarnation only: its counters start again at each restart
        "supervisor_stats": {k: v for k, v in sup.items() if k not in ("nodes", "log", "pool")},
        "redis_counters": counters,
    }
    ok = (report["steps_lost"] == 0 and report["side_effects_duplicated"] == 0
          and report["zombie_commits_accepted"] == 0 and report["runs_failed"] == 0)
    report["invariants_ok"] = ok
    report["schedule"] = [asdict(f) for f in schedule]
    report["faults"] = chaos.faults
    report["bad_runs"] = bad[:50]
    slow = sorted((r for r in chaos.runs.values() if r.ended is not None),
                  key=lambda r: r.submitted - (r.ended or 0.0))
    report["slowest_runs"] = [_slow_run(chaos.ud, r, histories, chaos.faults) for r in slow[:3]]
    if bad:
        report["supervisor_log"] = _sup_evidence(env, bad)
        stuck = [b["run_id"] for b in bad if b["status"] not in TERMINAL
                 and not b["status"].startswith("unreadable")]
        if stuck:
            report["stuck_runs"] = forensics(env, stuck[:10])
    return report, ok


def print_chaos(report: dict[str, Any]) -> None:
    def mark(v: int) -> str:
        return "ok" if v == 0 else "VIOLATED"

    r = report
    print()
    print(f"chaos report: seed {r['seed']}, {r['runs_in_flight']} runs in flight, "
          f"{r['duration_s']:g} s (+{r['drain_s']:g} s drain), {r['nodes']} nodes, "
          f"slow_agent({r['latency_s']:g}), {r['pool'].get('hosts_per_node')} hosts per node, "
          f"pause after commit {r['pool'].get('pause_after_commit_s')} s")
    rows = [
        ["runs started", f"{r['runs_started']} ({r['runs_per_s']:.2f}/s)", ""],
        ["runs held by a host (mean / max)", f"{r['held_runs_mean']} / {r['held_runs_max']}", ""],
        ["submit -> stored and queued", _fmt(r["launch_s"]), ""],
        ["submit -> run ended", _fmt(r["run_s"]), ""],
        ["runs finished", str(r["runs_finished"]), ""],
        ["runs failed (bad)", str(r["runs_failed"]), mark(r["runs_failed"])],
        ["host kills (SIGKILL) / that hit a run",
         f"{r['host_kills']} / {r['host_kills_that_hit_a_run']}", ""],
        ["executor kills (SIGKILL) / calls in flight",
         f"{r['executor_kills']} / {r['executor_kill_calls_in_flight']}", ""],
        ["node removals (hard)", f"{r['node_removals']} ({r['runs_hit_by_node_removals']} runs hit)", ""],
        ["supervisor kills (SIGKILL)", str(r["supervisor_kills"]), ""],
        ["Redis restarts (SIGKILL)", str(r["redis_restarts"]), ""],
        ["faults skipped (no target)", str(r["faults_skipped"]), ""],
        ["steps lost", str(r["steps_lost"]), mark(r["steps_lost"])],
        ["side effects duplicated", str(r["side_effects_duplicated"]), mark(r["side_effects_duplicated"])],
        ["idempotent reruns after executor death", str(r["idempotent_reruns_after_executor_death"]),
         "allowed"],
        ["zombie commits accepted", str(r["zombie_commits_accepted"]), mark(r["zombie_commits_accepted"])],
        ["wrong answers / call mismatches", f"{r['wrong_answers']} / {r['call_mismatches']}", ""],
        ["restarts recorded / lost calls reported",
         f"{r['restarts_recorded']} / {r['lost_calls_reported']}", ""],
        ["launch retries", str(r["launch_retries"]), ""],
        ["host kill -> restart decided", _fmt(r["restart_decided_host_kill"]), ""],
        ["host kill -> next committed step", _fmt(r["recovery_host_kill"]), ""],
        ["executor kill -> lost call committed", _fmt(r["executor_kill_lost_reported"]), ""],
        ["executor kill -> its redo committed", _fmt(r["executor_kill_redone"]), ""],
        ["node removal -> run commits again", _fmt(r["recovery_node_remove"]), ""],
        ["node removal -> all its runs did", _fmt(r["node_removal_all_recovered"]), ""],
        ["hit runs never recovered", str(r["hit_runs_never_recovered"]), ""],
    ]
    print(U.table(rows, ["measure", "value", "invariant"]))
    back = [x for x in r["supervisor_back_s"] if x is not None]
    if back:
        print(f"   supervisor answering again (new pid) after SIGKILL: "
              f"{', '.join(f'{x:.2f}' for x in back)} s")
    if r["redis_down_s"]:
        print(f"   Redis down: {', '.join(f'{x:.2f}' for x in r['redis_down_s'] if x is not None)} s")
    print(f"   restart reasons: {r['restart_reasons']}")
    print(f"   restarts by the last fault before them (10 s): {r['restarts_by_last_fault']}")
    if r["launch_errors"]:
        print(f"   launch errors (retried): {r['launch_errors']}")
    print(f"   supervisor (last incarnation): {r['supervisor_stats']}")
    for x in r.get("slowest_runs", []):
        print(f"   slowest: {x['run_id']} {x['run_s']} s, faults meanwhile {x['faults_meanwhile']}")
    for bad in r["bad_runs"][:10]:
        print(f"   bad run: {json.dumps(bad, default=str)}")
    for line in r.get("supervisor_log", []):
        print(f"   supervisor log: {line}")
    if r.get("stuck_runs"):
        print(f"   runs that never ended, forensics: {json.dumps(r['stuck_runs'], default=str)}")
    print(f"invariants: {'all held' if r['invariants_ok'] else 'VIOLATED'}")


# -- recovery mode ------------------------------------------------------------------------------


def _wait_held_before_model(ud: Undying, rid: str, min_step: int, timeout: float = 60) -> dict[str, Any]:
    """A host holds the run right after committing a step >= min_step that asks for a model
    call (paused before dispatching it): killing it there makes the redo a model call."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = ud.actor_info(rid)
        if info is not None and info["pid"]:
            state = ud.state(rid)
            if state.status in TERMINAL:
                break
            if state.step >= min_step and any(p.kind == "model" for p in state.pending.values()):
                return {**info, "step": state.step,
                        "model": next(e for e, p in state.pending.items() if p.kind == "model")}
        elif ud.info(rid).status in TERMINAL:
            break
        time.sleep(0.003)
    raise RuntimeError(f"run {rid} was never caught held before a model call at step >= {min_step}")


def _wait_model_claimed(ud: Undying, rid: str, min_step: int, timeout: float = 60) -> tuple[int, str]:
    """The run waits only on a model call at step >= min_step, and an executor claimed it:
    (step, the claiming executor's name)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = ud.state(rid)
        if state.status in TERMINAL:
            break
        if state.step >= min_step and state.pending and all(
                p.kind == "model" for p in state.pending.values()):
            recs = ud.store.fx_records(rid)  # type: ignore[attr-defined]
            got = [recs.get(eid, "") for eid in state.pending]
            if all("|c|" in r for r in got):
                return state.step, got[0].split("|")[2].split("#")[0]
        time.sleep(0.01)
    raise RuntimeError(f"run {rid} never reached step {min_step} in a claimed model call")


def _next_commit(ud: Undying, rid: str, after: float, pred: Any, timeout: float = 90) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for e in ud.history(rid):
            if e.at_ms / 1000 >= after - 0.001 and pred(e):
                return e
        time.sleep(0.02)
    return None


def recovery_main(args: argparse.Namespace, env: Env) -> tuple[dict[str, Any], bool]:
    import ray

    ud: Undying = env.ud  # type: ignore[assignment]
    rng = random.Random(args.seed)
    refs = references()
    started: list[tuple[str, int]] = []
    killed_claims: dict[tuple[str, str], set[int]] = {}

    def start(latency: float) -> str:
        q = rng.randrange(len(QUESTIONS))
        rid = f"rec-{uuid.uuid4().hex[:12]}"
        errors = launch(ud, slow_agent(latency), QUESTIONS[q], rid, args.launch_timeout)
        started.append((rid, q))
        if errors:
            print(f"  start {rid}: retried {errors}")
        return rid

    def note(claims: set[tuple[str, str, int]]) -> None:
        for r, e, a in claims:
            killed_claims.setdefault((r, e), set()).add(a)

    kills = []
    print(f"host SIGKILL, {args.kills} kills, slow_agent({args.kill_latency:g}), one run at a time, "
          f"the host caught between committing a model request and dispatching it", flush=True)
    for k in range(args.kills):
        rid = start(args.kill_latency)
        try:
            info = _wait_held_before_model(ud, rid, rng.choice((2, 3, 5)))
        except RuntimeError as exc:
            print(f"  kill {k}: {exc}")
            continue
        pid, epoch = int(info["pid"]), int(info["epoch"])
        if not _is_ray_process(pid, "RunHost"):
            print(f"  kill {k}: pid {pid} is not a host")
            continue
        env.pids.add(pid)
        t = time.time()
        os.kill(pid, signal.SIGKILL)
        dispatched = "|c|" in ud.store.fx_records(rid).get(info["model"], "")  # type: ignore[attr-defined]
        active = None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # a new activation holds the lease
            if _owner(ud, rid)[0] > epoch:
                active = time.time() - t
                break
            time.sleep(0.005)
        e = _next_commit(ud, rid, t, lambda x, ep=epoch: x.kind != "restart" and x.epoch > ep)
        r = _next_commit(ud, rid, t, lambda x, ep=epoch: x.kind == "restart" and x.epoch > ep,
                         timeout=5)
        row = {"run": rid, "step": info["step"], "dispatched_before_kill": dispatched,
               "restart_event_s": round(r.at_ms / 1000 - t, 3) if r else None,
               "active_s": round(active, 3) if active is not None else None,
               "next_commit_s": round(e.at_ms / 1000 - t, 3) if e is not None else None}
        kills.append(row)
        print(f"  kill {k:2d}: {row}", flush=True)

    ekills = []
    print(f"executor SIGKILL, {args.executor_kills} kills, slow_agent({args.kill_latency:g}), "
          f"one run at a time, in a claimed model call", flush=True)
    for k in range(args.executor_kills):
        rid = start(args.kill_latency)
        try:
            step, name = _wait_model_claimed(ud, rid, rng.choice((2, 3, 5)))
        except RuntimeError as exc:
            print(f"  executor kill {k}: {exc}")
            continue
        node = name.rsplit(":", 1)[-1]
        try:
            pid = env.executor_pid(node)
        except Exception as exc:
            print(f"  executor kill {k}: {_short(exc)}")
            continue
        if not _is_ray_process(pid, "ExecutorActor"):
            print(f"  executor kill {k}: pid {pid} is not an executor")
            continue
        before = _claims(ud, node)
        t = time.time()
        os.kill(pid, signal.SIGKILL)
        note(before | _claims(ud, node))
        lost = _next_commit(ud, rid, t, lambda x: x.kind == "effect_lost")
        redo = (_next_commit(ud, rid, lost.at_ms / 1000 + 0.0005,
                             lambda x: x.kind in ("model_reply", "model_failed"))
                if lost is not None else None)
        row = {"run": rid, "step": step, "node": node[:8],
               "lost_committed_s": round(lost.at_ms / 1000 - t, 3) if lost else None,
               "redo_committed_s": round(redo.at_ms / 1000 - t, 3) if redo else None}
        ekills.append(row)
        print(f"  executor kill {k:2d}: {row}", flush=True)

    trials = []
    print(f"node removal, {args.node_trials} trials, {args.node_runs} runs, "
          f"slow_agent({args.node_latency:g}), default health checks", flush=True)
    for k in range(args.node_trials):
        with ThreadPoolExecutor(max_workers=args.start_concurrency) as ex:  # all in flight at once
            batch = list(ex.map(lambda _: start(args.node_latency), range(args.node_runs)))
        workers = env.workers()
        if not workers:
            print("  no worker node")
            break
        deadline = time.monotonic() + 30
        while True:  # wait until the runs' calls are spread over the nodes
            claims = {n.node_id: _claims(ud, n.node_id) for n in workers}
            victim = max(workers, key=lambda n: (len({c[0] for c in claims[n.node_id]}), rng.random()))
            if claims[victim.node_id] or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        node = victim.node_id
        held = {}
        for rid in batch:
            epoch, _h, owner_node, pid = _owner(ud, rid)
            if epoch >= 0 and owner_node == node:
                held[rid] = epoch
                env.pids.add(pid)
        hit_claims = claims[node] | _claims(ud, node)
        hit = sorted(set(held) | {c[0] for c in hit_claims})
        t = time.time()
        env.cluster.remove_node(victim, allow_graceful=False)
        note(hit_claims)
        seen_claims: set[tuple[str, str, int]] = set()
        committed: dict[str, float] = {}
        declared = None
        deadline = time.monotonic() + 60
        n = 0
        while time.monotonic() < deadline:
            if time.time() - t < 6:
                with contextlib.suppress(Exception):
                    seen_claims |= _claims(ud, node)
            for rid in hit:
                if rid in committed:
                    continue
                old = held.get(rid, 0)
                e = next((x for x in ud.history(rid) if x.kind != "restart"
                          and x.at_ms / 1000 >= t and (rid not in held or x.epoch > old)), None)
                if e is not None:
                    committed[rid] = e.at_ms / 1000 - t
            if declared is None and n % 10 == 0:
                if node not in {x["NodeID"] for x in ray.nodes() if x.get("Alive")}:
                    declared = time.time() - t
            n += 1
            if declared is not None and len(committed) == len(hit):
                break
            time.sleep(0.05)
        note(seen_claims)
        per_run = [committed.get(rid, math.inf) for rid in hit]
        late = [e.at_ms / 1000 - t for rid, ep in held.items() for e in ud.history(rid)
                if e.kind != "restart" and e.epoch == ep and e.at_ms / 1000 > t]
        row = {"runs_in_flight": len(batch), "runs_held_on_node": len(held),
               "runs_calling_on_node": len({c[0] for c in hit_claims}), "runs_hit": len(hit),
               "all_recovered_s": round(max(per_run), 3) if per_run else None,
               "p50_run_s": round(U.p50(per_run), 3) if per_run else None,
               "old_epoch_commits_after": len(late),
               "ray_declared_dead_s": round(declared, 2) if declared is not None else None}
        trials.append(row)
        print(f"  trial {k}: {row}", flush=True)
        env.add_node()
        for rid in batch:
            with contextlib.suppress(Exception):
                ud.wait(rid, timeout=90)
        env.wait_pool(30)

    results = []
    histories: dict[str, list[Any]] = {}
    for rid, q in started:
        with contextlib.suppress(Exception):
            ud.wait(rid, timeout=60)
        results.append(verify_run(ud, rid, refs[q], histories, killed_claims))
    bad = [r for r in results if not r["ok"]]
    report = {
        "mode": "recovery", "seed": args.seed, "nodes": args.nodes, "pool": env.pool,
        "kill_latency_s": args.kill_latency, "node_latency_s": args.node_latency,
        "kills": kills, "executor_kills": ekills,
        "kill_next_commit": _pcts([r["next_commit_s"] for r in kills if r["next_commit_s"] is not None]),
        "kill_active": _pcts([r["active_s"] for r in kills if r["active_s"] is not None]),
        "kill_restart_decided": _pcts([r["restart_event_s"] for r in kills
                                       if r["restart_event_s"] is not None]),
        "executor_lost_committed": _pcts([r["lost_committed_s"] for r in ekills
                                          if r["lost_committed_s"] is not None]),
        "executor_redo_committed": _pcts([r["redo_committed_s"] for r in ekills
                                          if r["redo_committed_s"] is not None]),
        "node_trials": trials,
        "node_all_recovered": _pcts([r["all_recovered_s"] for r in trials
                                     if r["all_recovered_s"] is not None]),
        "runs_checked": len(results), "runs_bad": len(bad), "bad_runs": bad[:20],
        "steps_lost": sum(r["lost"] for r in results),
        "side_effects_duplicated": sum(r["duplicated"] for r in results),
        "idempotent_reruns_after_executor_death": sum(r["reruns"] for r in results),
        "zombie_commits_accepted": sum(r["zombie"] for r in results),
    }
    ok = not bad
    report["invariants_ok"] = ok
    if bad:
        report["supervisor_log"] = _sup_evidence(env, bad)
    return report, ok


def print_recovery(r: dict[str, Any]) -> None:
    print()
    print(f"recovery report: seed {r['seed']}, {r['nodes']} nodes, pool {r['pool']}")
    rows = [
        [f"host SIGKILL -> next committed step (slow_agent({r['kill_latency_s']:g}), redo included)",
         _fmt(r["kill_next_commit"])],
        ["host SIGKILL -> restart decided (restart event)", _fmt(r["kill_restart_decided"])],
        ["host SIGKILL -> a new activation holds the lease", _fmt(r["kill_active"])],
        ["executor SIGKILL -> lost call committed (effect_lost)", _fmt(r["executor_lost_committed"])],
        [f"executor SIGKILL -> redone model call committed (slow_agent({r['kill_latency_s']:g}))",
         _fmt(r["executor_redo_committed"])],
        [f"hard node removal -> every run it held or called on committed again "
         f"(slow_agent({r['node_latency_s']:g}))", _fmt(r["node_all_recovered"])],
        ["runs checked / bad", f"{r['runs_checked']} / {r['runs_bad']}"],
        ["steps lost / side effects duplicated / zombie commits",
         f"{r['steps_lost']} / {r['side_effects_duplicated']} / {r['zombie_commits_accepted']}"],
        ["idempotent reruns after executor death (allowed)",
         str(r["idempotent_reruns_after_executor_death"])],
    ]
    print(U.table(rows, ["measure", "value"]))
    for t in r["node_trials"]:
        print(f"   node trial: {t}")
    for bad in r["bad_runs"][:10]:
        print(f"   bad run: {json.dumps(bad, default=str)}")
    for line in r.get("supervisor_log", []):
        print(f"   supervisor log: {line}")
    print(f"invariants: {'all held' if r['invariants_ok'] else 'VIOLATED'}")


# -- main -------------------------------------------------------------------------------------


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=("chaos", "recovery"), default="chaos")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--runs", type=int, default=10, help="runs kept in flight")
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of workload and faults")
    ap.add_argument("--nodes", type=int, default=3, help="Ray nodes, head included")
    ap.add_argument("--hosts-per-node", type=int, default=4, help="warm hosts per node")
    ap.add_argument("--pause-after-commit", type=float, default=0.1,
                    help="pool option pause_after_commit_s: a host holds a run this long "
                         "after each commit, so a host kill can catch it there")
    ap.add_argument("--latency", type=float, default=0.5, help="simulated model latency (s)")
    ap.add_argument("--fault-every", type=float, default=6.0, help="mean seconds between faults")
    ap.add_argument("--drain-timeout", type=float, default=120.0,
                    help="after the duration: how long the last runs may take to finish")
    ap.add_argument("--start-concurrency", type=int, default=3, help="runs being started at once")
    ap.add_argument("--launch-timeout", type=float, default=120.0,
                    help="give up (re)trying to start one run after this long")
    ap.add_argument("--kills", type=int, default=20, help="recovery mode: host SIGKILLs")
    ap.add_argument("--executor-kills", type=int, default=10, help="recovery mode: executor SIGKILLs")
    ap.add_argument("--kill-latency", type=float, default=0.2, help="recovery mode: model latency")
    ap.add_argument("--node-trials", type=int, default=3, help="recovery mode: hard node removals")
    ap.add_argument("--node-runs", type=int, default=8, help="recovery mode: runs per node trial")
    ap.add_argument("--node-latency", type=float, default=1.0, help="recovery mode: model latency")
    ap.add_argument("--json", type=Path, default=None, help="write the report as JSON here")
    ap.add_argument("--schedule-only", action="store_true", help="print the schedule and exit")
    args = ap.parse_args(argv)
    if args.nodes < 1 or args.runs < 1 or args.duration <= 0 or args.hosts_per_node < 1:
        ap.error("--nodes, --runs and --hosts-per-node must be >= 1, --duration > 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    schedule = make_schedule(args.seed, args.duration, args.fault_every)
    if args.schedule_only:
        print(format_schedule(schedule))
        return 0
    root = Path(tempfile.mkdtemp(prefix="undying-chaos-"))
    namespace = f"chaos-{uuid.uuid4().hex[:8]}"
    cmd = "python -m bench.chaos " + " ".join(shlex.quote(a) for a in (argv if argv is not None
                                                                         else sys.argv[1:]))
    print(f"command: {cmd}")
    if args.mode == "chaos":  # first, so that a failure replays whatever happens next
        print(f"schedule (seed {args.seed}, {len(schedule)} faults over {args.duration:g} s):")
        print(format_schedule(schedule), flush=True)
    t0 = time.monotonic()
    pool = {"hosts_per_node": args.hosts_per_node, "pause_after_commit_s": args.pause_after_commit}
    env = Env(root, args.nodes, namespace, pool)
    ok = False
    try:
        env.start()
        print(f"redis-server {env.redis.url if env.redis else ''} (appendfsync always), "  # type: ignore[union-attr]
              f"{args.nodes}-node cluster up in {env.cluster_up_s:.1f} s, supervisor and pool in "
              f"{env.pool_up_s:.1f} s; nproc {os.cpu_count()}, load {os.getloadavg()[0]:.2f}",
              flush=True)
        if args.mode == "chaos":
            report, ok = chaos_main(args, env)
        else:
            report, ok = recovery_main(args, env)
        report["command"] = cmd
        report["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
        report["wall_s"] = round(time.monotonic() - t0, 1)
        (print_chaos if args.mode == "chaos" else print_recovery)(report)
        if args.json:
            args.json.write_text(json.dumps(report, indent=1, default=str))
    finally:
        t = time.monotonic()
        env.stop()
        U.rmtree(root)
        print(f"shut down in {time.monotonic() - t:.1f} s; wall {time.monotonic() - t0:.1f} s", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
