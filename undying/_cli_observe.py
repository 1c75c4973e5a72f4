"""`undying watch`, `history`, `fork`, `gc` and `exporter`: looking at runs from the shell.

    undying watch RUN [--tree] [--cursor FILE]   steps live; with --cursor, a watch that is
                                                 stopped and started again goes on from the
                                                 last event it printed (no gap, no duplicate)
    undying history RUN [--json]                 every step: time, kind, status, duration, size,
                                                 and what it did (retries and back-offs too)
    undying fork RUN --at STEP                   a new run from the state after STEP
    undying gc [--older-than 7d] [--dry-run]     remove ended runs idle for that long
    undying exporter --port 9464                 the Prometheus exporter of the whole cluster
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def duration(text: str) -> float:
    """'90', '90s', '15m', '12h', '7d', '2w' -> seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (say 90s, 15m, 12h or 7d)")
    return float(m.group(1)) * _UNITS[m.group(2) or "s"]


def _client() -> Any:
    from undying import connect

    return connect()


def _when(ms: int) -> str:
    return time.strftime("%H:%M:%S", time.localtime(ms / 1000)) + f".{ms % 1000:03d}"


def _name(run_id: str, root: str) -> tuple[int, str]:
    if run_id == root or not run_id.startswith(root + "."):
        return 0, run_id
    rest = run_id[len(root) + 1:]
    return rest.count(".") + 1, rest.rsplit(".", 1)[-1]


# -- watch ------------------------------------------------------------------------------------


def _load_cursor(path: Path | None) -> dict[str, str]:
    if path is None or not path.exists():
        return {}
    data = json.loads(path.read_text() or "{}")
    return {str(k): str(v) for k, v in data.items()}


def _save_cursor(path: Path, cursors: dict[str, str]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(cursors, sort_keys=True))
    os.replace(tmp, path)  # whole or not at all: a watch killed mid-write keeps the old one


@contextlib.contextmanager
def _no_sigint() -> Iterator[None]:
    """Hold SIGINT (Ctrl-C) back until the block is done (main thread, POSIX)."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(
            signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def cmd_watch(args: argparse.Namespace) -> int:
    ud = _client()
    cursor_file = Path(args.cursor) if args.cursor else None
    after = _load_cursor(cursor_file)
    if args.after:
        after[args.run] = args.after
    cursors = dict(after)
    root_status = ""
    for rid, eid, ev in ud.watch_tree(args.run, after=after, timeout=args.timeout,
                                      tree=args.tree):
        cursors[rid] = eid
        if rid == args.run and ev.kind != "restart":
            root_status = ev.status
        if args.json:
            line = json.dumps({"id": eid, "run_id": rid, **ev.model_dump(mode="json")})
        else:
            depth, name = _name(rid, args.run)
            label = f"{'  ' * depth}{name}" if args.tree else ""
            size = ev.snapshot_bytes or ev.delta_bytes
            line = (f"{eid:<16} {label + ' ' if label else ''}step {ev.step:4d} {ev.kind:<13} "
                    f"{ev.status:<9} {size:6d} B  {ev.summary[:80]}")
        # an event is shown and its cursor saved together: a Ctrl-C between the two would
        # show it again after a reconnect (SIGINT waits until both are done)
        with _no_sigint():
            print(line, flush=True)
            if cursor_file is not None:
                _save_cursor(cursor_file, cursors)
    status = root_status or ud.info(args.run).status
    return 0 if status == "finished" else 2


# -- history ----------------------------------------------------------------------------------


def cmd_history(args: argparse.Namespace) -> int:
    ud = _client()
    rows = ud.history_entries(args.run)
    if args.json:
        print(json.dumps([{"id": eid, **e.model_dump(mode="json")} for eid, e in rows]))
        return 0
    info = ud.info(args.run)
    print(f"run {info.run_id} ({info.agent}): {info.status} at step {info.step}, epoch "
          f"{info.epoch}" + (f", parent {info.parent}" if info.parent else ""))
    print(f"{'time':<12} {'step':>4}  {'kind':<13} {'status':<9} {'epoch':>5} {'duration':>10} "
          f"{'bytes':>7}  summary")
    restarts = approvals = 0
    total = 0
    for _eid, e in rows:
        size = e.snapshot_bytes or e.delta_bytes
        total += size
        restarts += e.kind == "restart"
        approvals += e.kind == "approval"
        mark = "S" if e.snapshot_bytes else " "
        row = (f"{_when(e.at_ms):<12} {e.step:4d}  {e.kind:<13} {e.status:<9} {e.epoch:5d} "
               f"{e.duration_ms:7.1f} ms {size:6d}{mark}  ")
        print(row + e.summary[:70])
        # the rest of a long summary (a model call's retries and waits) under the first part
        for i in range(70, len(e.summary), 70):
            print(" " * len(row) + e.summary[i:i + 70])
    if rows:
        wall = (rows[-1][1].at_ms - rows[0][1].at_ms) / 1000
        steps = sum(1 for _, e in rows if e.kind not in ("restart", "fork"))
        print(f"{steps} steps, {restarts} restarts, {approvals} approval decisions, "
              f"{total} checkpoint bytes (S: snapshot), {wall:.1f} s from first to last event")
    return 0


# -- fork -------------------------------------------------------------------------------------


def cmd_fork(args: argparse.Namespace) -> int:
    ud = _client()
    h = ud.fork(args.run, args.at, new_id=args.run_id, start=not args.no_wait)
    print(f"run {h.run_id} forked from {args.run} at step {args.at}")
    if args.no_wait:
        return 0
    for _rid, _eid, ev in ud.watch_tree(h.run_id, timeout=args.timeout, tree=False):
        print(f"  step {ev.step:3d} {ev.kind:<12} {ev.summary[:70]}")
    res = ud.wait(h.run_id)
    print(res.answer if res.status == "finished" else f"{res.status}: {res.error}")
    return 0 if res.status == "finished" else 2


# -- gc ---------------------------------------------------------------------------------------


def cmd_gc(args: argparse.Namespace) -> int:
    ud = _client()
    report = ud.gc(args.older_than, dry_run=args.dry_run)
    if args.json:
        print(json.dumps({"dry_run": report.dry_run, "runs_removed": report.runs_removed,
                          "removed": [r.__dict__ for r in report.removed],
                          "kept": [{"root": r, "why": w} for r, w in report.kept]}))
        return 0
    verb = "would remove" if args.dry_run else "removed"
    for r in report.removed:
        print(f"{verb} {r.root} ({r.status}, {r.runs} run{'s' if r.runs != 1 else ''}, last step "
              f"{r.age_s / 86400:.1f} days ago)")
    for root, why in report.kept:
        print(f"kept {root}: {why}")
    print(f"{verb} {report.runs_removed} runs in {len(report.removed)} trees; "
          f"{len(report.kept)} trees kept (something in them has not ended)")
    return 0


# -- exporter ---------------------------------------------------------------------------------


def cmd_exporter(args: argparse.Namespace) -> int:
    from undying.cluster import Settings, redis_url
    from undying.dashboards.exporter import render, serve

    url = redis_url(Settings.from_env())
    if args.once:
        sys.stdout.write(render(url).decode())
        return 0
    serve(url, args.port, args.addr)
    print(f"undying exporter: http://{args.addr}:{args.port}/metrics (Redis "
          f"{url.split('@')[-1]}); Ctrl-C to stop", flush=True)
    while True:
        time.sleep(3600)


def add_parsers(sub: Any) -> None:
    w = sub.add_parser("watch", help="a run's steps live (with --tree, its sub-agents' too)")
    w.add_argument("run")
    w.add_argument("--tree", action="store_true", help="follow every sub-agent below the run")
    w.add_argument("--after", help="go on after this event id (as printed)")
    w.add_argument("--cursor", metavar="FILE",
                   help="keep the last event seen per run in FILE; run the same command again "
                        "to go on from there")
    w.add_argument("--json", action="store_true", help="one JSON object per event")
    w.add_argument("--timeout", type=float, default=None)
    w.set_defaults(fn=cmd_watch)

    f = sub.add_parser("fork", help="a new run from the state after a step of another")
    f.add_argument("run")
    f.add_argument("--at", type=int, required=True, metavar="STEP")
    f.add_argument("--run-id", help="the new run's id (default: fork-<random>)")
    f.add_argument("--no-wait", action="store_true",
                   help="only store the fork, queued for the cluster's hosts")
    f.add_argument("--timeout", type=float, default=600.0)
    f.set_defaults(fn=cmd_fork)

    g = sub.add_parser("gc", help="remove ended runs (with their sub-agents) idle for long")
    g.add_argument("--older-than", type=duration, default=duration("7d"), metavar="DURATION",
                   help="90s, 15m, 12h, 7d (default 7d)")
    g.add_argument("--dry-run", action="store_true")
    g.add_argument("--json", action="store_true")
    g.set_defaults(fn=cmd_gc)

    e = sub.add_parser("exporter", help="serve the cluster's metrics for Prometheus")
    e.add_argument("--port", type=int, default=9464)
    e.add_argument("--addr", default="127.0.0.1", help="0.0.0.0 to be scraped from elsewhere")
    e.add_argument("--once", action="store_true", help="print one scrape and exit")
    e.set_defaults(fn=cmd_exporter)
