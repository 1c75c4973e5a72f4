"""Checkpoint cost: what committing after every message costs, measured side by side.

    python -m bench.checkpoint                 # full run (~1 min on 2 cores)
    python -m bench.checkpoint --quick         # small sizes (CI smoke test)
    python -m bench.checkpoint --json out.json --appendfsync always

Starts its own redis-server (AOF on, a temp dir, a free port) and its own
local Ray, and stops both by pid at the end. Five measurements, each against
its baseline in the same run on the same Redis (see bench/README.md):

  1. commit latency of one realistic step  vs  one XADD of the same bytes
  2. commit cost at step ~N                vs  at step ~10
  3. bytes written over N steps            vs  the sum of the deltas
  4. a checkpointed step in a Ray actor    vs  the same step without its checkpoint
  5. resume (load_state) of an N-step run  vs  decoding its state alone
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import redis

from undying.actors import RunState, StepEvent, load_state
from undying.persistence import (
    Commit,
    RedisStore,
    apply_delta,
    decode,
    diff_states,
    encode,
    pack,
    unpack,
    validate,
)

from . import _util as U
from ._util import Checkpointer, advance, base_state, corpus_texts, make_message

TARGETS = {"commit_vs_xadd": 1.5, "late_vs_early": 1.1, "bytes_vs_deltas": 2.0,
           "actor_ck_vs_plain": 1.3, "resume_vs_decode": 1.5}
RATIOS = (1.0, 2.0, 4.0)


def rid(prefix: str) -> str:
    return f"bench-{prefix}-{uuid.uuid4().hex[:8]}"


def build_states(n: int, run_id: str, texts: list[str]) -> list[RunState]:
    """States 0..n of one conversation, each one step (one ~1 KB message) after the last."""
    states = [base_state(run_id)]
    for i in range(1, n + 1):
        states.append(advance(states[-1], make_message(i, texts[i]), f"{i}-0"))
    return states


def step_records(states: list[RunState], epoch: int) -> list[tuple[bytes, bytes]]:
    """(delta, event) bytes of each step, as the engine produces them."""
    out = []
    for old, new in zip(states, states[1:], strict=False):
        delta = pack("delta", {"step": new.step, "ops": diff_states(old, new)})
        last = new.conversation[-1]
        event = encode("event", StepEvent(
            step=new.step, kind="tool_result", status=new.status, epoch=epoch,
            at_ms=int(time.time() * 1000), delta_bytes=len(delta),
            summary=f"tool {last.name}: {len(last.content)} chars"))
        out.append((delta, event))
    return out


def pinned(server_pid: int, placement: str) -> Any:
    """Pin redis-server's main thread and this process to one core ("same") or two ("cross")."""
    import contextlib

    @contextlib.contextmanager
    def cm() -> Any:
        cpus = sorted(os.sched_getaffinity(0))
        if placement == "os" or len(cpus) < 2 or not hasattr(os, "sched_setaffinity"):
            yield placement if placement == "os" else "os (one cpu)"
            return
        mine, theirs = set(os.sched_getaffinity(0)), set(os.sched_getaffinity(server_pid))
        os.sched_setaffinity(0, {cpus[0]})
        os.sched_setaffinity(server_pid, {cpus[0]} if placement == "same" else {cpus[1]})
        try:
            yield placement
        finally:
            os.sched_setaffinity(0, mine)
            with contextlib.suppress(OSError):
                os.sched_setaffinity(server_pid, theirs)

    return cm()


def commandstats(r: redis.Redis) -> dict[str, dict[str, float]]:
    return {k.removeprefix("cmdstat_"): v for k, v in r.info("commandstats").items()}


# -- 1. commit vs XADD ------------------------------------------------------------------------


def bench_commit(url: str, steps: int, pairs: int, texts: list[str]) -> dict[str, Any]:
    store = RedisStore(url)
    r = store.r  # the same client and connection: the difference is the commit itself
    states = build_states(min(steps, 200), "x" * 17, texts)
    recs = step_records(states, epoch=1)
    run = rid("commit")
    store.create(run, encode("snapshot", states[0], run_id=run), agent="bench")
    epoch = store.claim_epoch(run)
    run2 = rid("evalsha")
    store.create(run2, encode("snapshot", states[0], run_id=run2), agent="bench")
    epoch2 = store.claim_epoch(run2)
    raw_key = f"bench:{{{run}}}:raw"
    # the same Lua script with the same keys and args, called without RedisStore.commit
    # around it: a second store whose script call only records what it would send
    sha = store._commit.sha
    capture = RedisStore(url)
    sent: dict[str, Any] = {}

    def record(keys: list[Any], args: list[Any]) -> list[Any]:
        sent["keys"], sent["args"] = keys, args
        return [b"OK", 0, 0, 0]

    capture._commit = record  # type: ignore[assignment,method-assign]

    t_commit: list[int] = []
    t_xadd: list[int] = []
    t_eval: list[int] = []
    t_ping: list[int] = []
    per_rep: list[float] = []
    step = step2 = 0
    warm = 50
    block = max(1, pairs // 5)
    for i in range(warm + pairs):
        if i == warm:
            r.config_resetstat()
            t_commit.clear(), t_xadd.clear(), t_eval.clear(), t_ping.clear()
        delta, event = recs[i % len(recs)]
        step += 1
        step2 += 1

        c1 = Commit(epoch=epoch, step=step, status="running", delta=delta, events=(event,),
                    kind="tool_result")

        def do_commit(c1: Commit = c1) -> None:
            store.commit(run, c1)

        def do_xadd(fields: dict[str, bytes] = {"d": delta, "e": event}) -> None:  # noqa: B006
            r.xadd(raw_key, fields)  # type: ignore[arg-type]

        capture.commit(run2, Commit(epoch=epoch2, step=step2, status="running", delta=delta,
                                    events=(event,), kind="tool_result"))
        keys2, args2 = sent["keys"], sent["args"]

        def do_eval(keys2: list[Any] = keys2, args2: list[Any] = args2) -> None:
            res = r.evalsha(sha, len(keys2), *keys2, *args2)
            assert res[0] == b"OK", res

        ops = [(do_commit, t_commit), (do_xadd, t_xadd), (do_eval, t_eval), (r.ping, t_ping)]
        k = i % len(ops)
        for fn, sink in ops[k:] + ops[:k]:  # rotate the order: no op always goes first
            t0 = time.perf_counter_ns()
            fn()
            sink.append(time.perf_counter_ns() - t0)
        if i >= warm and (i - warm + 1) % block == 0:
            per_rep.append(U.ratio(U.p50(t_commit[-block:]), U.p50(t_xadd[-block:])))
    cs = commandstats(r)
    store.delete(run)
    store.delete(run2)
    r.delete(raw_key)
    store.close()
    capture.close()
    c, x = U.summary_us(t_commit), U.summary_us(t_xadd)
    return {
        "pairs": pairs,
        "delta_bytes_p50": U.p50([len(d) for d, _ in recs]),
        "event_bytes_p50": U.p50([len(e) for _, e in recs]),
        "commit": c,
        "xadd": x,
        "evalsha_direct": U.summary_us(t_eval),
        "ping": U.summary_us(t_ping),
        "ratio_p50": round(U.ratio(c["p50_us"], x["p50_us"]), 3),
        "ratio_p99": round(U.ratio(c["p99_us"], x["p99_us"]), 3),
        "ratio_p50_blocks": [round(v, 3) for v in per_rep],
        "server_us_per_call": {name: cs.get(name, {}).get("usec_per_call")
                               for name in ("evalsha", "xadd", "ping", "rpush", "hget",
                                            "hset", "hincrby")},
        "server_calls": {name: cs.get(name, {}).get("calls")
                         for name in ("evalsha", "xadd", "hget", "hset", "hincrby", "rpush")},
    }


# -- 2. growth: step ~N vs step ~10 ------------------------------------------------------------


def bench_growth(url: str, steps: int, repeats: int, window: int,
                 texts: list[str]) -> dict[str, Any]:
    store = RedisStore(url)
    out: dict[str, Any] = {"window": window, "early_steps": [1, window],
                           "late_steps": [steps - window + 1, steps], "by_ratio": {}}
    for cr in RATIOS:
        early: list[U.StepTiming] = []
        late: list[U.StepTiming] = []
        snaps_full: list[int] = []
        per_rep = []
        for _ in range(repeats):
            old = Checkpointer(store, rid("old"), compact_ratio=cr)
            young = Checkpointer(store, rid("young"), compact_ratio=cr)
            n_snap = 0
            for i in range(1, steps - window + 1):  # untimed: bring the old run to step N - W
                n_snap += old.step(advance(old.state, make_message(i, texts[i]), f"{i}-0")).snapshot
            rep_e, rep_l = [], []
            for j in range(1, window + 1):
                i = steps - window + j
                pair = [(young, j, rep_e), (old, i, rep_l)]
                if j % 2:
                    pair.reverse()
                for ck, k, sink in pair:
                    new = advance(ck.state, make_message(k, texts[k]), f"{k}-0")
                    sink.append(ck.step(new))
            n_snap += sum(t.snapshot for t in rep_l)
            snaps_full.append(n_snap)
            early += rep_e
            late += rep_l
            per_rep.append(U.ratio(U.p50([t.total_ns for t in rep_l if not t.snapshot]),
                                   U.p50([t.total_ns for t in rep_e if not t.snapshot])))
            store.delete(old.run_id)
            store.delete(young.run_id)

        def phases(ts: list[U.StepTiming]) -> dict[str, Any]:
            plain = [t for t in ts if not t.snapshot]
            return {"n": len(plain), "snapshot_steps_excluded": len(ts) - len(plain),
                    "total": U.summary_us([t.total_ns for t in plain]),
                    "diff_p50_us": round(U.p50(U.us([t.diff_ns for t in plain])), 2),
                    "pack_p50_us": round(U.p50(U.us([t.pack_ns for t in plain])), 2),
                    "commit_p50_us": round(U.p50(U.us([t.commit_ns for t in plain])), 2),
                    "snapshot_step_p50_us": round(U.p50(U.us(
                        [t.total_ns for t in ts if t.snapshot])), 1)}

        e, lt = phases(early), phases(late)
        out["by_ratio"][str(cr)] = {
            "early": e, "late": lt,
            "ratio_p50": round(U.ratio(lt["total"]["p50_us"], e["total"]["p50_us"]), 3),
            "ratio_p50_repeats": [round(v, 3) for v in per_rep],
            "snapshots_in_n_steps": snaps_full,
        }
    store.close()
    return out


# -- 3. bytes written; 5. resume --------------------------------------------------------------


def aof_size(r: redis.Redis) -> int:
    info = r.info("persistence")
    return int(info.get("aof_current_size", 0))


def bench_bytes(url: str, steps: int, texts: list[str]) -> tuple[dict[str, Any], dict[float, Any]]:
    store = RedisStore(url)
    r = store.r
    out: dict[str, Any] = {"by_ratio": {}}
    runs: dict[float, Any] = {}
    full_rewrite = 0
    for cr in RATIOS:
        run = rid(f"bytes{cr:g}")
        a0 = aof_size(r)
        ck = Checkpointer(store, run, compact_ratio=cr)
        deltas = written = events = snaps = snap_bytes = 0
        snap_at = []
        for i in range(1, steps + 1):
            new = advance(ck.state, make_message(i, texts[i]), f"{i}-0")
            t = ck.step(new)
            deltas += t.delta_bytes
            written += t.written_bytes
            events += t.event_bytes
            if t.snapshot:
                snaps += 1
                snap_bytes += t.written_bytes
                snap_at.append(i)
            if cr == RATIOS[0]:
                full_rewrite += len(encode("snapshot", new, run_id=run))
        time.sleep(0.05)
        a1 = aof_size(r)
        out["by_ratio"][str(cr)] = {
            "sum_deltas": deltas,
            "written_checkpoint": written + ck.created_bytes,
            "of_which_snapshots": snap_bytes + ck.created_bytes,
            "snapshots": snaps,
            "snapshot_at_steps": snap_at,
            "event_bytes": events,
            "aof_bytes": a1 - a0,
            "final_state_bytes": len(encode("snapshot", ck.state, run_id=run)),
            "ratio_written_vs_deltas": round(U.ratio(written + ck.created_bytes, deltas), 3),
            "ratio_aof_vs_deltas": round(U.ratio(a1 - a0, deltas), 3),
        }
        runs[cr] = (run, ck.state)
    out["full_rewrite_bytes"] = full_rewrite
    for v in out["by_ratio"].values():
        v["ratio_full_rewrite_vs_deltas"] = round(U.ratio(full_rewrite, v["sum_deltas"]), 1)
        v["ratio_full_rewrite_vs_written"] = round(U.ratio(full_rewrite, v["written_checkpoint"]), 1)
    store.close()
    return out, runs


def bench_resume(url: str, runs: dict[float, Any], repeats: int) -> dict[str, Any]:
    store = RedisStore(url)
    out: dict[str, Any] = {"repeats": repeats, "by_ratio": {}}
    for cr, (run, final) in runs.items():
        snap = encode("snapshot", final, run_id=run)
        t_load, t_dec, t_fetch, t_fold, t_val = [], [], [], [], []
        info = None
        for k in range(repeats + 1):  # the first round is a warm-up
            order = [0, 1, 2] if k % 2 else [2, 1, 0]
            for op in order:
                if op == 0:
                    t0 = time.perf_counter_ns()
                    state, loaded = load_state(store, run)
                    dt = time.perf_counter_ns() - t0
                    assert state == final, "load_state returned a different state"
                    info = loaded
                    if k:
                        t_load.append(dt)
                elif op == 1:
                    t0 = time.perf_counter_ns()
                    decode("snapshot", RunState, snap, run_id=run)
                    if k:
                        t_dec.append(time.perf_counter_ns() - t0)
                else:  # load_state's phases, one by one
                    t0 = time.perf_counter_ns()
                    loaded = store.load(run)
                    t1 = time.perf_counter_ns()
                    data = unpack("snapshot", loaded.snapshot, run_id=run)
                    for raw in loaded.deltas:
                        apply_delta(data, unpack("delta", raw, run_id=run)["ops"])
                    t2 = time.perf_counter_ns()
                    validate("snapshot", RunState, data, run_id=run)
                    t3 = time.perf_counter_ns()
                    if k:
                        t_fetch.append(t1 - t0)
                        t_fold.append(t2 - t1)
                        t_val.append(t3 - t2)
        assert info is not None
        lo, de = U.summary_us(t_load), U.summary_us(t_dec)
        out["by_ratio"][str(cr)] = {
            "messages": len(final.conversation),
            "snapshot_bytes": info.snapshot_bytes, "snapshot_step": info.snapshot_step,
            "journal_len": len(info.deltas), "journal_bytes": info.journal_bytes,
            "final_state_bytes": len(snap),
            "load_state": lo, "decode_snapshot": de,
            "phases_p50_us": {"store.load": round(U.p50(U.us(t_fetch)), 1),
                              "unpack+fold": round(U.p50(U.us(t_fold)), 1),
                              "validate": round(U.p50(U.us(t_val)), 1)},
            "ratio_p50": round(U.ratio(lo["p50_us"], de["p50_us"]), 3),
        }
        store.delete(run)
    store.close()
    return out


# -- 4. inside a Ray actor; end to end ---------------------------------------------------------


def bench_actor(url: str, calls: int, e2e_runs: int, actor_runs: int) -> dict[str, Any]:
    import ray

    from ._actor import StepActor

    modes = ["noop", "bare", "diff", "checkpoint"]
    a = StepActor.remote(url, calls + 40, 2.0)
    ray.get(a.stats.remote())
    for m in modes:  # warm up each path
        for _ in range(10):
            ray.get(a.step.remote(m))
    lat: dict[str, list[int]] = {m: [] for m in modes}
    work: dict[str, list[int]] = {m: [] for m in modes}
    for i in range(calls):
        k = i % len(modes)
        for m in modes[k:] + modes[:k]:
            t0 = time.perf_counter_ns()
            w = ray.get(a.step.remote(m))
            lat[m].append(time.perf_counter_ns() - t0)
            work[m].append(w)
    stats = ray.get(a.stats.remote())
    ray.get(a.close.remote())
    ray.kill(a)
    res: dict[str, Any] = {"calls": calls, "actor_snapshots": stats["snapshots"],
                           "final_conversation": stats["conversation"], "modes": {}}
    for m in modes:
        res["modes"][m] = {"call": U.summary_us(lat[m]), "work_in_actor": U.summary_us(work[m])}
    ck, base = res["modes"]["checkpoint"]["call"], res["modes"]["diff"]["call"]
    res["ratio_p50"] = round(U.ratio(ck["p50_us"], base["p50_us"]), 3)
    res["ratio_p50_vs_bare"] = round(U.ratio(ck["p50_us"], res["modes"]["bare"]["call"]["p50_us"]), 3)
    res["ratio_p99"] = round(U.ratio(ck["p99_us"], base["p99_us"]), 3)
    res["e2e"] = bench_e2e(url, e2e_runs, actor_runs)
    return res


def bench_e2e(url: str, runs: int, actor_runs: int) -> dict[str, Any]:

    from undying.actors.research import agent
    from undying.persistence import MemoryStore
    from undying.testing import run_inline

    task = "How do fencing tokens stop a zombie actor from writing an old checkpoint?"
    rstore = RedisStore(url)
    acc: dict[str, list[tuple[int, int]]] = {"memory": [], "redis": []}
    for i in range(runs + 1):  # the first pair is a warm-up
        order = ["memory", "redis"] if i % 2 else ["redis", "memory"]
        for kind in order:
            store = MemoryStore() if kind == "memory" else rstore
            t0 = time.perf_counter_ns()
            st = run_inline(store, agent, task)
            dt = time.perf_counter_ns() - t0
            assert st.status == "finished", st.error
            if i:
                acc[kind].append((st.step, dt))
            if kind == "redis":
                rstore.delete(st.run_id)
    out: dict[str, Any] = {"runs": runs}
    for kind, xs in acc.items():
        n = sum(s for s, _ in xs)
        t = sum(d for _, d in xs)
        out[f"inline_{kind}"] = {"steps": n, "steps_per_s": round(n / (t / 1e9), 1),
                                 "run_ms_p50": round(U.p50([d / 1e6 for _, d in xs]), 2)}
    out["inline_redis_vs_memory_time"] = round(
        out["inline_memory"]["steps_per_s"] / out["inline_redis"]["steps_per_s"], 3)

    # the real Ray path: a pool of hosts and an executor (ud.start -> the run's end)
    from undying import Settings, Undying
    from undying.actors.pool import shutdown_pool

    ns = f"bench-ck-{os.getpid()}"
    ud = Undying(Settings(redis_url=url, namespace=ns), supervise=False)
    t0 = time.perf_counter_ns()
    ud.ensure_cluster()
    pool_ready = time.perf_counter_ns() - t0
    running, steps = [], 0
    for _ in range(actor_runs):
        t1 = time.perf_counter_ns()
        res = ud.start(agent, task).result(timeout=120)
        running.append(time.perf_counter_ns() - t1)
        assert res.status == "finished", res.error
        steps += res.steps
        rstore.delete(res.run_id)
    if actor_runs:
        out["run_actor"] = {
            "runs": actor_runs, "steps": steps,
            "pool_ready_ms": round(pool_ready / 1e6, 1),
            "run_ms_p50": round(U.p50([x / 1e6 for x in running]), 1),
            "steps_per_s_excl_creation": round(steps / (sum(running) / 1e9), 1),
            "steps_per_s_incl_creation": round(steps / ((sum(running) + pool_ready) / 1e9), 1),
        }
    shutdown_pool(ns)
    ud.close()
    rstore.close()
    return out


# -- the report ----------------------------------------------------------------------------------


def verdict(value: float, target: float) -> str:
    return "met" if value <= target else "NOT met"


def r3(x: float) -> str:
    return f"{x:.3f}x"


def report(res: dict[str, Any]) -> str:
    m = res["machine"]
    lines = [
        f"command: {res['command']}",
        f"machine: {m['nproc']} cpus ({m['cpu']}), {m['mem_total_gib']} GiB, {m['os']}; "
        f"load avg {m['loadavg_start']} at start, {res.get('loadavg_end')} at end",
        f"python {m['python']}, redis-server {m['redis_server']} (AOF on, appendfsync "
        f"{res['config']['appendfsync']}), redis-py {m['redis_py']} (hiredis: {m['hiredis']}), "
        f"ray {m['ray']}, msgpack {m['msgpack']}, pydantic {m['pydantic']}",
        f"steps {res['config']['steps']}, repeats {res['config']['repeats']}, "
        f"wall {res['wall_s']:.1f} s", ""]
    rows = []
    c = res["commit"]
    rows.append(["1 commit p50 vs XADD p50 (same bytes)",
                 f"{c['commit']['p50_us']:.0f} / {c['xadd']['p50_us']:.0f} us",
                 f"{c['ratio_p50']:.3f}x", f"<= {TARGETS['commit_vs_xadd']}x",
                 verdict(c["ratio_p50"], TARGETS["commit_vs_xadd"])])
    g = res["growth"]["by_ratio"]["2.0"]
    rows.append([f"2 step ~{res['config']['steps']} vs step ~10 (diff+pack+commit p50)",
                 f"{g['late']['total']['p50_us']:.0f} / {g['early']['total']['p50_us']:.0f} us",
                 f"{g['ratio_p50']:.3f}x", f"<= {TARGETS['late_vs_early']}x",
                 verdict(g["ratio_p50"], TARGETS["late_vs_early"])])
    b = res["bytes"]["by_ratio"]["2.0"]
    rows.append([f"3 bytes written vs sum of deltas ({res['config']['steps']} steps)",
                 f"{b['written_checkpoint'] / 1e6:.2f} / {b['sum_deltas'] / 1e6:.2f} MB",
                 f"{b['ratio_written_vs_deltas']:.3f}x", f"<= {TARGETS['bytes_vs_deltas']}x",
                 verdict(b["ratio_written_vs_deltas"], TARGETS["bytes_vs_deltas"])])
    if "actor" in res:
        a = res["actor"]
        rows.append(["4 Ray actor call: step+checkpoint vs step+diff",
                     f"{a['modes']['checkpoint']['call']['p50_us']:.0f} / "
                     f"{a['modes']['diff']['call']['p50_us']:.0f} us",
                     f"{a['ratio_p50']:.3f}x", f"<= {TARGETS['actor_ck_vs_plain']}x",
                     verdict(a["ratio_p50"], TARGETS["actor_ck_vs_plain"])])
    r5 = res["resume"]["by_ratio"]["2.0"]
    rows.append([f"5 load_state vs decode snapshot ({r5['messages']} msgs)",
                 f"{r5['load_state']['p50_us'] / 1e3:.2f} / "
                 f"{r5['decode_snapshot']['p50_us'] / 1e3:.2f} ms",
                 f"{r5['ratio_p50']:.3f}x", f"<= {TARGETS['resume_vs_decode']}x",
                 verdict(r5["ratio_p50"], TARGETS["resume_vs_decode"])])
    lines.append(U.table(rows, ["measure (compact_ratio 2)", "value", "ratio", "target", ""]))
    pl = res.get("commit_placement", {})
    if pl:
        lines.append("   1 depends on where the OS puts the driver and redis-server: pinned "
                     + ", ".join(f"{k} core{'s' if k == 'cross' else ''} {v['ratio_p50']:.2f}x "
                                 f"(+{v['commit']['p50_us'] - v['xadd']['p50_us']:.0f} us)"
                                 for k, v in pl.items()))

    # details
    lines += ["", f"1. commit of one step (delta {c['delta_bytes_p50']:.0f} B + event "
              f"{c['event_bytes_p50']:.0f} B), {c['pairs']} interleaved pairs"]
    rows = []
    for name, key in [("RedisStore.commit", "commit"), ("XADD same bytes", "xadd"),
                      ("EVALSHA same script, direct", "evalsha_direct"), ("PING", "ping")]:
        rows.append([name, f"{c[key]['p50_us']:.0f}", f"{c[key]['p99_us']:.0f}"])
    lines.append(U.table(rows, ["op", "p50 us", "p99 us"]))
    lines.append(f"   unpinned: ratio p50 {c['ratio_p50']:.2f}x (blocks {c['ratio_p50_blocks']}), "
                 f"p99 {c['ratio_p99']:.2f}x; server us/call: evalsha "
                 f"{c['server_us_per_call']['evalsha']}, xadd {c['server_us_per_call']['xadd']}")
    for pl, oc in res.get("commit_placement", {}).items():
        lines.append(f"   pinned, {pl} core{'s' if pl == 'cross' else ''} (driver, redis-server): "
                     f"commit p50 {oc['commit']['p50_us']:.0f} us, XADD p50 "
                     f"{oc['xadd']['p50_us']:.0f} us, PING p50 {oc['ping']['p50_us']:.0f} us, "
                     f"ratio p50 {oc['ratio_p50']:.2f}x, commit - XADD "
                     f"{oc['commit']['p50_us'] - oc['xadd']['p50_us']:.0f} us ({oc['pairs']} pairs)")
    for pol, oc in res.get("commit_other_fsync", {}).items():
        lines.append(f"   appendfsync {pol}: commit p50 {oc['commit']['p50_us']:.0f} us / p99 "
                     f"{oc['commit']['p99_us']:.0f}, XADD p50 {oc['xadd']['p50_us']:.0f} / p99 "
                     f"{oc['xadd']['p99_us']:.0f}, ratio p50 {oc['ratio_p50']:.2f}x "
                     f"({oc['pairs']} pairs)")

    gr = res["growth"]
    lines += ["", f"2. per-step cost, early steps {gr['early_steps']} vs late steps "
              f"{gr['late_steps']}, interleaved, {res['config']['repeats']} repeats; "
              "snapshot steps excluded"]
    rows = []
    for cr, v in gr["by_ratio"].items():
        for label, w in (("early", v["early"]), ("late", v["late"])):
            rows.append([cr, label, f"{w['total']['p50_us']:.0f}", f"{w['total']['p99_us']:.0f}",
                         f"{w['diff_p50_us']:.1f}", f"{w['pack_p50_us']:.1f}",
                         f"{w['commit_p50_us']:.0f}", str(w["snapshot_steps_excluded"]),
                         f"{v['ratio_p50']:.2f}x" if label == "late" else "",
                         str(v["snapshots_in_n_steps"][0]) if label == "late" else ""])
    lines.append(U.table(rows, ["compact", "window", "p50 us", "p99 us", "diff", "pack",
                                "commit", "excl", "late/early", f"snaps/{res['config']['steps']}"]))

    lines += ["", f"3. bytes over {res['config']['steps']} steps (full rewrite every step: "
              f"{res['bytes']['full_rewrite_bytes'] / 1e6:.1f} MB)"]
    rows = []
    for cr, v in res["bytes"]["by_ratio"].items():
        rows.append([cr, f"{v['sum_deltas'] / 1e6:.3f}", f"{v['written_checkpoint'] / 1e6:.3f}",
                     str(v["snapshots"]), f"{v['ratio_written_vs_deltas']:.2f}x",
                     f"{v['event_bytes'] / 1e6:.3f}", f"{v['aof_bytes'] / 1e6:.3f}",
                     f"{v['ratio_aof_vs_deltas']:.2f}x", f"{v['ratio_full_rewrite_vs_deltas']:.0f}x"])
    lines.append(U.table(rows, ["compact", "deltas MB", "written MB", "snaps", "written/deltas",
                                "events MB", "AOF MB", "AOF/deltas", "full/deltas"]))

    if "actor" in res:
        a = res["actor"]
        lines += ["", f"4. Ray actor (async, num_cpus=0), {a['calls']} sequential calls per "
                  f"mode, interleaved; {a['actor_snapshots']} snapshots in the checkpoint mode"]
        rows = []
        for mname, v in a["modes"].items():
            rows.append([mname, f"{v['call']['p50_us']:.0f}", f"{v['call']['p99_us']:.0f}",
                         f"{v['work_in_actor']['p50_us']:.0f}", f"{v['work_in_actor']['p99_us']:.0f}"])
        lines.append(U.table(rows, ["mode", "call p50 us", "call p99 us", "work p50 us",
                                    "work p99 us"]))
        lines.append(f"   checkpoint/diff p50 {a['ratio_p50']:.2f}x, p99 {a['ratio_p99']:.2f}x; "
                     f"checkpoint/bare p50 {a['ratio_p50_vs_bare']:.2f}x")
        e = a["e2e"]
        lines.append(f"   research agent, run_inline, {e['runs']} runs each: MemoryStore "
                     f"{e['inline_memory']['steps_per_s']:.0f} steps/s "
                     f"({e['inline_memory']['run_ms_p50']:.1f} ms/run), RedisStore "
                     f"{e['inline_redis']['steps_per_s']:.0f} steps/s "
                     f"({e['inline_redis']['run_ms_p50']:.1f} ms/run): "
                     f"{e['inline_redis_vs_memory_time']:.2f}x the time")
        if "run_actor" in e:
            ra = e["run_actor"]
            lines.append(f"   research agent on Ray (pool of hosts + executor) + RedisStore, "
                         f"{ra['runs']} runs: {ra['steps_per_s_excl_creation']:.0f} steps/s "
                         f"({ra['run_ms_p50']:.1f} ms/run, {ra['steps'] // ra['runs']} steps), "
                         f"{ra['steps_per_s_incl_creation']:.0f} steps/s with the pool's "
                         f"creation ({ra['pool_ready_ms']:.0f} ms)")

    rs = res["resume"]
    lines += ["", f"5. resume vs decode, {rs['repeats']} repeats"]
    rows = []
    for cr, v in rs["by_ratio"].items():
        ph = v["phases_p50_us"]
        rows.append([cr, str(v["messages"]), f"{v['snapshot_step']}+{v['journal_len']}",
                     f"{v['load_state']['p50_us'] / 1e3:.2f}", f"{v['decode_snapshot']['p50_us'] / 1e3:.2f}",
                     f"{v['ratio_p50']:.2f}x", f"{ph['store.load'] / 1e3:.2f}",
                     f"{ph['unpack+fold'] / 1e3:.2f}", f"{ph['validate'] / 1e3:.2f}"])
    lines.append(U.table(rows, ["compact", "msgs", "snap+journal", "load_state ms", "decode ms",
                                "ratio", "load ms", "unpack+fold ms", "validate ms"]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.checkpoint", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=None, help="run length (default 1000; quick 60)")
    ap.add_argument("--repeats", type=int, default=None, help="repeats (default 5; quick 2)")
    ap.add_argument("--quick", action="store_true", help="small sizes: a smoke test")
    ap.add_argument("--appendfsync", choices=("everysec", "always"), default="everysec",
                    help="AOF fsync policy of the main server (default everysec)")
    ap.add_argument("--compare-fsync", action=argparse.BooleanOptionalAction, default=True,
                    help="also measure 1. on a second server with the other fsync policy")
    ap.add_argument("--ray", action=argparse.BooleanOptionalAction, default=True,
                    help="run 4. (Ray actor and end-to-end); --no-ray skips it")
    ap.add_argument("--json", metavar="PATH", help="write all results as JSON")
    args = ap.parse_args(argv)
    steps = args.steps or (60 if args.quick else 1000)
    repeats = args.repeats or (2 if args.quick else 5)
    if steps < 20:
        ap.error("--steps must be at least 20")
    window = min(20, steps // 5)
    calls = 100 if args.quick else steps
    e2e_runs, actor_runs = (3, 1) if args.quick else (20, 5)
    pairs = max(200, steps * repeats // (5 if args.quick else 1))

    root = Path(tempfile.mkdtemp(prefix="undying-bench-"))
    texts = corpus_texts(steps + 1)
    res: dict[str, Any] = {
        "command": "python -m bench.checkpoint " + " ".join(map(shlex.quote, sys.argv[1:]
                                                                  if argv is None else argv)),
        "config": {"steps": steps, "repeats": repeats, "quick": args.quick, "window": window,
                   "appendfsync": args.appendfsync, "ray_calls": calls, "commit_pairs": pairs},
        "targets": TARGETS,
    }
    t_start = time.perf_counter()
    try:
        with U.redis_server(root, args.appendfsync) as server:
            r = redis.Redis.from_url(server.url)
            res["machine"] = U.machine_info(r.info("server")["redis_version"], server.binary)
            r.close()
            print(f"redis-server on {server.url} (pid {server.proc.pid if server.proc else '?'},"
                  f" appendfsync {args.appendfsync}); {res['command']}", flush=True)
            res["commit"] = bench_commit(server.url, steps, pairs, texts)
            pid = server.proc.pid if server.proc else 0
            res["commit_placement"] = {}
            for placement in ("same", "cross"):
                with pinned(pid, placement) as got:
                    res["commit_placement"][got] = bench_commit(
                        server.url, steps, max(200, pairs // 2), texts)
            print("  1. commit vs XADD done", flush=True)
            if args.compare_fsync:
                other = "always" if args.appendfsync == "everysec" else "everysec"
                with U.redis_server(root, other) as s2:
                    res["commit_other_fsync"] = {
                        other: bench_commit(s2.url, steps, max(200, pairs // 5), texts)}
                print(f"  1. again with appendfsync {other} done", flush=True)
            res["growth"] = bench_growth(server.url, steps, repeats, window, texts)
            print("  2. growth done", flush=True)
            res["bytes"], runs = bench_bytes(server.url, steps, texts)
            print("  3. bytes done", flush=True)
            res["resume"] = bench_resume(server.url, runs, max(5, repeats * 2))
            print("  5. resume done", flush=True)
            if args.ray:
                with U.local_ray(root):
                    res["actor"] = bench_actor(server.url, calls, e2e_runs, actor_runs)
                print("  4. Ray actor and end-to-end done", flush=True)
    finally:
        U.rmtree(root)
    res["wall_s"] = time.perf_counter() - t_start
    res["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    print()
    print(report(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2, default=str))
        print(f"\nresults written to {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
