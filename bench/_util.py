"""Shared pieces of the benchmarks: statistics, a realistic step, the engine's
commit rule with a timer on each phase, the machine, and the servers we own.

Nothing here edits library state: the step and the commit rule are built from
the public API (``diff_states``, ``pack``, ``encode``, ``RedisStore.commit``),
mirroring ``RunEngine._commit`` in actors/_engine.py.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import random
import shutil
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from undying.actors import ChatMessage, RunState, StepEvent
from undying.persistence import Commit, RedisServer, diff_states, encode, pack

ROOT = Path(__file__).resolve().parent.parent

# -- statistics ------------------------------------------------------------------


def pct(xs: Sequence[float], q: float) -> float:
    """Percentile ``q`` (0..100) with linear interpolation; nan for no data."""
    if not xs:
        return math.nan
    s = sorted(xs)
    if len(s) == 1:
        return float(s[0])
    k = (len(s) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return float(s[lo] + (s[hi] - s[lo]) * (k - lo))


def p50(xs: Sequence[float]) -> float:
    return pct(xs, 50)


def p99(xs: Sequence[float]) -> float:
    return pct(xs, 99)


def us(ns: Sequence[int]) -> list[float]:
    return [x / 1000.0 for x in ns]


def summary_us(ns: Sequence[int]) -> dict[str, float]:
    v = us(ns)
    return {"n": len(v), "p50_us": round(p50(v), 2), "p99_us": round(p99(v), 2),
            "mean_us": round(sum(v) / len(v), 2) if v else math.nan}


def ratio(a: float, b: float) -> float:
    return a / b if b else math.nan


# -- a realistic step --------------------------------------------------------------


def corpus_texts(n: int, size: int = 1000, seed: int = 7) -> list[str]:
    """``n`` slices of ~``size`` characters of the bundled corpus (real English prose)."""
    corpus = Path(__file__).resolve().parent.parent / "actors" / "corpus"
    try:
        from undying.actors._corpus import bundled_corpus

        corpus = bundled_corpus()
    except Exception:
        pass
    text = " ".join(p.read_text() for p in sorted(Path(corpus).glob("*.txt")))
    text = " ".join(text.split())
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        start = rng.randrange(0, max(1, len(text) - size))
        out.append(text[start:start + size])
    return out


def make_message(i: int, text: str) -> ChatMessage:
    """A ~1 KB message: assistant prose and tool results, alternately."""
    if i % 2:
        return ChatMessage(role="tool", content=text, tool_call_id=f"call-{i:05d}", name="read")
    return ChatMessage(role="assistant", content=text)


def base_state(run_id: str) -> RunState:
    from undying.actors.research import agent

    return RunState(run_id=run_id, status="running", task="How do fencing tokens stop zombies?",
                    context=agent.context())


def advance(state: RunState, msg: ChatMessage, inbox_id: str) -> RunState:
    """One step, copy-on-write as decide() does: append a message, bump step and usage."""
    u = state.usage
    return state.model_copy(update={
        "conversation": (*state.conversation, msg),
        "step": state.step + 1,
        "inbox_cursor": inbox_id,
        "usage": u.model_copy(update={"model_calls": u.model_calls + 1,
                                      "tokens_in": u.tokens_in + 250,
                                      "tokens_out": u.tokens_out + 40}),
    })


@dataclass
class StepTiming:
    step: int
    diff_ns: int
    pack_ns: int  # delta + (snapshot, when compacting) + event
    commit_ns: int
    snapshot: bool
    delta_bytes: int  # the delta this step produced (written only when not compacting)
    written_bytes: int  # checkpoint payload actually sent: the delta or the snapshot
    event_bytes: int

    @property
    def total_ns(self) -> int:
        return self.diff_ns + self.pack_ns + self.commit_ns


class Checkpointer:
    """The engine's commit path for one run, with a timer on each phase.

    Same rule as ``RunEngine._commit``: snapshot when
    ``journal_bytes + len(delta) >= compact_ratio * max(snapshot_bytes, 1)``,
    otherwise append the delta; one event per step; one ``store.commit``.
    """

    def __init__(self, store: Any, run_id: str, *, compact_ratio: float = 2.0,
                 state: RunState | None = None) -> None:
        self.store = store
        self.run_id = run_id
        self.compact_ratio = compact_ratio
        self.state = state or base_state(run_id)
        first = encode("snapshot", self.state, run_id=run_id)
        store.create(run_id, first, agent="bench", parent="")
        self.created_bytes = len(first)
        self.epoch = store.claim_epoch(run_id)
        self.journal_bytes = 0
        self.snapshot_bytes = len(first)

    def step(self, new: RunState, kind: str = "tool_result") -> StepTiming:
        rid = self.run_id
        t0 = time.perf_counter_ns()
        ops = diff_states(self.state, new)
        t1 = time.perf_counter_ns()
        delta = pack("delta", {"step": new.step, "ops": ops}, run_id=rid)
        snapshot = b""
        if self.journal_bytes + len(delta) >= self.compact_ratio * max(self.snapshot_bytes, 1):
            snapshot = encode("snapshot", new, run_id=rid)
        last = new.conversation[-1] if new.conversation else None
        event = encode("event", StepEvent(
            step=new.step, kind=kind, status=new.status, epoch=self.epoch,
            at_ms=int(time.time() * 1000), duration_ms=0.0,
            delta_bytes=0 if snapshot else len(delta), snapshot_bytes=len(snapshot),
            summary=f"{last.role if last else kind}: {len(last.content) if last else 0} chars"),
            run_id=rid)
        t2 = time.perf_counter_ns()
        res = self.store.commit(rid, Commit(
            epoch=self.epoch, step=new.step, status=new.status, kind=kind,
            delta=delta, snapshot=snapshot, events=(event,)))
        t3 = time.perf_counter_ns()
        self.journal_bytes, self.snapshot_bytes = res.journal_bytes, res.snapshot_bytes
        self.state = new
        return StepTiming(new.step, t1 - t0, t2 - t1, t3 - t2, bool(snapshot), len(delta),
                          len(snapshot) or len(delta), len(event))


# -- the machine -------------------------------------------------------------------------


def _mem_total_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / (1 << 20), 1)
    except OSError:
        pass
    return math.nan


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def _hiredis() -> str:
    try:
        from redis.utils import HIREDIS_AVAILABLE

        if not HIREDIS_AVAILABLE:
            return "no"
        import hiredis

        return str(getattr(hiredis, "__version__", "yes"))
    except Exception:
        return "no"


def machine_info(redis_version: str, redis_binary: str) -> dict[str, Any]:
    import msgpack
    import pydantic
    import ray
    import redis

    return {
        "nproc": os.cpu_count(),
        "cpu": _cpu_model(),
        "mem_total_gib": _mem_total_gib(),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
        "os": platform.platform(),
        "python": sys.version.split()[0],
        "redis_server": redis_version,
        "redis_server_binary": redis_binary,
        "ray": ray.__version__,
        "redis_py": redis.__version__,
        "hiredis": _hiredis(),
        "msgpack": ".".join(map(str, msgpack.version)),
        "pydantic": pydantic.VERSION,
    }


# -- servers this process owns ----------------------------------------------------------------


@contextlib.contextmanager
def redis_server(root: Path, appendfsync: str) -> Iterator[RedisServer]:
    """A private redis-server (AOF on) on a free port; stopped by pid at the end."""
    server = RedisServer(root / f"redis-{appendfsync}", appendfsync=appendfsync).start()
    try:
        # our own server: no automatic AOF rewrite, so AOF growth measures what was written
        import redis

        c = redis.Redis.from_url(server.url)
        c.config_set("auto-aof-rewrite-percentage", 0)
        c.close()
        yield server
    finally:
        # SIGTERM by pid: redis-server fsyncs its AOF and exits in ~0.1 s. (RedisServer.stop()
        # sends SHUTDOWN through a redis-py client whose default retries turn the expected
        # disconnect into a ~3-4 s stall: see docs/BENCHMARKS.md.)
        proc = server.proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except Exception:
                proc.kill()
                proc.wait()


def ray_env() -> None:
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    os.environ["RAY_AUTH_MODE"] = "disabled"
    # the bench actor lives in this repository's bench/ package: let workers import it
    path = os.environ.get("PYTHONPATH", "")
    if str(ROOT) not in path.split(os.pathsep):
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), path) if p)


@contextlib.contextmanager
def local_ray(root: Path) -> Iterator[None]:
    """A private local Ray under ``root``; shut down at the end, leftovers killed by pid."""
    ray_env()
    import ray

    temp = root / "ray"
    temp.mkdir(parents=True, exist_ok=True)
    ray.init(address="local", include_dashboard=False, log_to_driver=False, num_cpus=2,
             object_store_memory=100 << 20, namespace="undying-bench", _temp_dir=str(temp))
    try:
        yield
    finally:
        ray.shutdown()
        _kill_leftovers(str(temp))


def _kill_leftovers(marker: str) -> None:
    """Processes of *our* Ray session (their command line names our temp dir), by pid."""
    try:
        import psutil
    except ImportError:
        return
    me = os.getpid()
    deadline = time.monotonic() + 3
    while True:
        left = []
        for p in psutil.process_iter(["pid", "cmdline"]):
            try:
                if p.info["pid"] != me and any(marker in c for c in (p.info["cmdline"] or [])):
                    left.append(p.info["pid"])
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    for pid in left:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def rmtree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


# -- printing -----------------------------------------------------------------------------------


def table(rows: list[list[str]], header: list[str]) -> str:
    cols = [header, *rows]
    widths = [max(len(str(r[i])) for r in cols) for i in range(len(header))]
    line = "  ".join("-" * w for w in widths)
    out = ["  ".join(str(h).ljust(w) for h, w in zip(header, widths, strict=True)), line]
    for r in rows:
        out.append("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)))
    return "\n".join(out)


def f1(x: float) -> str:
    return "nan" if x != x else f"{x:.1f}"


def f2(x: float) -> str:
    return "nan" if x != x else f"{x:.2f}"
