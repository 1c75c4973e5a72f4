"""Chaos for the supervisor: research runs in flight while processes, nodes and Redis die.

    python -m bench.chaos --seed 1 --runs 50 --duration 300          # the long run
    python -m bench.chaos --seed 7 --runs 4 --duration 20            # smoke (tests/integration)
    python -m bench.chaos --mode recovery --kills 20 --node-trials 3  # recovery figures

Starts its own redis-server (AOF, ``appendfsync always``, a temp dir, a free port) and
its own multi-node ``ray.cluster_utils.Cluster`` (head ``num_cpus=1`` + ``nodes-1``
workers, Ray's default health checks), an `Undying` client in a namespace of its own,
and keeps ``--runs`` research runs (``slow_agent(latency)``, four fixed questions over the
bundled corpus) in flight for ``--duration`` seconds, starting a new one as each ends.

Faults come from a schedule generated up front from ``random.Random(seed)`` and printed
first (same seed, same schedule): SIGKILL of a random run actor's process (pid from
``ud.actor_info``), hard removal of a random worker node (``cluster.remove_node(node,
allow_graceful=False)``, a new node added a few seconds later; never the head), SIGKILL
of the supervisor's process (pid from its ``info``), SIGKILL of redis-server and a
restart on the same port after a short pause. Which run or node is hit is chosen by a
number drawn in the schedule, among the candidates of that moment.

Every run is then checked against a reference (``run_inline`` on a `MemoryStore`, same
agent and question, no fault): same final answer; the same tool ledger with every count 1
(a count > 1 is a side effect duplicated); committed steps (history minus ``restart``
events) exactly 1..final (a duplicate step or an epoch going backwards is a zombie commit
accepted, a gap a step lost). Recovery: from each run-actor kill or node removal to that
run's next committed step by a newer epoch (the event's ``at_ms``).

Exit status 1 if any invariant is violated (step lost, side effect duplicated, zombie
commit accepted, a run that did not finish with the reference answer and ledger).
Everything is shut down by pid at the end (``ray.shutdown``, ``cluster.shutdown``,
redis-server SIGTERM, leftover workers of our cluster by pid); never ``ray stop``.

``--mode recovery`` measures instead: the recovery of one run after one SIGKILL, over
``--kills`` kills, one at a time; and, over ``--node-trials`` hard node removals with
``--node-runs`` runs in flight, the time until every run of the removed node committed
its next step on another node, with Ray's default health checks.
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
from undying.actors.research import slow_agent
from undying.persistence import TERMINAL, RedisServer, RunExists, RunNotFound
from undying.testing import MemoryStore, run_inline

from . import _util as U

QUESTIONS = (
    "How do fencing tokens stop zombie writers, and what does appendfsync always guarantee?",
    "What is an OTP supervision tree and how does exponential backoff with jitter help?",
    "How does a transactional outbox relate to idempotency keys?",
    "What do Ray actors and tasks offer LLM agents?",
)
KINDS = ("actor_kill", "node_remove", "supervisor_kill", "redis_restart")
WEIGHTS = (0.45, 0.15, 0.15, 0.25)
POLICY = {"max_restarts": 10, "window_s": 60, "backoff_base_s": 0.2}
NODE_ARGS = {"num_cpus": 1, "object_store_memory": 80 << 20}
RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # loopback only
           "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}  # no stats, no token files


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
    """A fault that hit a run: it must commit again, by a newer epoch."""

    run_id: str
    kind: str  # actor_kill | node_remove
    fault: int  # index into the executed faults
    t: float  # wall time of the fault
    epoch: int  # the incarnation that was hit


@dataclass
class Reference:
    answer: str
    ledger: dict[str, int]
    steps: int


def references() -> list[Reference]:
    out = []
    for q in QUESTIONS:
        store = MemoryStore()
        state = run_inline(store, slow_agent(0.0), q, run_id="ref")
        assert state.status == "finished", state.error
        out.append(Reference(state.result or "", _strip(store.ledger("ref"), "ref"), state.step))
    return out


def _strip(ledger: dict[str, int], run_id: str) -> dict[str, int]:
    return {k.replace(f"{run_id}:", ""): v for k, v in ledger.items()}


def _reason_exc(text: str) -> str:
    return text[:80]


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
        if pid not in self.seen:
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

    A start can fail after the run was stored: the supervisor was killed during `launch`,
    the actor was placed on a node that just died, Redis lost the reply of our create. The
    run then exists and `resume` activates it (or finds it already adopted by a new
    supervisor). Without this a stored run with no actor and no lease would wait forever.
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
            # our create went through, its reply was lost (Redis killed) and the client's
            # retry found the run there
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


# -- the environment: Redis, a multi-node cluster, the client ---------------------------------


class Env:
    def __init__(self, root: Path, nodes: int, namespace: str) -> None:
        self.root = root
        self.nodes = nodes
        self.namespace = namespace
        self.redis: RedisServer | None = None
        self.cluster: Any = None
        self.ud: Undying | None = None
        self.pids = _Pids()  # run-actor and supervisor processes we saw, for cleanup
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
                                   ray_address=self.cluster.address), policy=POLICY)
        t = time.monotonic()
        self.ud.supervisor()
        self.supervisor_up_s = time.monotonic() - t
        return self

    def add_node(self) -> Any:
        return self.cluster.add_node(**NODE_ARGS, temp_dir=str(self.temp))

    def workers(self) -> list[Any]:
        return sorted(self.cluster.worker_nodes, key=lambda n: n.node_id)

    def supervisor_pid(self, timeout: float = 30) -> int:
        import ray

        pid = int(ray.get(self.ud.supervisor().info.remote(), timeout=timeout)["pid"])  # type: ignore[union-attr]
        self.pids.add(pid)
        return pid

    def stop(self) -> None:
        import ray

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
        # run actors rename their process (ray::RunActor): kill stragglers by the pids we saw
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
        self.statuses: dict[str, str] = {}
        self.faults: list[dict[str, Any]] = []
        self.probes: list[Probe] = []
        self.pending_adds: list[tuple[float, int]] = []  # (monotonic due, fault index)
        self.pool = ThreadPoolExecutor(max_workers=args.start_concurrency, thread_name_prefix="start")
        self.rng = random.Random(args.seed + 1)  # only question choice: never the schedule
        self.lock = threading.Lock()
        self.threads: list[threading.Thread] = []
        self.live_samples: list[int] = []  # runs with a live actor (launched, not ended), per poll

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
        detail = {k: v for k, v in rec.items() if k not in ("i", "at", "kind")}
        print(f"  [{t_rel:7.2f}s] fault {i:2d} {f.kind:15s} {detail}", flush=True)

    def _actor_kill(self, f: Fault, rec: dict[str, Any], idx: int) -> None:
        running = sorted(rid for rid, r in self.inflight.items()
                         if r.status in ("running", "waiting") and r.launched is not None)
        if not running:
            seen = _count([f"{r.status}/{'launched' if r.launched else 'launching'}"
                           for r in self.inflight.values()])
            rec["skipped"] = f"no run running: {seen}"
            return
        start = int(f.pick * len(running))
        for k in range(min(5, len(running))):
            rid = running[(start + k) % len(running)]
            info = self.ud.actor_info(rid)
            if info is None or info.get("status") in TERMINAL:
                continue
            pid = int(info["pid"])
            if not _is_ray_process(pid, "RunActor"):
                continue
            self.env.pids.add(pid)
            t = time.time()
            os.kill(pid, signal.SIGKILL)
            self.probes.append(Probe(rid, "actor_kill", idx, t, int(info["epoch"])))
            rec.update(run=rid, pid=pid, epoch=info["epoch"], step=info.get("step"), t=t)
            return
        rec["skipped"] = "no live actor found"

    def _infos(self) -> dict[str, dict[str, Any]]:
        rids = [rid for rid, r in self.inflight.items() if r.launched is not None]
        with ThreadPoolExecutor(max_workers=8) as ex:
            got = list(ex.map(lambda rid: self.ud.actor_info(rid, timeout=3), rids))
        return {rid: i for rid, i in zip(rids, got, strict=True) if i is not None}

    def _node_remove(self, f: Fault, rec: dict[str, Any], idx: int) -> None:
        workers = self.env.workers()
        if not workers:
            rec["skipped"] = "no worker node left"
            return
        victim = workers[int(f.pick * len(workers))]
        infos = self._infos()
        hit = {rid: i for rid, i in infos.items()
               if i["node_id"] == victim.node_id and i.get("status") not in TERMINAL}
        for i in infos.values():
            self.env.pids.add(int(i["pid"]))
        t = time.time()
        self.env.cluster.remove_node(victim, allow_graceful=False)
        rec.update(node=victim.node_id[:12], runs_on_node=len(hit), runs_seen=len(infos), t=t,
                   remove_s=round(time.time() - t, 2), add_in_s=f.pause)
        for rid, i in hit.items():
            self.probes.append(Probe(rid, "node_remove", idx, t, int(i["epoch"])))
        self.pending_adds.append((time.monotonic() + f.pause, idx))

    def _add_due_nodes(self, force: bool = False) -> None:
        now = time.monotonic()
        for item in list(self.pending_adds):
            if force or item[0] <= now:
                self.pending_adds.remove(item)
                t = time.monotonic()
                try:
                    node = self.env.add_node()
                    self.faults[item[1]]["added"] = node.node_id[:12]
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
                self.live_samples.append(sum(1 for r in self.inflight.values() if r.launched))
            if now - last_print >= 30:
                last_print = now
                done = sum(1 for r in self.runs.values() if r.ended)
                live = sum(1 for r in self.inflight.values() if r.launched)
                print(f"  [{now - t0:7.2f}s] {done} runs ended, {len(self.inflight)} in flight "
                      f"({live} with a live actor), load {os.getloadavg()[0]:.1f}", flush=True)
            time.sleep(0.05)
        workload_s = time.monotonic() - t0
        # the duration is over: no new runs; let the last ones finish, within a bound
        self._add_due_nodes(force=True)
        drain_t0 = time.monotonic()
        while self.inflight and time.monotonic() - drain_t0 < a.drain_timeout:
            self.poll()
            time.sleep(0.25)
        drain_s = time.monotonic() - drain_t0
        self.pool.shutdown(wait=False, cancel_futures=True)
        for th in self.threads:
            th.join(timeout=5)
        return {"workload_s": round(workload_s, 1), "drain_s": round(drain_s, 1),
                "unfinished_at_drain_end": len(self.inflight)}

    # -- checking -------------------------------------------------------------------

    def verify(self) -> tuple[list[dict[str, Any]], dict[str, list[Any]]]:
        results = []
        histories: dict[str, list[Any]] = {}
        for rid, run in self.runs.items():
            results.append(verify_run(self.ud, rid, self.refs[run.q], histories))
            results[-1]["launch_errors"] = len(run.launch_errors)
            results[-1]["launch_error_texts"] = run.launch_errors[:3]
        return results, histories


def verify_run(ud: Undying, rid: str, ref: Reference, histories: dict[str, list[Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"run_id": rid, "status": "never created", "ok": False, "lost": 0,
                           "duplicated": 0, "zombie": 0, "answer_ok": False, "ledger_ok": False}
    try:
        state = ud.state(rid)
        history = ud.history(rid)
    except RunNotFound:
        return out
    histories[rid] = history
    commits = [e for e in history if e.kind != "restart"]
    steps = [e.step for e in commits]
    final = state.step
    zombie_idx = set()
    seen: set[int] = set()
    top_epoch = -1
    for i, e in enumerate(commits):
        if e.step in seen or e.epoch < top_epoch or e.step > final:
            zombie_idx.add(i)  # a second writer for a step, or an older epoch after a newer one
        seen.add(e.step)
        top_epoch = max(top_epoch, e.epoch)
    lost = len(set(range(1, final + 1)) - set(steps))
    ledger = _strip(ud.ledger(rid), rid)
    dup = sum(c - 1 for c in ledger.values() if c > 1)
    finished = state.status == "finished"
    answer_ok = finished and state.result == ref.answer
    ledger_ok = finished and set(ledger) == set(ref.ledger)
    out.update(status=state.status, steps=final, ref_steps=ref.steps, lost=lost, duplicated=dup,
               zombie=len(zombie_idx), answer_ok=answer_ok, ledger_ok=ledger_ok,
               restarts=sum(1 for e in history if e.kind == "restart"),
               restart_reasons=[_reason(e.summary) for e in history if e.kind == "restart"],
               epochs=len({e.epoch for e in commits}), error=state.error)
    out["ok"] = answer_ok and ledger_ok and lost == 0 and dup == 0 and not zombie_idx
    if dup:
        out["ledger_dups"] = {k: v for k, v in ledger.items() if v > 1}
    if lost or zombie_idx or dup:
        out["events"] = [(e.step, e.epoch, e.kind, e.at_ms, e.summary[:60]) for e in history]
    return out


def _reason(summary: str) -> str:
    """'restart 1: ActorDiedError: The actor died ...' -> 'ActorDiedError' (or 'lease expired')."""
    text = summary.split(": ", 1)[1] if ": " in summary else summary
    parts = text.split(": ")
    if parts[0] == "restart failed" and len(parts) > 1:  # say what failed
        return f"restart failed: {parts[1].split(':')[0][:40]}"
    return parts[0][:60]


def _count(items: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for x in items:
        out[x] = out.get(x, 0) + 1
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def decided_s(probe: Probe, history: list[Any] | None) -> float | None:
    """From the fault to the restart event of a newer epoch (the supervisor's decision)."""
    for e in history or []:
        if e.kind == "restart" and e.epoch > probe.epoch:
            return e.at_ms / 1000 - probe.t
    return None


def recovery_s(probe: Probe, history: list[Any] | None) -> float | None:
    """From the fault to the run's next committed step by a newer epoch (None: never needed)."""
    for e in history or []:
        if e.kind != "restart" and e.epoch > probe.epoch:
            return e.at_ms / 1000 - probe.t
    return None


def _pcts(xs: list[float]) -> dict[str, Any]:
    if not xs:
        return {"n": 0, "p50": None, "p99": None, "max": None}
    return {"n": len(xs), "p50": round(U.p50(xs), 3), "p99": round(U.pct(xs, 99), 3),
            "max": round(max(xs), 3)}


def _fmt(d: dict[str, Any]) -> str:
    if not d["n"]:
        return "n=0"
    return f"p50 {d['p50']:.2f} s, p99 {d['p99']:.2f} s, max {d['max']:.2f} s (n={d['n']})"


def chaos_main(args: argparse.Namespace, env: Env) -> tuple[dict[str, Any], bool]:
    import ray

    schedule = make_schedule(args.seed, args.duration, args.fault_every)
    print(f"schedule (seed {args.seed}, {len(schedule)} faults over {args.duration:g} s):")
    print(format_schedule(schedule), flush=True)
    refs = references()
    chaos = Chaos(env, args, schedule, refs)
    print(f"workload: {args.runs} runs in flight, slow_agent({args.latency:g}), "
          f"{len(QUESTIONS)} questions", flush=True)
    phases = chaos.run()
    results, histories = chaos.verify()
    by_id = {r["run_id"]: r for r in results}

    kill_rec, node_rec, per_node = [], [], []
    kill_dec, node_dec = [], []  # fault -> the supervisor's restart decision (restart event)
    unrecovered = 0
    for p in chaos.probes:
        d = decided_s(p, histories.get(p.run_id))
        if d is not None:
            (kill_dec if p.kind == "actor_kill" else node_dec).append(d)
        r = recovery_s(p, histories.get(p.run_id))
        if r is None:
            if by_id.get(p.run_id, {}).get("status") != "finished":
                unrecovered += 1
            continue
        (kill_rec if p.kind == "actor_kill" else node_rec).append(r)
    removals = [rec["t"] for rec in chaos.faults if rec["kind"] == "node_remove" and "t" in rec]
    for p in chaos.probes:
        rec = chaos.faults[p.fault]
        if p.kind == "actor_kill":
            r = recovery_s(p, histories.get(p.run_id))
            rec["recovered_s"] = round(r, 2) if r is not None else None
            # Ray declares a hard-removed node dead only after ~15 s: until then it looks alive
            before = [p.t - t for t in removals if 0 <= p.t - t < 20]
            if before:
                rec["node_removed_s_before"] = round(min(before), 1)
    for idx, rec in enumerate(chaos.faults):
        if rec["kind"] != "node_remove" or "t" not in rec:
            continue
        hit = [p for p in chaos.probes if p.fault == idx]
        rs = [recovery_s(p, histories.get(p.run_id)) for p in hit]
        rs = [x for x in rs if x is not None]
        rec["all_recovered_s"] = round(max(rs), 2) if rs else None
        # the old incarnation outlives its node for a while: its commits after the removal
        late = [e.at_ms / 1000 - p.t for p in hit for e in histories.get(p.run_id, [])
                if e.kind != "restart" and e.epoch == p.epoch and e.at_ms / 1000 > p.t]
        rec["old_epoch_commits_after"] = len(late)
        rec["old_epoch_last_commit_s"] = round(max(late), 2) if late else None
        if rs:
            per_node.append(max(rs))
    sup: dict[str, Any] = {}
    with contextlib.suppress(Exception):
        sup = ray.get(env.ud.supervisor().info.remote(), timeout=10)  # type: ignore[union-attr]
    counters: dict[str, int] = {}
    with contextlib.suppress(Exception):
        counters = env.ud.store.counters()  # type: ignore[union-attr, attr-defined]

    kinds = [f["kind"] for f in chaos.faults if "t" in f]
    report: dict[str, Any] = {
        "seed": args.seed, "runs_in_flight": args.runs, "duration_s": args.duration,
        "latency_s": args.latency, "nodes": args.nodes, **phases,
        "runs_started": len(results),
        "runs_finished": sum(1 for r in results if r["status"] == "finished"),
        "runs_failed": sum(1 for r in results if not r["ok"]),
        "actor_kills": kinds.count("actor_kill"),
        "node_removals": kinds.count("node_remove"),
        "supervisor_kills": kinds.count("supervisor_kill"),
        "redis_restarts": kinds.count("redis_restart"),
        "faults_skipped": sum(1 for f in chaos.faults if "t" not in f),
        "runs_hit_by_node_removals": sum(1 for p in chaos.probes if p.kind == "node_remove"),
        "steps_lost": sum(r["lost"] for r in results),
        "side_effects_duplicated": sum(r["duplicated"] for r in results),
        # of those, in runs that never restarted: nothing ran a tool twice, the ledger's own
        # HINCRBY was applied twice (its reply lost when Redis was killed, then retried)
        "duplicated_in_unrestarted_runs": sum(r["duplicated"] for r in results if r.get("epochs") == 1),
        "zombie_commits_accepted": sum(r["zombie"] for r in results),
        "wrong_answers": sum(1 for r in results if r["status"] == "finished" and not r["answer_ok"]),
        "ledger_mismatches": sum(1 for r in results if r["status"] == "finished" and not r["ledger_ok"]),
        "step_count_differs_from_reference": sum(
            1 for r in results if r["status"] == "finished" and r.get("steps") != r.get("ref_steps")),
        "restarts_recorded": sum(r.get("restarts", 0) for r in results),
        "launch_retries": sum(r["launch_errors"] for r in results),
        "live_runs_mean": round(sum(chaos.live_samples) / max(1, len(chaos.live_samples)), 1),
        "live_runs_max": max(chaos.live_samples, default=0),
        "launch_s": _pcts([r.launched - r.submitted for r in chaos.runs.values() if r.launched]),
        "run_s": _pcts([r.ended - r.submitted for r in chaos.runs.values() if r.ended]),
        "runs_per_s": round(len(results) / max(phases["workload_s"], 1e-9), 2),
        "launch_errors": _count([_reason_exc(x) for r in results for x in r["launch_error_texts"]]),
        "restart_reasons": _count([x for r in results for x in r.get("restart_reasons", [])]),
        "recovery_actor_kill": _pcts(kill_rec),
        "restart_decided_actor_kill": _pcts(kill_dec),
        "restart_decided_node_remove": _pcts(node_dec),
        "recovery_node_remove": _pcts(node_rec),
        "recovery_all": _pcts(kill_rec + node_rec),
        "node_removal_all_recovered": _pcts(per_node),
        "hit_runs_never_recovered": unrecovered,
        "supervisor_back_s": [f.get("back_s") for f in chaos.faults if f["kind"] == "supervisor_kill"],
        "redis_down_s": [f.get("down_s") for f in chaos.faults if f["kind"] == "redis_restart"],
        # of the last supervisor incarnation only: its counters start again at each restart
        "supervisor_stats": {k: v for k, v in sup.items() if k not in ("nodes", "log")},
        "redis_counters": counters,
    }
    ok = (report["steps_lost"] == 0 and report["side_effects_duplicated"] == 0
          and report["zombie_commits_accepted"] == 0 and report["runs_failed"] == 0)
    report["invariants_ok"] = ok
    report["schedule"] = [asdict(f) for f in schedule]
    report["faults"] = chaos.faults
    report["bad_runs"] = [r for r in results if not r["ok"]][:50]
    return report, ok


def print_chaos(report: dict[str, Any]) -> None:
    def mark(v: int) -> str:
        return "ok" if v == 0 else "VIOLATED"

    r = report
    print()
    print(f"chaos report: seed {r['seed']}, {r['runs_in_flight']} runs in flight, "
          f"{r['duration_s']:g} s (+{r['drain_s']:g} s drain), {r['nodes']} nodes, "
          f"slow_agent({r['latency_s']:g})")
    rows = [
        ["runs started", f"{r['runs_started']} ({r['runs_per_s']:.2f}/s)", ""],
        ["runs with a live actor (mean / max)", f"{r['live_runs_mean']} / {r['live_runs_max']}", ""],
        ["submit -> actor started", _fmt(r["launch_s"]), ""],
        ["submit -> run ended", _fmt(r["run_s"]), ""],
        ["runs finished", str(r["runs_finished"]), ""],
        ["runs failed", str(r["runs_failed"]), mark(r["runs_failed"])],
        ["run-actor kills (SIGKILL)", str(r["actor_kills"]), ""],
        ["node removals (hard)", f"{r['node_removals']} ({r['runs_hit_by_node_removals']} runs hit)", ""],
        ["supervisor kills (SIGKILL)", str(r["supervisor_kills"]), ""],
        ["Redis restarts (SIGKILL)", str(r["redis_restarts"]), ""],
        ["faults skipped (no target)", str(r["faults_skipped"]), ""],
        ["steps lost", str(r["steps_lost"]), mark(r["steps_lost"])],
        ["side effects duplicated", str(r["side_effects_duplicated"]), mark(r["side_effects_duplicated"])],
        ["  of which in runs never restarted", str(r["duplicated_in_unrestarted_runs"]), ""],
        ["zombie commits accepted", str(r["zombie_commits_accepted"]), mark(r["zombie_commits_accepted"])],
        ["wrong answers / ledger mismatches", f"{r['wrong_answers']} / {r['ledger_mismatches']}", ""],
        ["restarts recorded", str(r["restarts_recorded"]), ""],
        ["launch retries", str(r["launch_retries"]), ""],
        ["restart decided, run-actor kill", _fmt(r["restart_decided_actor_kill"]), ""],
        ["restart decided, node removal", _fmt(r["restart_decided_node_remove"]), ""],
        ["recovery, run-actor kill", _fmt(r["recovery_actor_kill"]), ""],
        ["recovery, node removal (per run)", _fmt(r["recovery_node_remove"]), ""],
        ["recovery, all", _fmt(r["recovery_all"]), ""],
        ["node removal: all its runs recovered", _fmt(r["node_removal_all_recovered"]), ""],
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
    if r["launch_errors"]:
        print(f"   launch errors (retried): {r['launch_errors']}")
    slow = [f for f in r["faults"] if f["kind"] == "actor_kill" and (f.get("recovered_s") or 0) > 3]
    for f in slow:
        why = (f"a node was removed {f['node_removed_s_before']} s before"
               if "node_removed_s_before" in f else "")
        print(f"   slow kill recovery: fault {f['i']} at {f['at']} s: {f['recovered_s']} s {why}")
    print(f"   supervisor (last incarnation): {r['supervisor_stats']}")
    for bad in r["bad_runs"][:10]:
        print(f"   bad run: {bad}")
    print(f"invariants: {'all held' if r['invariants_ok'] else 'VIOLATED'}")


# -- recovery mode ------------------------------------------------------------------------------


def _wait_model_pending(ud: Undying, rid: str, min_step: int, timeout: float = 60) -> int:
    """A committed step >= min_step with a model call in flight (so the kill interrupts it)."""
    deadline = time.monotonic() + timeout
    after = "0-0"
    while time.monotonic() < deadline:
        for entry in ud.store.read_events(rid, after, 100, block_ms=100):  # type: ignore[attr-defined]
            after = entry.entry_id
            state = ud.state(rid)
            if state.status in TERMINAL:
                raise RuntimeError(f"run {rid} ended before step {min_step}")
            if state.step >= min_step and any(p.kind == "model" for p in state.pending.values()):
                return state.step
    raise RuntimeError(f"run {rid} never reached step {min_step} in a model call")


def _owner(ud: Undying, rid: str) -> tuple[int, str]:
    raw = ud.store.lease_owner(rid) or ""  # type: ignore[attr-defined]
    parts = raw.split("|")
    try:
        return int(parts[0]), parts[1] if len(parts) > 1 else ""
    except ValueError:
        return -1, ""


def _next_commit(ud: Undying, rid: str, epoch: int, timeout: float = 90) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for e in ud.history(rid):
            if e.kind != "restart" and e.epoch > epoch:
                return e
        time.sleep(0.02)
    return None


def recovery_main(args: argparse.Namespace, env: Env) -> tuple[dict[str, Any], bool]:
    import ray

    ud: Undying = env.ud  # type: ignore[assignment]
    rng = random.Random(args.seed)
    refs = references()
    started: list[tuple[str, int]] = []

    def start(latency: float) -> str:
        q = rng.randrange(len(QUESTIONS))
        rid = f"rec-{uuid.uuid4().hex[:12]}"
        errors = launch(ud, slow_agent(latency), QUESTIONS[q], rid, args.launch_timeout)
        started.append((rid, q))
        if errors:
            print(f"  start {rid}: retried {errors}")
        return rid

    kills = []
    print(f"single SIGKILL, {args.kills} kills, slow_agent({args.kill_latency:g}), one run at a time",
          flush=True)
    for k in range(args.kills):
        rid = start(args.kill_latency)
        try:
            step = _wait_model_pending(ud, rid, rng.choice((2, 3)))
        except RuntimeError as exc:
            print(f"  kill {k}: {exc}")
            continue
        info = ud.actor_info(rid)
        if info is None or not _is_ray_process(int(info["pid"]), "RunActor"):
            print(f"  kill {k}: no live actor")
            continue
        env.pids.add(int(info["pid"]))
        t = time.time()
        os.kill(int(info["pid"]), signal.SIGKILL)
        active = None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # the new incarnation holds the lease
            if _owner(ud, rid)[0] > info["epoch"]:
                active = time.time() - t
                break
            time.sleep(0.005)
        e = _next_commit(ud, rid, int(info["epoch"]))
        restart = next((x for x in ud.history(rid) if x.kind == "restart"), None)
        row = {"run": rid, "step": step,
               "restart_event_s": round(restart.at_ms / 1000 - t, 3) if restart else None,
               "active_s": round(active, 3) if active is not None else None,
               "next_commit_s": round(e.at_ms / 1000 - t, 3) if e is not None else None}
        kills.append(row)
        print(f"  kill {k:2d}: {row}", flush=True)

    trials = []
    print(f"node removal, {args.node_trials} trials, {args.node_runs} runs, "
          f"slow_agent({args.node_latency:g}), default health checks", flush=True)
    for k in range(args.node_trials):
        with ThreadPoolExecutor(max_workers=args.start_concurrency) as ex:  # all in flight at once
            batch = list(ex.map(lambda _: start(args.node_latency), range(args.node_runs)))
        infos = {rid: ud.actor_info(rid) for rid in batch}
        workers = env.workers()
        count = {n.node_id: sum(1 for i in infos.values() if i and i["node_id"] == n.node_id)
                 for n in workers}
        victim = max(workers, key=lambda n: (count[n.node_id], rng.random()))
        hit = {rid: i for rid, i in infos.items() if i and i["node_id"] == victim.node_id
               and ud.info(rid).status not in TERMINAL}
        for i in infos.values():
            if i:
                env.pids.add(int(i["pid"]))
        t = time.time()
        env.cluster.remove_node(victim, allow_graceful=False)
        # poll: when each hit run's new incarnation takes the lease (and on which node), when
        # it commits its next step, and when Ray declares the node dead (default health checks)
        taken: dict[str, tuple[float, str]] = {}
        committed: dict[str, float] = {}
        ended_on_old: set[str] = set()  # finished by the old incarnation, which outlived its node
        declared = None
        deadline = time.monotonic() + 60
        n = 0
        while time.monotonic() < deadline:
            for rid, i in hit.items():
                if rid not in taken:
                    epoch, node = _owner(ud, rid)
                    if epoch > i["epoch"]:
                        taken[rid] = (time.time() - t, node)
                if rid not in committed and rid not in ended_on_old:
                    e = next((x for x in ud.history(rid) if x.kind != "restart"
                              and x.epoch > i["epoch"]), None)
                    if e is not None:
                        committed[rid] = e.at_ms / 1000 - t
                    elif ud.info(rid).status in TERMINAL:
                        ended_on_old.add(rid)
            if declared is None and n % 10 == 0:
                if victim.node_id not in {x["NodeID"] for x in ray.nodes() if x.get("Alive")}:
                    declared = time.time() - t
            n += 1
            if declared is not None and len(committed) + len(ended_on_old) == len(hit):
                break
            time.sleep(0.02)
        restarts_at = []
        for rid, i in hit.items():
            r = next((x for x in ud.history(rid) if x.kind == "restart" and x.epoch > i["epoch"]), None)
            if r is not None:
                restarts_at.append(r.at_ms / 1000 - t)
        per_run = [committed.get(rid, math.inf) for rid in hit if rid not in ended_on_old]
        late = [e.at_ms / 1000 - t for rid, i in hit.items() for e in ud.history(rid)
                if e.kind != "restart" and e.epoch == i["epoch"] and e.at_ms / 1000 > t]
        row = {"runs_in_flight": len(batch), "runs_on_node": len(hit),
               "all_recovered_s": round(max(per_run), 3) if per_run else None,
               "p50_run_s": round(U.p50(per_run), 3) if per_run else None,
               "restart_decided_max_s": round(max(restarts_at), 3) if restarts_at else None,
               "new_incarnation_max_s": round(max(v[0] for v in taken.values()), 3) if taken else None,
               "new_incarnation_on_other_node": sum(1 for v in taken.values() if v[1] != victim.node_id),
               "new_incarnation_seen": len(taken), "ended_by_old_incarnation": len(ended_on_old),
               "old_epoch_commits_after": len(late),
               "old_epoch_last_commit_s": round(max(late), 3) if late else None,
               "ray_declared_dead_s": round(declared, 2) if declared is not None else None}
        trials.append(row)
        print(f"  trial {k}: {row}", flush=True)
        env.add_node()
        for rid in batch:
            with contextlib.suppress(Exception):
                ud.wait(rid, timeout=90)

    results = []
    histories: dict[str, list[Any]] = {}
    for rid, q in started:
        with contextlib.suppress(Exception):
            ud.wait(rid, timeout=60)
        results.append(verify_run(ud, rid, refs[q], histories))
    bad = [r for r in results if not r["ok"]]
    nxt = [r["next_commit_s"] for r in kills if r["next_commit_s"] is not None]
    report = {
        "mode": "recovery", "seed": args.seed, "nodes": args.nodes,
        "kill_latency_s": args.kill_latency, "node_latency_s": args.node_latency,
        "kills": kills,
        "kill_next_commit": _pcts(nxt),
        "kill_active": _pcts([r["active_s"] for r in kills if r["active_s"] is not None]),
        "kill_restart_decided": _pcts([r["restart_event_s"] for r in kills
                                       if r["restart_event_s"] is not None]),
        "node_trials": trials,
        "node_all_recovered": _pcts([r["all_recovered_s"] for r in trials
                                     if r["all_recovered_s"] is not None]),
        "runs_checked": len(results), "runs_bad": len(bad), "bad_runs": bad[:20],
        "steps_lost": sum(r["lost"] for r in results),
        "side_effects_duplicated": sum(r["duplicated"] for r in results),
        "zombie_commits_accepted": sum(r["zombie"] for r in results),
    }
    ok = not bad
    report["invariants_ok"] = ok
    return report, ok


def print_recovery(r: dict[str, Any]) -> None:
    print()
    print(f"recovery report: seed {r['seed']}, {r['nodes']} nodes")
    rows = [
        [f"SIGKILL -> next committed step (slow_agent({r['kill_latency_s']:g}), redo included)",
         _fmt(r["kill_next_commit"])],
        ["SIGKILL -> new incarnation holds the lease", _fmt(r["kill_active"])],
        ["SIGKILL -> restart decided (restart event)", _fmt(r["kill_restart_decided"])],
        [f"hard node removal -> every run of the node committed elsewhere "
         f"(slow_agent({r['node_latency_s']:g}))", _fmt(r["node_all_recovered"])],
        ["runs checked / bad", f"{r['runs_checked']} / {r['runs_bad']}"],
        ["steps lost / side effects duplicated / zombie commits",
         f"{r['steps_lost']} / {r['side_effects_duplicated']} / {r['zombie_commits_accepted']}"],
    ]
    print(U.table(rows, ["measure", "value"]))
    for t in r["node_trials"]:
        print(f"   node trial: {t}")
    for bad in r["bad_runs"][:10]:
        print(f"   bad run: {bad}")
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
    ap.add_argument("--latency", type=float, default=0.5, help="simulated model latency (s)")
    ap.add_argument("--fault-every", type=float, default=6.0, help="mean seconds between faults")
    ap.add_argument("--drain-timeout", type=float, default=120.0,
                    help="after the duration: how long the last runs may take to finish")
    ap.add_argument("--start-concurrency", type=int, default=3, help="runs being started at once")
    ap.add_argument("--launch-timeout", type=float, default=120.0,
                    help="give up (re)trying to start one run after this long")
    ap.add_argument("--kills", type=int, default=20, help="recovery mode: single SIGKILLs")
    ap.add_argument("--kill-latency", type=float, default=0.2, help="recovery mode: model latency")
    ap.add_argument("--node-trials", type=int, default=3, help="recovery mode: hard node removals")
    ap.add_argument("--node-runs", type=int, default=8, help="recovery mode: runs per node trial")
    ap.add_argument("--node-latency", type=float, default=1.0, help="recovery mode: model latency")
    ap.add_argument("--json", type=Path, default=None, help="write the report as JSON here")
    ap.add_argument("--schedule-only", action="store_true", help="print the schedule and exit")
    args = ap.parse_args(argv)
    if args.nodes < 1 or args.runs < 1 or args.duration <= 0:
        ap.error("--nodes and --runs must be >= 1, --duration > 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.schedule_only:
        print(format_schedule(make_schedule(args.seed, args.duration, args.fault_every)))
        return 0
    root = Path(tempfile.mkdtemp(prefix="undying-chaos-"))
    namespace = f"chaos-{uuid.uuid4().hex[:8]}"
    cmd = "python -m bench.chaos " + " ".join(shlex.quote(a) for a in (argv if argv is not None
                                                                         else sys.argv[1:]))
    print(f"command: {cmd}")
    t0 = time.monotonic()
    env = Env(root, args.nodes, namespace)
    ok = False
    try:
        env.start()
        print(f"redis-server {env.redis.url if env.redis else ''} (appendfsync always), "  # type: ignore[union-attr]
              f"{args.nodes}-node cluster up in {env.cluster_up_s:.1f} s, supervisor in "
              f"{env.supervisor_up_s:.1f} s; nproc {os.cpu_count()}, load {os.getloadavg()[0]:.2f}",
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
