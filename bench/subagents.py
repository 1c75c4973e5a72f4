"""Sub-agents at research scale: a thousand in flight, spawn latency, one parent with 2,000 children.

    python -m bench.subagents                      # all three, ~3-4 min on 2 cores
    python -m bench.subagents --quick              # small sizes (smoke: ~1 min)
    python -m bench.subagents --roots 20 --width 50 --latency 1.0 --latency-max 2.0
    python -m bench.subagents --json out.json

Starts its own redis-server (AOF, everysec: the embedded default) and its own local Ray
(num_cpus=2), a supervisor and the pool (hosts per node: --hosts), and runs, through
the public API only:

1. **Fan-out.** ``--roots`` root runs at once, each delegating ``--width`` sub-agents
   (scripted policy ``fanout``: each sub-agent makes two model calls of a latency drawn
   between --latency and --latency-max). Sampled every 0.25 s: sub-agents in flight
   (the store's census), the resident memory of every process of this job (this
   process, Ray's, redis-server: RSS summed, an upper bound since shared pages count
   twice), and the live actor processes (Ray workers running an actor). Reported: wall
   time, peaks, throughput (steps/s, sub-agents finished/s).
2. **Spawn latency**: from the parent's commit of its spawns (the event of its
   ``delegate`` step) to each child's first committed step (its ``start`` event), from
   event times in the runs' histories; measured quiet (one parent, 5 children, several
   times) and under the fan-out burst of 1; next to a cold Ray actor start measured
   in the same run (create a trivial actor with num_cpus=0, call it once).
3. **One parent, 2,000 children** (``--big``): completes, with its time and the
   parent's checkpoint size.

Everything it started is stopped by pid at the end; it never runs `ray stop`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from . import _util as U

ACTOR_KINDS: dict[str, int] = {}  # peak count of live actor processes, by class


def _job_rss_and_actors() -> tuple[int, int]:
    import psutil

    me = psutil.Process()
    procs = [me, *me.children(recursive=True)]
    rss = 0
    actors = 0
    kinds: dict[str, int] = {}
    for p in procs:
        try:
            rss += p.memory_info().rss
            name = " ".join(p.cmdline()[:1])
            if name.startswith("ray::") and not name.startswith("ray::IDLE"):
                actors += 1
                kind = name[5:].split(".")[0].split()[0]
                kinds[kind] = kinds.get(kind, 0) + 1
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    for k, n in kinds.items():
        ACTOR_KINDS[k] = max(ACTOR_KINDS.get(k, 0), n)
    return rss, actors


class Sampler:
    def __init__(self, ud: Any, prefix: str) -> None:
        self.ud, self.prefix = ud, prefix
        self.peak_rss = 0
        self.peak_actors = 0
        self.peak_in_flight = 0
        self.samples: list[tuple[float, int, int, int]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        t0 = time.monotonic()
        while not self.stop.is_set():
            rss, actors = _job_rss_and_actors()
            c = self.ud.store.census(self.prefix)
            in_flight = sum(c[s][1] for s in ("pending", "running", "waiting"))
            self.peak_rss = max(self.peak_rss, rss)
            self.peak_actors = max(self.peak_actors, actors)
            self.peak_in_flight = max(self.peak_in_flight, in_flight)
            self.samples.append((time.monotonic() - t0, in_flight, rss, actors))
            self.stop.wait(0.25)

    def __enter__(self) -> Sampler:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.thread.join()


def _events(ud: Any, run_id: str) -> list[Any]:
    return ud.history(run_id)


def spawn_latencies_ms(ud: Any, parent: str) -> list[float]:
    """Parent's commit of its spawns -> each child's first committed step."""
    spawned_at = next(e.at_ms for e in _events(ud, parent) if "delegate" in e.summary)
    out = []
    for child in ud.state(parent).delegation.done:
        first = next(e for e in _events(ud, child) if e.step == 1)
        out.append(first.at_ms - spawned_at)
    return out


def cold_actor_start_s(n: int = 5) -> list[float]:
    import ray

    @ray.remote(num_cpus=0)
    class Cold:
        def ping(self) -> int:
            return 1

    out = []
    for _ in range(n):
        t = time.perf_counter()
        a = Cold.remote()  # type: ignore[attr-defined]
        ray.get(a.ping.remote())
        out.append(time.perf_counter() - t)
        ray.kill(a)
    return out


def fan_out(ud: Any, roots: int, width: int, lat: float, lat_max: float,
            tag: str) -> dict[str, Any]:
    from undying.actors.scripted import fanout_task
    from undying.testing import fanout_agent

    agent = fanout_agent(latency_s=lat, latency_max_s=lat_max)
    prefix = f"{tag}-"
    steps0 = ud.store.counters().get("steps_total", 0)
    t0 = time.monotonic()
    with Sampler(ud, prefix) as sampler:
        handles = [ud.start(agent, fanout_task(width, 1, f"r{i}"), run_id=f"{prefix}{i:03d}")
                   for i in range(roots)]
        results = [h.result(timeout=3600) for h in handles]
    wall = time.monotonic() - t0
    steps = ud.store.counters().get("steps_total", 0) - steps0
    ok = sum(1 for r in results if r.status == "finished"
             and r.answer and r.answer.endswith(f"{width}/{width} sub-agents answered"))
    lat_ms = [x for h in handles for x in spawn_latencies_ms(ud, h.run_id)]
    return {"roots": roots, "width": width, "subagents": roots * width,
            "latency_s": [lat, lat_max], "wall_s": round(wall, 2), "roots_ok": ok,
            "peak_in_flight": sampler.peak_in_flight,
            "peak_rss_gib": round(sampler.peak_rss / (1 << 30), 2),
            "peak_actor_processes": sampler.peak_actors, "actor_kinds": dict(ACTOR_KINDS),
            "steps": steps,
            "steps_per_s": round(steps / wall, 1),
            "subagents_per_s": round(roots * width / wall, 1),
            "spawn_ms_p50": round(statistics.median(lat_ms), 1),
            "spawn_ms_p90": round(U.pct(lat_ms, 90), 1), "spawn_ms_max": max(lat_ms),
            "critical_path_s": round(lat_max * 2 + lat_max * 2, 1),
            "in_flight_samples": [s[1] for s in sampler.samples]}


def quiet_spawns(ud: Any, repeats: int, tag: str) -> list[float]:
    from undying.actors.scripted import fanout_task
    from undying.testing import fanout_agent

    agent = fanout_agent(latency_s=0.05)
    out: list[float] = []
    for i in range(repeats):
        h = ud.start(agent, fanout_task(5, 1, f"q{i}"), run_id=f"{tag}-q{i}")
        assert h.result(timeout=120).status == "finished"
        out.extend(spawn_latencies_ms(ud, h.run_id))
    return out


def big_parent(ud: Any, width: int, lat: float, lat_max: float, tag: str) -> dict[str, Any]:
    from undying.actors.scripted import fanout_task
    from undying.testing import fanout_agent

    agent = fanout_agent(latency_s=lat, latency_max_s=lat_max)
    t0 = time.monotonic()
    with Sampler(ud, f"{tag}-") as sampler:
        h = ud.start(agent, fanout_task(width, 1, "big"), run_id=f"{tag}-big")
        res = h.result(timeout=3600)
    wall = time.monotonic() - t0
    events = ud.history(h.run_id)
    snap = max((e.snapshot_bytes for e in events), default=0)
    return {"children": width, "status": res.status, "answer": res.answer,
            "wall_s": round(wall, 2), "parent_steps": res.steps,
            "child_results_applied": sum(1 for e in events if e.kind == "child_result"),
            "parent_largest_snapshot_kib": round(snap / 1024, 1),
            "parent_bytes_written_mib": round(sum(e.delta_bytes + e.snapshot_bytes
                                                  for e in events) / (1 << 20), 2),
            "peak_in_flight": sampler.peak_in_flight,
            "peak_rss_gib": round(sampler.peak_rss / (1 << 30), 2)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.subagents", description=__doc__.split("\n")[0])
    p.add_argument("--roots", type=int, default=20)
    p.add_argument("--width", type=int, default=50)
    p.add_argument("--latency", type=float, default=1.0)
    p.add_argument("--latency-max", type=float, default=2.0)
    p.add_argument("--big", type=int, default=2000, help="children of the one big parent (0: skip)")
    p.add_argument("--hosts", type=int, default=4, help="host actors per node")
    p.add_argument("--quick", action="store_true", help="4 roots x 10, a 200-child parent")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    if args.quick:
        args.roots, args.width, args.big = 4, 10, 200
        args.latency, args.latency_max = 0.5, 1.0

    root = Path(tempfile.mkdtemp(prefix="undying-bench-subagents-"))
    out: dict[str, Any] = {"command": "python -m bench.subagents " + " ".join(argv or sys.argv[1:])}
    try:
        with U.redis_server(root, "everysec") as server, U.local_ray(root):
            import redis

            from undying import Settings, Undying
            from undying.actors.pool import shutdown_pool

            version = redis.Redis.from_url(server.url).info("server")["redis_version"]
            out["machine"] = U.machine_info(version, Path(server.binary).name)
            ns = f"bench-{uuid.uuid4().hex[:6]}"
            ud = Undying(Settings(redis_url=server.url, namespace=ns),
                         actor_options={"hosts_per_node": args.hosts})
            t = time.monotonic()
            ud.supervisor()
            out["pool_up_s"] = round(time.monotonic() - t, 2)
            tag = uuid.uuid4().hex[:6]
            cold = cold_actor_start_s()
            quiet = quiet_spawns(ud, 4, f"{tag}q")
            out["cold_actor_start_ms"] = [round(x * 1000, 1) for x in cold]
            out["spawn_quiet_ms"] = {"p50": round(statistics.median(quiet), 1),
                                     "p90": round(U.pct(quiet, 90), 1), "n": len(quiet)}
            print(f"pool up in {out['pool_up_s']}s; cold Ray actor start p50 "
                  f"{statistics.median(cold) * 1000:.0f} ms; spawn (quiet) p50 "
                  f"{out['spawn_quiet_ms']['p50']} ms", flush=True)
            fo = fan_out(ud, args.roots, args.width, args.latency, args.latency_max, f"{tag}f")
            out["fan_out"] = fo
            print(f"fan-out {fo['roots']} x {fo['width']}: {fo['wall_s']}s, peak "
                  f"{fo['peak_in_flight']} sub-agents in flight, peak RSS "
                  f"{fo['peak_rss_gib']} GiB, {fo['peak_actor_processes']} actor processes",
                  flush=True)
            if args.big:
                out["big"] = big_parent(ud, args.big, 0.5, 1.0, f"{tag}b")
                print(f"one parent, {args.big} children: {out['big']['status']} in "
                      f"{out['big']['wall_s']}s", flush=True)
            out["machine"]["loadavg_end"] = [round(x, 2) for x in __import__("os").getloadavg()]
            import ray

            ray.kill(ud.supervisor(), no_restart=True)
            shutdown_pool(ns)
            ud.close()
    finally:
        U.rmtree(root)
    _print(out)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    fo = out.get("fan_out", {})
    ok = fo.get("roots_ok") == fo.get("roots") and out.get("big", {}).get("status", "finished") == "finished"
    return 0 if ok else 1


def _print(out: dict[str, Any]) -> None:
    fo, big = out["fan_out"], out.get("big")
    cold = out["cold_actor_start_ms"]
    m = out["machine"]
    print(f"\nmachine: {m['nproc']} cores, {m['mem_total_gib']} GiB, Ray {m['ray']}, "
          f"redis-server {m['redis_server']}; load {m['loadavg_start']} -> {m['loadavg_end']}")
    print(U.table([
        ["sub-agents in flight at once (peak)", str(fo["peak_in_flight"]),
         f"{fo['roots']} roots x {fo['width']}", ""],
        ["batch wall time", f"{fo['wall_s']} s", f"each sub-agent: 2 model calls of "
         f"{fo['latency_s'][0]}-{fo['latency_s'][1]} s", ""],
        ["peak memory (RSS of every process of the job)", f"{fo['peak_rss_gib']} GiB",
         "target <= 8 GiB", "met" if fo["peak_rss_gib"] <= 8 else "NOT met"],
        ["peak live actor processes", str(fo["peak_actor_processes"]),
         ", ".join(f"{n} {k}" for k, n in sorted(fo.get("actor_kinds", {}).items())), ""],
        ["throughput", f"{fo['steps_per_s']} steps/s", f"{fo['subagents_per_s']} sub-agents/s", ""],
        ["spawn -> child's first step, p50 (quiet)", f"{out['spawn_quiet_ms']['p50']} ms",
         f"cold Ray actor start p50 {statistics.median(cold):.0f} ms",
         "met" if out["spawn_quiet_ms"]["p50"] <= 50 else "NOT met"],
        ["spawn -> child's first step, p50 / p90 (burst)", f"{fo['spawn_ms_p50']} / "
         f"{fo['spawn_ms_p90']} ms", f"{fo['subagents']} spawned within ~1 s", ""],
        *([[f"one parent, {big['children']} children", big["status"], f"{big['wall_s']} s, "
            f"{big['child_results_applied']} results applied once, parent snapshot "
            f"{big['parent_largest_snapshot_kib']} KiB", ""]] if big else []),
    ], ["measure", "value", "context", "target"]))


if __name__ == "__main__":
    sys.exit(main())
