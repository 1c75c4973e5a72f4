"""undying side by side with the systems a user would pick instead, on one agent workload.

    python -m bench.peers                      # N = 10, 100, 1000 (12-17 min on 2 cores)
    python -m bench.peers --quick              # N = 10, 100: a smoke run (~2 min)
    python -m bench.peers --json out.json      # everything, as JSON

Needs the `bench` extra (`pip install -e ".[bench]"`: the peers at pinned versions) and a
PostgreSQL server (``UNDYING_BENCH_PG``, default ``postgresql://postgres@127.0.0.1:5432/
postgres``; the bench creates its own databases ``undying_bench_<pid>*`` and drops them).
It starts its own redis-servers (AOF on, one with ``appendfsync always``, one with
``everysec``) and its own local Ray, and stops all of it by pid at the end.

The workload (bench/_peers_workload.py): a scripted agent of N steps, each step one model
turn of ~1 KB that calls one tool and that tool's ~1 KB result, then a final answer;
the same texts and the same functions in every system. The systems, each with its
recommended durable store: undying (on Ray, public API; and its engine with no Ray),
LangGraph with PostgresSaver (and its Redis checkpointer, attempted), DBOS Transact on
PostgreSQL, a plain Ray actor with no checkpoint (the floor for Ray overhead) and one
RPUSH per message on the same Redis (the floor for durability).

Per system and N: time per step (from the run's first model turn until it is stored in
full, / N, p50 over the runs; the p50 interval between model turns is printed beside it),
bytes the store wrote (Redis: AOF growth; PostgreSQL: WAL
generated), storage held at the end (Redis: MEMORY USAGE of the run's keys; PostgreSQL:
the system's tables with indexes and TOAST), and resume after a SIGKILL at step N/2: from
the start of the resume (a fresh process, after its imports; for undying on Ray, the kill
itself, since undying brings the run back by itself) to the first newly committed step
and to the end. Two comparisons: at equal durability (an fsync per commit: Redis ``appendfsync
always``, PostgreSQL's default ``synchronous_commit=on``, LangGraph ``durability="sync"``)
and at each system's own default (undying ``everysec``, LangGraph ``durability="async"``;
DBOS and the plain actor have one setting). Ratios are peer / undying (Ray) at the same
setting: above 1, undying is faster or smaller. See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import _util as U

ROOT = U.ROOT
PEER_PACKAGES = ("langgraph", "langgraph-checkpoint", "langgraph-checkpoint-postgres",
                 "langgraph-checkpoint-redis", "langchain-core", "psycopg", "psycopg-binary",
                 "psycopg-pool", "dbos", "SQLAlchemy")
REPLY = "@@peers "
TARGETS = {"step_vs_peers": 3.0, "bytes_vs_langgraph": 10.0, "bytes_vs_dbos": 1.2,
           "step_vs_raw_redis": 1.5, "resume_vs_peers": 3.0}


@dataclass(frozen=True)
class Config:
    id: str
    system: str
    label: str
    sections: tuple[str, ...]  # "equal" (an fsync per commit) and/or "default"
    # redis:<server> (a server of its own per name, appendfsync = the name's last word),
    # pg (LangGraph's database), pg-dbos (DBOS's), none
    store: str
    variant: dict[str, Any] = field(default_factory=dict)
    resumable: bool = True


CONFIGS = (
    # undying on Ray has servers of its own: its supervisor, hosts and executors work on
    # whatever their Redis holds, and must not pick up the runs of the inline engine
    Config("undying/always", "undying", "undying (Ray), AOF always", ("equal",),
           "redis:ray-always"),
    Config("undying/everysec", "undying", "undying (Ray), AOF everysec", ("default",),
           "redis:ray-everysec"),
    Config("undying-inline/always", "undying-inline", "undying engine, no Ray, AOF always",
           ("equal",), "redis:always"),
    Config("undying-inline/everysec", "undying-inline", "undying engine, no Ray, AOF everysec",
           ("default",), "redis:everysec"),
    Config("langgraph-pg/sync", "langgraph-pg", "LangGraph + PostgresSaver, durability=sync",
           ("equal",), "pg", {"durability": "sync"}),
    Config("langgraph-pg/async", "langgraph-pg", "LangGraph + PostgresSaver, durability=async",
           ("default",), "pg", {"durability": "async"}),
    Config("dbos", "dbos", "DBOS Transact, PostgreSQL", ("equal", "default"), "pg-dbos"),
    Config("ray-plain", "ray-plain", "plain Ray actor, no checkpoint", ("equal", "default"),
           "none", resumable=False),
    Config("raw-redis/always", "raw-redis", "raw Redis RPUSH, AOF always", ("equal",),
           "redis:always"),
    Config("raw-redis/everysec", "raw-redis", "raw Redis RPUSH, AOF everysec", ("default",),
           "redis:everysec"),
)
WORKER_SYSTEMS = ("undying-inline", "langgraph-pg", "dbos", "raw-redis")
# at N >= 1000, a config whose first run took longer than this runs once (LangGraph writes
# its whole state per step: ~90 s a run), and resume trials are of the equal-durability
# configs only: the full command stays within ~15 minutes
SLOW_RUN_S = 30.0


# -- worker processes ---------------------------------------------------------------------------


class WorkerDied(RuntimeError):
    def __init__(self, system: str, returncode: int | None, tail: str) -> None:
        super().__init__(f"{system} worker exited with {returncode}: {tail[-800:]}")
        self.returncode = returncode


class Worker:
    """A process that runs one system: `python -m bench.peers --serve SYSTEM`."""

    def __init__(self, system: str, root: Path, env: dict[str, str]) -> None:
        self.system = system
        self.root = root
        self.log = root / f"worker-{system}-{uuid.uuid4().hex[:6]}.log"
        self.logf = self.log.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.peers", "--serve", system], cwd=ROOT, env=env,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.logf)
        self.buf = b""
        self.call({"op": "ping"}, timeout=120)

    def call(self, op: dict[str, Any], timeout: float) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        try:
            self.proc.stdin.write((json.dumps(op) + "\n").encode())
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while True:
            while b"\n" in self.buf:
                line, self.buf = self.buf.split(b"\n", 1)
                text = line.decode(errors="replace")
                if text.startswith(REPLY):
                    reply: dict[str, Any] = json.loads(text[len(REPLY):])
                    if "error" in reply:
                        raise RuntimeError(f"{self.system}: {reply['error']}")
                    return reply
            left = deadline - time.monotonic()
            if left <= 0:
                self.kill()
                raise TimeoutError(f"{self.system}: no reply to {op['op']} in {timeout:.0f} s")
            ready, _, _ = select.select([fd], [], [], min(left, 1.0))
            if ready:
                chunk = os.read(fd, 1 << 16)
                if chunk:
                    self.buf += chunk
                    continue
            if self.proc.poll() is not None:
                raise WorkerDied(self.system, self.proc.returncode, self.tail())

    def tail(self) -> str:
        self.logf.flush()
        try:
            return self.log.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def wait(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.call({"op": "quit"}, timeout=30)
            except Exception:
                pass
            if self.wait(10) is None:
                self.kill()
        self.logf.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()  # by pid
            self.proc.wait()
        if self.system == "ray":  # its Ray's processes name our temp dir
            U._kill_leftovers(str(self.root / "ray"))

    def alive(self) -> bool:
        return self.proc.poll() is None


def serve(system: str) -> int:
    """The worker side: JSON ops on stdin, one reply line each on the real stdout."""
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # libraries that print go to the log, not into the replies
    from . import _peers_systems as S
    from . import _peers_workload as W

    sysobj: Any
    if system == "ray":
        from ._peers_ray import RaySystems

        sysobj = RaySystems(Path(os.environ[W.BENCH_DIR_ENV]))
    else:
        S.preload(system)
        sysobj = S.SYSTEMS[system]()

    def reply(obj: dict[str, Any]) -> None:
        out.write(REPLY + json.dumps(obj, default=str) + "\n")
        out.flush()

    try:
        for line in sys.stdin:  # EOF (the bench is gone) ends the loop too
            op = json.loads(line)
            if op["op"] == "quit":
                break
            _serve_op(system, sysobj, op, reply)
    finally:
        sysobj.close()
    reply({"bye": True})
    return 0


def _serve_op(system: str, sysobj: Any, op: dict[str, Any], reply: Any) -> None:
    from . import _peers_workload as W

    try:
        if op["op"] == "ping":
            reply({"pid": os.getpid()})
        elif op["op"] == "run" and system == "ray":
            reply(sysobj.run(op["system"], op["n"], op["key"], op["variant"], op["timeout"]))
        elif op["op"] == "crash_resume":
            reply(sysobj.crash_and_resume(op["n"], op["key"], op["variant"], op["timeout"]))
        elif op["op"] in ("run", "resume"):
            if op["op"] == "run":
                res = sysobj.run(op["n"], op["key"], op["variant"])
            else:
                res = sysobj.resume(op["key"], op["variant"])
            reply({**res, "marks": W.MARKS.pop(op["key"], [])})
        elif op["op"] == "try_redis":
            reply(sysobj.try_redis(op["redis_url"]))
        else:
            reply({"error": f"unknown op {op['op']!r}"})
    except Exception as exc:
        traceback.print_exc()
        reply({"error": f"{type(exc).__name__}: {exc}"})


# -- stores: what a run wrote and what it holds ---------------------------------------------------


class Stores:
    def __init__(self, root: Path) -> None:
        import contextlib

        self.stack = contextlib.ExitStack()
        self.redis: dict[str, Any] = {}
        self.clients: dict[str, Any] = {}
        self.root = root
        self.dbs: list[str] = []
        self.pg: dict[str, str] = {}
        self.wal: Any = None

    def start(self, redis_names: set[str], pg: bool) -> None:
        import redis

        from . import _peers_pg as P

        for name in sorted(redis_names | {"always"}):
            pol = name.split("-")[-1]
            server = self.stack.enter_context(U.redis_server(self.root / name, pol))
            self.redis[name] = server
            self.clients[name] = redis.Redis.from_url(server.url)
        if not pg:
            return
        for role, suffix in (("langgraph", "lg"), ("dbos", "dbos"), ("dbos-trials", "dbost")):
            name = P.bench_db_name(suffix)
            self.pg[role] = P.create_db(name)
            self.dbs.append(name)
        self.wal = P.WalProbe(tuple(self.dbs))

    def close(self) -> None:
        from . import _peers_pg as P

        if self.wal is not None:
            self.wal.close()
        for c in self.clients.values():
            c.close()
        for name in self.dbs:
            try:
                P.drop_db(name)
            except Exception as exc:
                print(f"could not drop database {name}: {exc}", file=sys.stderr)
        self.stack.close()

    def url(self, pol: str) -> str:
        return str(self.redis[pol].url)

    # a probe around one run: (kind, start state)
    def probe_start(self, cfg: Config) -> Any:
        if cfg.store.startswith("redis:"):
            pol = cfg.store.split(":")[1]
            return ("redis", pol, int(self.clients[pol].info("persistence")["aof_current_size"]))
        if cfg.store.startswith("pg"):
            self.wal.start()
            return ("pg",)
        return ("none",)

    def probe_stop(self, probe: Any) -> dict[str, Any]:
        if probe[0] == "redis":
            c = self.clients[probe[1]]
            return {"written": int(c.info("persistence")["aof_current_size"]) - probe[2]}
        if probe[0] == "pg":
            w = self.wal.stop()
            return {"written": w["wal_bytes"], "others_xacts": w["others_xacts"]}
        return {"written": 0}

    def held_and_payload(self, cfg: Config, key: str, history: list[Any] | None) -> dict[str, int]:
        from . import _peers_pg as P
        from ._peers_systems import raw_key

        if cfg.store.startswith("redis:"):
            c = self.clients[cfg.store.split(":")[1]]
            held = sum(int(c.memory_usage(k, samples=0) or 0)
                       for k in c.scan_iter(match=f"*{key}*", count=1000))
            if cfg.system == "raw-redis":
                payload = sum(len(x) for x in c.lrange(raw_key(key), 0, -1))
            else:
                payload = sum(e.delta_bytes + e.snapshot_bytes for e in history or [])
            return {"held": held, "payload": payload}
        if cfg.store == "pg":
            url = self.pg["langgraph"]
            held = P.table_bytes(url, "public", ("checkpoints", "checkpoint_blobs",
                                                 "checkpoint_writes"))
            payload = (P.query_int(url, "SELECT sum(octet_length(checkpoint::text) + "
                                   "octet_length(metadata::text)) FROM checkpoints "
                                   "WHERE thread_id = %s", (key,))
                       + P.query_int(url, "SELECT sum(octet_length(blob)) FROM checkpoint_blobs "
                                     "WHERE thread_id = %s", (key,))
                       + P.query_int(url, "SELECT sum(octet_length(blob)) FROM checkpoint_writes "
                                     "WHERE thread_id = %s", (key,)))
            return {"held": held, "payload": payload}
        if cfg.store == "pg-dbos":
            url = self.pg["dbos"]
            held = P.table_bytes(url, "dbos")
            payload = (P.query_int(url, "SELECT sum(octet_length(output)) FROM "
                                   "dbos.operation_outputs WHERE workflow_uuid = %s", (key,))
                       + P.query_int(url, "SELECT sum(coalesce(octet_length(inputs), 0) + "
                                     "coalesce(octet_length(output), 0)) FROM "
                                     "dbos.workflow_status WHERE workflow_uuid = %s", (key,)))
            return {"held": held, "payload": payload}
        return {"held": 0, "payload": 0}

    def settle(self) -> None:
        """After a run that wrote a lot (LangGraph at N = 1000 writes ~1 GB), flush it to
        disk before the next run, so that its write-back does not slow the next one's fsyncs."""
        from . import _peers_pg as P

        P.execute(P.admin_url(), "CHECKPOINT")
        os.sync()

    def baseline(self, cfg: Config) -> int:
        from . import _peers_pg as P

        if cfg.store == "pg":
            return P.table_bytes(self.pg["langgraph"], "public",
                                 ("checkpoints", "checkpoint_blobs", "checkpoint_writes"))
        if cfg.store == "pg-dbos":
            return P.table_bytes(self.pg["dbos"], "dbos")
        return 0

    def clean(self, cfg: Config, key: str) -> None:
        """Drop what a run left, so the next run starts from the same empty store."""
        from . import _peers_pg as P

        if cfg.store.startswith("redis:"):
            pol = cfg.store.split(":")[1]
            if cfg.system in ("undying", "undying-inline"):
                from undying.persistence import RedisStore

                s = RedisStore(self.url(pol))
                try:
                    s.delete(key)
                except Exception:
                    pass
                s.close()
            c = self.clients[pol]
            keys = list(c.scan_iter(match=f"*{key}*", count=1000))
            if keys:
                c.delete(*keys)
        elif cfg.store == "pg":
            P.execute(self.pg["langgraph"],
                      "TRUNCATE checkpoints, checkpoint_blobs, checkpoint_writes")
        elif cfg.store == "pg-dbos":
            url = self.pg["dbos"]
            for table in ("operation_outputs", "workflow_status", "workflow_input",
                          "workflow_output", "workflow_events", "workflow_events_history",
                          "notifications", "streams"):
                P.execute(url, f"DO $$ BEGIN IF to_regclass('dbos.{table}') IS NOT NULL THEN "
                          f"EXECUTE 'TRUNCATE dbos.{table} CASCADE'; END IF; END $$")


# -- one run, one trial ---------------------------------------------------------------------------


class Bench:
    def __init__(self, root: Path, stores: Stores, timeout: float) -> None:
        self.root = root
        self.stores = stores
        self.timeout = timeout
        self.env = dict(os.environ)
        self.workers: dict[str, Worker] = {}
        self.failures: list[str] = []

    def variant(self, cfg: Config, n: int = 0, trial: bool = False) -> dict[str, Any]:
        v = dict(cfg.variant, n=n)
        if cfg.store.startswith("redis:"):
            pol = cfg.store.split(":")[1]
            v["redis_url"] = self.stores.url(pol)
            v["namespace"] = f"undying-bench-peers-{pol}"
        elif cfg.store == "pg":
            v["pg_url"] = self.stores.pg["langgraph"]
        elif cfg.store == "pg-dbos":
            v["pg_url"] = self.stores.pg["dbos-trials" if trial else "dbos"]
        return v

    def worker(self, system: str) -> Worker:
        """The long-lived worker of ``system`` (a new one if the last one died or hung)."""
        w = self.workers.get(system)
        if w is None or not w.alive():
            if w is not None:
                w.kill()
            w = self.workers[system] = Worker(system, self.root, self.env)
        return w

    def _execute(self, cfg: Config, n: int, key: str, timeout: float) -> dict[str, Any]:
        if cfg.system in ("undying", "ray-plain"):
            return self.worker("ray").call(
                {"op": "run", "system": cfg.system, "n": n, "key": key,
                 "variant": self.variant(cfg, n), "timeout": timeout}, timeout + 60)
        return self.worker(cfg.system).call(
            {"op": "run", "n": n, "key": key, "variant": self.variant(cfg, n)}, timeout)

    def measure(self, cfg: Config, n: int, key: str, timeout: float | None = None) -> dict[str, Any]:
        base = self.stores.baseline(cfg)
        probe = self.stores.probe_start(cfg)
        res = self._execute(cfg, n, key, timeout or self.timeout)
        wrote = self.stores.probe_stop(probe)
        history = None
        if cfg.system in ("undying", "undying-inline"):
            from undying import Settings, Undying

            ud = Undying(Settings(redis_url=self.variant(cfg)["redis_url"]), supervise=False)
            history = ud.history(key)
            ud.close()
        hp = self.stores.held_and_payload(cfg, key, history)
        self.stores.clean(cfg, key)
        if wrote["written"] > 50e6:
            self.stores.settle()
        marks = res.get("marks") or []
        ok = res.get("result") == f"Done: {n} lookups."
        # from the first model turn to the run being stored in full: start-up (actor
        # creation, graph set-up) is out, a backlog of writes flushed at the end is in
        first = marks[0] if marks else res["t0"]
        out = {"n": n, "key": key, "ok": ok, "status": res.get("status"),
               "wall_s": res["t_end"] - res["t0"], "step_s": (res["t_end"] - first) / n,
               "intervals_s": U_diff(marks),
               "marks_complete": len(marks) == n + 1, "written": wrote["written"],
               "others_xacts": wrote.get("others_xacts", 0), "held": hp["held"] - base,
               "payload": hp["payload"]}
        if "t_started" in res:
            out["start_s"] = res["t_started"] - res["t0"]
        if not ok:
            self.failures.append(f"{cfg.id} n={n}: status {res.get('status')}, result "
                                 f"{str(res.get('result'))[:80]!r}, error {res.get('run_error')}")
        return out

    def trial(self, cfg: Config, n: int, key: str) -> dict[str, Any]:
        """Crash at step n/2 (SIGKILL), then resume; time the resume."""
        v = self.variant(cfg, n, trial=True)
        if cfg.system == "undying":
            res = self.worker("ray").call({"op": "crash_resume", "n": n, "key": key, "variant": v,
                                           "timeout": self.timeout}, self.timeout + 60)
        else:
            w = Worker(cfg.system, self.root, self.env)
            try:
                w.call({"op": "run", "n": n, "key": key, "variant": v}, self.timeout)
                raise RuntimeError(f"{cfg.id}: the crash run of {key} did not crash")
            except WorkerDied as died:
                if died.returncode != -9:
                    raise
            finally:
                w.kill()
            w = Worker(cfg.system, self.root, self.env)
            try:
                res = w.call({"op": "resume", "key": key, "variant": v}, self.timeout)
            finally:
                w.close()
        marks = res.get("marks") or []
        ok = res.get("result") == f"Done: {n} lookups."
        if not ok:
            self.failures.append(f"{cfg.id} resume n={n}: status {res.get('status')}, result "
                                 f"{str(res.get('result'))[:80]!r}, error {res.get('run_error')}")
        if cfg.store == "pg-dbos":
            pass  # the trials' database is separate; nothing to clean per key
        elif cfg.store == "pg":
            from . import _peers_pg as P

            for table in ("checkpoint_writes", "checkpoint_blobs", "checkpoints"):
                P.execute(self.stores.pg["langgraph"],
                          f"DELETE FROM {table} WHERE thread_id = %s", (key,))
        else:
            self.stores.clean(cfg, key)
        return {"n": n, "key": key, "ok": ok,
                "first_s": (marks[0] - res["t0"]) if marks else float("nan"),
                "end_s": res["t_end"] - res["t0"], "new_turns": len(marks)}

    def close(self) -> None:
        for w in self.workers.values():
            w.close()
            w.kill()


def U_diff(marks: list[float]) -> list[float]:
    return [b - a for a, b in zip(marks, marks[1:], strict=False)]


# -- the plan ----------------------------------------------------------------------------------


def plan(ns: list[int], quick: bool) -> dict[str, dict[int, int]]:
    runs = {10: 5, 100: 3, 1000: 3} if not quick else {10: 3, 100: 2}
    trials = {10: 2, 100: 2, 1000: 1} if not quick else {10: 1, 100: 1}
    return {"runs": {n: runs.get(n, 2) for n in ns}, "trials": {n: trials.get(n, 1) for n in ns}}


def undying_version() -> str:
    """The commit measured, and whether undying's own code had uncommitted changes."""
    env = dict(os.environ, GIT_OPTIONAL_LOCKS="0")  # read-only: never refresh the index
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=10).stdout.strip()
        st = subprocess.run(["git", "--no-optional-locks", "status", "--porcelain", "--",
                             "actors", "supervisor", "persistence", "cluster", "undying"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git)"
    if not rev:
        return "unknown (not a git checkout)"
    changed = [line for line in st.splitlines() if line.strip()]
    return f"{rev}" + (f" + uncommitted changes to {len(changed)} files of undying's code"
                       if changed else " (clean)")


def rotate(xs: list[Any], k: int) -> list[Any]:
    k %= max(1, len(xs))
    return xs[k:] + xs[:k]


# -- the report ---------------------------------------------------------------------------------


def summarize(res: dict[str, Any]) -> dict[str, dict[str, dict[str, float]]]:
    out: dict[str, dict[str, dict[str, float]]] = {}
    for cid, by_n in res["runs"].items():
        for n, runs in by_n.items():
            good = [r for r in runs if r["ok"]]
            iv = [x for r in good for x in r["intervals_s"]]
            trials = [t for t in res["trials"].get(cid, {}).get(n, []) if t["ok"]]
            out.setdefault(cid, {})[n] = {
                "runs": len(good),
                "step_ms": U.p50([r["step_s"] for r in good]) * 1e3,
                "turn_ms": U.p50(iv) * 1e3,
                "written": U.p50([r["written"] for r in good]),
                "payload": U.p50([r["payload"] for r in good]),
                "held": U.p50([r["held"] for r in good]),
                "resume_first_s": U.p50([t["first_s"] for t in trials]),
                "resume_end_s": U.p50([t["end_s"] for t in trials]),
                "trials": len(trials),
                "others_xacts": sum(r.get("others_xacts", 0) for r in good),
            }
    return out


def _mb(x: float) -> str:
    if x != x:
        return "-"
    if x == 0:
        return "0"
    return f"{x / 1e6:.3f}" if x < 10e6 else f"{x / 1e6:.0f}"


def _ratio(peer: float, ref: float) -> str:
    if peer != peer or ref != ref or ref == 0:
        return "-"
    r = peer / ref
    if r == 0:
        return "0"
    return f"{r:.2f}x" if r < 100 else f"{r:.0f}x"


def _s(x: float) -> str:
    return "-" if x != x else (f"{x:.3f}" if x < 10 else f"{x:.1f}")


def section_table(res: dict[str, Any], summ: dict[str, Any], section: str, ref: str) -> str:
    rows = []
    for n in res["config"]["ns"]:
        key = str(n)
        r0 = summ.get(ref, {}).get(key)
        for cfg in CONFIGS:
            if section not in cfg.sections or cfg.id not in summ or key not in summ[cfg.id]:
                continue
            s = summ[cfg.id][key]
            def rr(f: str, s: dict[str, float] = s, r0: dict[str, float] | None = r0) -> str:
                return _ratio(s[f], r0[f]) if r0 else "-"
            rows.append([str(n), cfg.label, f"{s['step_ms']:.2f}", rr("step_ms"),
                         f"{s['turn_ms']:.2f}", _mb(s["written"]), rr("written"), _mb(s["held"]), rr("held"),
                         _s(s["resume_first_s"]) if cfg.resumable else "n/a",
                         rr("resume_first_s") if cfg.resumable else "",
                         _s(s["resume_end_s"]) if cfg.resumable else "n/a",
                         f"{s['runs']}/{s['trials']}"])
        lg = res.get("langgraph_redis")
        if lg is not None and section == "equal":
            rows.append([str(n), "LangGraph + RedisSaver", "cannot run (below)", "", "", "", "",
                         "", "", "", "", "", "0/0"])
    return U.table(rows, ["N", "system", "ms/step", "x", "turn p50", "written MB", "x",
                          "held MB", "x", "resume 1st s", "x", "resume end s", "runs/trials"])


def targets(summ: dict[str, Any], ref: str) -> list[tuple[str, str, str, str]]:
    out: list[tuple[str, str, str, str]] = []
    u = summ.get(ref, {}).get("1000")
    if not u:
        return out
    def get(cid: str) -> dict[str, float] | None:
        return summ.get(cid, {}).get("1000")
    for cid, name in (("langgraph-pg/sync", "LangGraph"), ("dbos", "DBOS")):
        p = get(cid)
        if p:
            r = p["step_ms"] / u["step_ms"]
            out.append((f"per step: {name} / undying", f"{p['step_ms']:.2f} / {u['step_ms']:.2f} ms",
                        f"{r:.2f}x >= 3x", "met" if r >= TARGETS["step_vs_peers"] else "NOT met"))
    p = get("langgraph-pg/sync")
    if p:
        r = p["written"] / u["written"]
        out.append(("bytes written: LangGraph / undying", f"{_mb(p['written'])} / {_mb(u['written'])} MB",
                    f"{r:.1f}x >= 10x", "met" if r >= TARGETS["bytes_vs_langgraph"] else "NOT met"))
    p = get("dbos")
    if p:
        r = u["written"] / p["written"]
        out.append(("bytes written: undying / DBOS", f"{_mb(u['written'])} / {_mb(p['written'])} MB",
                    f"{r:.2f}x <= 1.2x", "met" if r <= TARGETS["bytes_vs_dbos"] else "NOT met"))
    p = get("raw-redis/always")
    if p:
        r = u["step_ms"] / p["step_ms"]
        out.append(("per step: undying / raw Redis floor", f"{u['step_ms']:.2f} / {p['step_ms']:.2f} ms",
                    f"{r:.2f}x <= 1.5x", "met" if r <= TARGETS["step_vs_raw_redis"] else "NOT met"))
    for cid, name in (("langgraph-pg/sync", "LangGraph"), ("dbos", "DBOS")):
        p = get(cid)
        if p:
            r = p["resume_first_s"] / u["resume_first_s"]
            out.append((f"resume to 1st new step: {name} / undying",
                        f"{_s(p['resume_first_s'])} / {_s(u['resume_first_s'])} s",
                        f"{r:.2f}x >= 3x", "met" if r >= TARGETS["resume_vs_peers"] else "NOT met"))
    return out


def report(res: dict[str, Any]) -> str:
    m = res["machine"]
    summ = summarize(res)
    res["summary"] = summ
    ref = res["ref"]
    pg = res["postgres"]
    lines = [
        f"command: {res['command']}",
        f"machine: {m['nproc']} cpus ({m['cpu']}), {m['mem_total_gib']} GiB, {m['os']}; "
        f"load avg {m['loadavg_start']} at start, {res.get('loadavg_end')} at end",
        f"python {m['python']}, ray {m['ray']}, redis-server {m['redis_server']} (AOF on), "
        f"redis-py {m['redis_py']} (hiredis {m['hiredis']})" + (
            f", PostgreSQL {pg['version']} (synchronous_commit={pg['synchronous_commit']}, "
            f"fsync={pg['fsync']}, wal_sync_method={pg['wal_sync_method']}, "
            f"full_page_writes={pg['full_page_writes']})" if pg else ""),
        f"undying {res['undying']}; peers: "
        + ", ".join(f"{k} {v}" for k, v in res["versions"].items()),
        f"N {res['config']['ns']}, runs per N {res['config']['plan']['runs']}, resume trials "
        f"per N {res['config']['plan']['trials']}; run once at N=1000 (first run > "
        f"{SLOW_RUN_S:.0f} s): {res['config'].get('run_once', {}).get('1000', [])}; "
        f"wall {res['wall_s']:.0f} s",
        "",
        "ms/step: from the run's first model turn until it is stored in full, / N, p50 over "
        "runs. turn p50: the interval between consecutive model turns, pooled over runs (less "
        "than ms/step where writes lag behind the steps: LangGraph durability=async). written: "
        "AOF growth (Redis) or WAL generated (PostgreSQL). held: the run's keys (MEMORY USAGE) "
        "or the system's tables. resume: SIGKILL at step N/2, then from the start of the resume "
        "(a fresh process after its imports; undying on Ray: the kill, undying "
        "resumes it) to the first newly committed step (1st) and to the end. x: peer / undying "
        f"(Ray) at the same setting ({ref}).",
    ]
    for section, title in (("equal", "EQUAL DURABILITY: an fsync per commit (Redis appendfsync "
                                     "always; PostgreSQL synchronous_commit=on; LangGraph "
                                     "durability=sync)"),
                           ("default", "EACH SYSTEM'S DEFAULT: undying everysec, LangGraph "
                                       "durability=async; DBOS and the plain actor as above")):
        r = ref if section == "equal" else ref.replace("always", "everysec")
        lines += ["", title, section_table(res, summ, section, r)]
    lg = res.get("langgraph_redis")
    if lg is not None:
        lines += ["", f"LangGraph + RedisSaver (langgraph-checkpoint-redis) on this redis-server: "
                      f"{'ran' if lg.get('ok') else 'cannot run: ' + str(lg.get('reason'))}"]
    t = targets(summ, ref)
    if t:
        lines += ["", "TARGETS at N = 1000, equal durability:",
                  U.table([list(x) for x in t], ["target", "value", "ratio", ""])]
    noisy = {cid: v["1000"]["others_xacts"] for cid, v in summ.items()
             if "1000" in v and v["1000"]["others_xacts"]}
    if noisy:
        lines.append(f"note: other databases committed transactions during PostgreSQL runs "
                     f"(their WAL is in 'written'): {noisy}")
    if res["failures"]:
        lines += ["", "FAILURES:"] + [f"  {f}" for f in res["failures"]]
    return "\n".join(lines)


# -- main ----------------------------------------------------------------------------------------


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for p in PEER_PACKAGES:
        try:
            out[p] = version(p)
        except PackageNotFoundError:
            out[p] = "missing"
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.peers", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="N = 10 and 100 only, fewer repeats")
    ap.add_argument("--ns", type=int, nargs="+", help="run lengths (default 10 100 1000)")
    ap.add_argument("--systems", nargs="+", help="only these config ids (e.g. dbos undying/always)")
    ap.add_argument("--no-ray", action="store_true",
                    help="skip undying on Ray and the plain Ray actor (ratios then use the "
                         "undying engine without Ray)")
    ap.add_argument("--no-trials", action="store_true", help="skip the crash/resume trials")
    ap.add_argument("--repeats", type=int, help="runs per N (default 5, 3, 3 for N = 10, 100, "
                    "1000; once at N = 1000 for a config slower than 30 s a run)")
    ap.add_argument("--trials", type=int, help="resume trials per N (default 2, 2, 1)")
    ap.add_argument("--all-trials", action="store_true",
                    help="at N = 1000 also the resume trials of each system's default setting")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per run (default 900)")
    ap.add_argument("--json", metavar="PATH", help="write all results as JSON")
    ap.add_argument("--label", help="what undying build this is (default: the git commit, and "
                    "whether undying's code has uncommitted changes)")
    ap.add_argument("--serve", metavar="SYSTEM", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.serve:
        return serve(args.serve)
    # a SIGTERM (a CI time-out, `timeout`) unwinds like Ctrl-C: every server is stopped
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    ns = args.ns or ([10, 100] if args.quick else [10, 100, 1000])
    if any(not 1 <= n <= 1000 for n in ns):
        ap.error("--ns: each N must be 1..1000")
    pl = plan(ns, args.quick)
    if args.repeats:
        pl["runs"] = {n: args.repeats for n in ns}
    if args.trials:
        pl["trials"] = {n: args.trials for n in ns}
    configs = [c for c in CONFIGS if not args.systems or c.id in args.systems]
    if args.no_ray:
        configs = [c for c in configs if c.system not in ("undying", "ray-plain")]
    need = {"langgraph-pg": ("langgraph", "langgraph-checkpoint-postgres", "psycopg"),
            "dbos": ("dbos", "psycopg")}
    have = versions()
    missing = sorted({p for c in configs for p in need.get(c.system, ()) if have[p] == "missing"})
    if missing:
        print(f"missing peer packages {missing}: install the bench extra, "
              "pip install -e \".[bench]\"", file=sys.stderr)
        return 2
    use_pg = any(c.store.startswith("pg") for c in configs)

    root = Path(tempfile.mkdtemp(prefix="undying-bench-peers-"))
    os.environ["UNDYING_BENCH_DIR"] = str(root)
    U.ray_env()  # workers (and Ray's) import bench/ from the repository
    from . import _peers_pg as P

    res: dict[str, Any] = {
        "command": "python -m bench.peers " + " ".join(map(shlex.quote, sys.argv[1:]
                                                             if argv is None else argv)),
        "config": {"ns": ns, "plan": pl, "configs": [c.id for c in configs]},
        "versions": versions(), "undying": args.label or undying_version(), "targets": TARGETS,
        "runs": {}, "trials": {}, "failures": [],
    }
    t_start = time.perf_counter()
    stores = Stores(root)
    bench: Bench | None = None
    try:
        stores.start({c.store.split(":")[1] for c in configs if c.store.startswith("redis:")},
                     use_pg)
        import redis as _redis

        r = _redis.Redis.from_url(stores.url("always"))
        res["machine"] = U.machine_info(r.info("server")["redis_version"],
                                        stores.redis["always"].binary)
        r.close()
        res["postgres"] = P.server_info() if use_pg else {}
        print(f"bench.peers: load avg {res['machine']['loadavg_start']}; redis-servers "
              + ", ".join(f"{n} {s.url}" for n, s in stores.redis.items())
              + f"; databases {', '.join(stores.dbs) or '-'}", flush=True)
        bench = Bench(root, stores, args.timeout)

        # LangGraph's Redis checkpointer: needs RediSearch and RedisJSON
        if any(c.system == "langgraph-pg" for c in configs):
            res["langgraph_redis"] = bench.worker("langgraph-pg").call(
                {"op": "try_redis", "redis_url": stores.url("always")}, 120)
            stores.clients["always"].flushdb()  # only what the probe left, on our own server
            print(f"  LangGraph RedisSaver: {res['langgraph_redis']}", flush=True)

        # warm up every config once (imports, connections, Ray workers), unmeasured
        live = []
        for cfg in configs:
            try:
                bench.measure(cfg, 10, f"warm-{uuid.uuid4().hex[:6]}", timeout=180)
                live.append(cfg)
            except Exception as exc:
                msg = f"{cfg.id}: warm-up failed: {type(exc).__name__}: {str(exc)[:600]}"
                res["failures"].append(msg)
                print("  " + msg, flush=True)
        bench.failures.clear()
        if not any(c.system == "undying" for c in live):
            res["ref"] = "undying-inline/always"
        else:
            res["ref"] = "undying/always"
        print(f"  warm-up done ({time.perf_counter() - t_start:.0f} s); reference {res['ref']}",
              flush=True)

        for n in ns:
            reps = pl["runs"][n]
            slow: set[str] = set()
            for rep in range(reps):
                for cfg in rotate(live, rep + n):
                    if rep > 0 and cfg.id in slow:
                        continue
                    key = f"p{n}-{rep}-{uuid.uuid4().hex[:6]}"
                    try:
                        out = bench.measure(cfg, n, key)
                    except Exception as exc:
                        res["failures"].append(f"{cfg.id} n={n}: {type(exc).__name__}: "
                                               f"{str(exc)[:600]}")
                        continue
                    if n >= 1000 and out["wall_s"] > SLOW_RUN_S:
                        slow.add(cfg.id)
                    res["runs"].setdefault(cfg.id, {}).setdefault(str(n), []).append(out)
            res["config"].setdefault("run_once", {})[str(n)] = sorted(slow)
            print(f"  N={n}: runs done ({time.perf_counter() - t_start:.0f} s)", flush=True)
            if args.no_trials:
                continue
            reps = pl["trials"][n]
            trial_cfgs = [c for c in live if c.resumable
                          and (n < 1000 or args.all_trials or "equal" in c.sections)]
            for rep in range(reps):
                for cfg in rotate(trial_cfgs, rep + n):
                    if rep > 0 and cfg.id in slow:
                        continue
                    key = f"r{n}-c{n // 2}-{rep}{uuid.uuid4().hex[:6]}"
                    try:
                        out = bench.trial(cfg, n, key)
                    except Exception as exc:
                        res["failures"].append(f"{cfg.id} resume n={n}: {type(exc).__name__}: "
                                               f"{str(exc)[:600]}")
                        continue
                    res["trials"].setdefault(cfg.id, {}).setdefault(str(n), []).append(out)
            print(f"  N={n}: resume trials done ({time.perf_counter() - t_start:.0f} s)",
                  flush=True)
        res["failures"] += bench.failures
    finally:
        if bench is not None:
            bench.close()
        stores.close()
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
