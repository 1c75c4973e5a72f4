"""Side effects under SIGKILL, on a real local Ray: a ``keyed`` and an ``at_most_once`` tool
deliver to a local HTTP sink that counts what it received and what it applied.

Each run makes one delivery (`undying.testing.sink_agent`); its host or its executor is
killed at one point around the call, aimed by the run's committed events and dispatch
records in Redis and by the sink's gates (never by a sleep):

- before the intent: the host paused after the commit that asks the model for the call
  (the call does not exist yet);
- after the intent: the host paused after committing the intent, before dispatching it;
- during the call: the executor, while the sink holds the request, before or after
  applying it;
- after the result: the executor, stopped (SIGSTOP) before the sink's answer reaches it,
  then killed: the delivery happened and nobody recorded its result;
- after the result is committed: the host paused after committing the result;
- and, with no process killed, the target dying mid-request.

What is asserted, per key: ``keyed`` — the sink *applied* it exactly once and every
delivery carried the same Idempotency-Key (the call's journal key); raw deliveries may be
two (a re-send the sink recognised). ``at_most_once`` — the sink *received* it at most
once (raw deliveries: nothing could have been deduplicated away); a call that had begun
when its executor died is ``in_doubt`` in the run's journal, reported in the run's
error, and never dispatched again (no pending effect, no queued dispatch).

Hosts pause 0.4 s after each commit so a kill can land between a commit and its dispatch.
"""

from __future__ import annotations

import json
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration._faults import executor_pid, kill, teardown
from undying import Settings, Undying
from undying.actors import StepEvent
from undying.persistence import RedisServer, decode
from undying.testing import HttpSink, MemoryStore, run_inline, sink_agent, sink_task

pytestmark = [pytest.mark.ray, pytest.mark.timeout(240)]

PAUSE_S = 0.4
CALL = "t2.0"  # the delivery: step 2, the model's first tool call
MATRIX: list[dict[str, Any]] = []


@pytest.fixture(scope="module")
def fx_redis(tmp_root: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_root / f"redis-fx-{uuid.uuid4().hex[:6]}",
                         appendfsync="always").start()
    yield server
    server.kill()


@pytest.fixture(scope="module")
def ud(ray_local: None, fx_redis: RedisServer) -> Iterator[Undying]:
    client = Undying(Settings(redis_url=fx_redis.url, namespace=f"fx-{uuid.uuid4().hex[:6]}"),
                     policy={"max_restarts": 3, "window_s": 60, "backoff_base_s": 0.2},
                     actor_options={"hosts_per_node": 2, "pause_after_commit_s": PAUSE_S})
    client.supervisor()
    yield client
    teardown(client)


@pytest.fixture(scope="module")
def sink(request: pytest.FixtureRequest) -> Iterator[HttpSink]:
    with HttpSink() as s:
        yield s
    if MATRIX:  # the outcome table, printed once after the module's tests
        lines = ["", f"{'kill point':<34}{'class':<7}received applied replayed  journal    "
                 "run       aim missed"]
        lines += [f"{r['point']:<34}{r['mode']:<7}{r['received']:>8}{r['applied']:>8}"
                  f"{r['replayed']:>9}  {r['journal']:<10} {r['status']:<9} {r['misses']}"
                  for r in MATRIX]
        capture = request.config.pluginmanager.getplugin("capturemanager")
        with capture.global_and_fixture_disabled():
            print("\n".join(lines), flush=True)


# -- aiming ------------------------------------------------------------------------------------


def wait_event(ud: Undying, run_id: str, pred: Callable[[StepEvent], bool],
               timeout: float = 90) -> StepEvent:
    """Block on the run's event stream until a committed step matches."""
    deadline = time.monotonic() + timeout
    after = "0-0"
    while time.monotonic() < deadline:
        for e in ud.store.read_events(run_id, after, 100, block_ms=500):
            after = e.entry_id
            ev = decode("event", StepEvent, e.data, run_id=run_id)
            if pred(ev):
                return ev
    raise AssertionError(f"run {run_id}: no such step within {timeout}s: "
                         f"{[(e.step, e.kind, e.status) for e in ud.history(run_id)]}")


class Missed(Exception):
    """The aim missed (a loaded machine ran the host past its pause): try a fresh run."""


def stop_host_after(ud: Undying, run_id: str, step: int, kind: str, effect: str) -> int:
    """The host that just committed ``step`` is paused before dispatching ``effect``:
    freeze it there (SIGSTOP), check it still holds the run with the call undispatched,
    and return its pid."""
    wait_event(ud, run_id, lambda e: e.step == step and e.kind == kind)
    info = ud.actor_info(run_id)
    if info is None or not info["pid"]:
        raise Missed(f"run {run_id}: no host held it any more after step {step}")
    kill(info["pid"], signal.SIGSTOP)
    still = ud.actor_info(run_id)
    rec = ud.store.fx_records(run_id).get(effect)  # type: ignore[attr-defined]
    if still != info or ud.info(run_id).step != step or rec != "1|q":
        kill(info["pid"], signal.SIGCONT)
        raise Missed(f"run {run_id}: the host had moved on past step {step} ({still}, {rec!r})")
    return int(info["pid"])


def passivated(ud: Undying, run_id: str, timeout: float = 30) -> None:
    """Wait until no host holds the run (its lease is given back)."""
    deadline = time.monotonic() + timeout
    while ud.actor_info(run_id) is not None:
        assert time.monotonic() < deadline, f"run {run_id} was never passivated"
        time.sleep(0.02)


def stopped(pid: int, timeout: float = 10) -> None:
    """Wait until the kernel has stopped the process (state T): after this it reads nothing."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] in ("T", "t"):
                return
        time.sleep(0.001)
    raise AssertionError(f"process {pid} did not stop")


# -- the points ----------------------------------------------------------------------------------


def before_the_intent(ud: Undying, sink: HttpSink, run_id: str, item: str) -> None:
    kill(stop_host_after(ud, run_id, 1, "start", "m1"))


def after_the_intent(ud: Undying, sink: HttpSink, run_id: str, item: str) -> None:
    pid = stop_host_after(ud, run_id, 2, "model_reply", CALL)
    assert ud.state(run_id).journal[CALL].status == "intent"
    kill(pid)


def _during(mode: str) -> Callable[[Undying, HttpSink, str, str], None]:
    def during(ud: Undying, sink: HttpSink, run_id: str, item: str) -> None:
        gate = sink.gate(item, mode)  # type: ignore[arg-type]
        pid = executor_pid(ud)
        gate.wait_arrived(90)
        kill(pid)
        assert gate.client_gone.wait(30), "the sink never saw its client go"

    return during


def after_the_result(ud: Undying, sink: HttpSink, run_id: str, item: str) -> None:
    gate = sink.gate(item, "hold_after")
    pid = executor_pid(ud)
    gate.wait_arrived(90)
    kill(pid, signal.SIGSTOP)
    stopped(pid)
    gate.release()
    assert gate.answered.wait(30), "the sink never answered"
    kill(pid)  # the answer is in its socket, unread


def after_the_result_commit(ud: Undying, sink: HttpSink, run_id: str, item: str) -> None:
    pid = stop_host_after(ud, run_id, 3, "tool_result", "m3")
    assert ud.state(run_id).journal[CALL].status in ("done", "error")
    kill(pid)


def target_dies(ud: Undying, sink: HttpSink, run_id: str, item: str) -> None:
    sink.gate(item, "die_after")


POINTS: dict[str, Callable[[Undying, HttpSink, str, str], None]] = {
    "before the intent (host)": before_the_intent,
    "after the intent (host)": after_the_intent,
    "during the call, unapplied (exec)": _during("hold_before"),
    "during the call, applied (exec)": _during("hold_after"),
    "after the result (exec)": after_the_result,
    "after the result commit (host)": after_the_result_commit,
    "target dies mid-request (none)": target_dies,
}

# (received, applied, journal status, run status) each point leaves, per class
EXPECTED: dict[tuple[str, str], tuple[int, int, str, str]] = {
    ("before the intent (host)", "keyed"): (1, 1, "done", "finished"),
    ("before the intent (host)", "once"): (1, 1, "done", "finished"),
    ("after the intent (host)", "keyed"): (1, 1, "done", "finished"),
    ("after the intent (host)", "once"): (1, 1, "done", "finished"),
    # the request was held when its executor died: never applied; the keyed call is sent
    # again with its key; the at-most-once call had begun, so it is in doubt
    ("during the call, unapplied (exec)", "keyed"): (2, 1, "done", "finished"),
    ("during the call, unapplied (exec)", "once"): (1, 0, "in_doubt", "waiting"),
    ("during the call, applied (exec)", "keyed"): (2, 1, "done", "finished"),
    ("during the call, applied (exec)", "once"): (1, 1, "in_doubt", "waiting"),
    ("after the result (exec)", "keyed"): (2, 1, "done", "finished"),
    ("after the result (exec)", "once"): (1, 1, "in_doubt", "waiting"),
    ("after the result commit (host)", "keyed"): (1, 1, "done", "finished"),
    ("after the result commit (host)", "once"): (1, 1, "done", "finished"),
    # no process died: the keyed tool re-sends with its key; the at-most-once one reports
    # an unknown outcome to the model and does not re-send
    ("target dies mid-request (none)", "keyed"): (2, 1, "done", "finished"),
    ("target dies mid-request (none)", "once"): (1, 1, "error", "finished"),
}


@pytest.fixture(scope="module")
def references() -> Iterator[Callable[[str, str], str]]:
    """The answer of an undisturbed run delivering ``item`` (to a sink of its own)."""
    with HttpSink() as ref_sink:
        def answer(item: str, mode: str) -> str:
            state = run_inline(MemoryStore(), sink_agent, sink_task(ref_sink.url, item, mode),
                               run_id=f"ref-{item}")
            assert state.status == "finished", state.error
            return state.result or ""

        yield answer


@pytest.mark.parametrize("mode", ["keyed", "once"])
@pytest.mark.parametrize("point", list(POINTS))
def test_kill_around_the_call(ud: Undying, sink: HttpSink, references: Callable[[str, str], str],
                              point: str, mode: str) -> None:
    received, applied, journal, status = EXPECTED[(point, mode)]
    misses = []
    for _ in range(3):
        item = f"{point.split()[0]}-{mode}-{uuid.uuid4().hex[:8]}"
        h = ud.start(sink_agent, sink_task(sink.url, item, mode))
        try:
            POINTS[point](ud, sink, h.run_id, item)
            break
        except Missed as exc:
            misses.append(str(exc))
    else:
        pytest.fail(f"missed the kill point three times: {misses}")
    if status == "finished":
        res = ud.wait(h.run_id, timeout=120)
        state = ud.state(h.run_id)
        assert res.status == "finished", (res.error, _debug(ud, h.run_id))
        if journal == "done":
            assert res.answer == references(item, mode)
    else:  # in doubt: it waits for a decision, holding nothing, with nothing left to dispatch
        wait_event(ud, h.run_id, lambda e: e.kind == "effect_lost" and e.status == "waiting")
        state = ud.state(h.run_id)
        assert state.status == "waiting" and not state.pending, _debug(ud, h.run_id)
        # nothing can dispatch it again: no queued attempt (the begun one's record stays;
        # see the report on stale records of in-doubt calls)
        recs = ud.store.fx_records(h.run_id)  # type: ignore[attr-defined]
        assert all(r.startswith("1|s|") for r in recs.values()), recs
        assert f"tool call {CALL} (http_post_once, key {h.run_id}:2:0) is in doubt" in (
            state.error or "")
        passivated(ud, h.run_id)

    entry = state.journal[CALL]
    c = sink.counts(item)
    MATRIX.append({"point": point, "mode": mode, "received": c["received"],
                   "applied": c["applied"], "replayed": c["replayed"], "journal": entry.status,
                   "status": state.status, "misses": len(misses)})
    assert entry.status == journal, (entry, _debug(ud, h.run_id))
    assert entry.key == f"{h.run_id}:2:0"
    if mode == "keyed":
        assert c["applied"] == 1, c  # exactly once, per key
        assert c["idempotency_keys"] == [entry.key], c  # every delivery carried the call's key
        assert c["received"] == received, c
    else:
        assert c["received"] <= 1 and c["idempotency_keys"] == [], c  # at most once, raw
        assert (c["received"], c["applied"]) == (received, applied), c
        assert all(d.request_id == entry.key for d in sink.deliveries(item))
    steps = [e.step for e in ud.history(h.run_id) if e.kind != "restart"]
    assert steps == list(range(1, state.step + 1)), "one writer per step, no step lost"
    if "(host)" in point:
        assert any(e.kind == "restart" for e in ud.history(h.run_id))
    if "(exec)" in point:
        assert any(e.kind == "effect_lost" for e in ud.history(h.run_id))
    if journal == "in_doubt":
        # a person settles it (`undying resolve`): the run goes on, nothing runs it again
        assert [(r, c) for r, c, *_ in ud.in_doubt(h.run_id)] == [(h.run_id, CALL)]
        checked = json.dumps({"status": 200, "body": json.dumps({"receipt": "checked by ops"})})
        ud.resolve(h.run_id, CALL, "done", by="ops", output=checked)
        res = ud.wait(h.run_id, timeout=60)
        assert res.status == "finished", (res.error, _debug(ud, h.run_id))
        assert res.answer == f"{item}: HTTP 200, receipt checked by ops"
        settled = ud.state(h.run_id).journal[CALL]
        assert (settled.status, settled.resolution["by"]) == ("done", "ops")
        assert sink.counts(item)["received"] == c["received"], "settling ran nothing"


def _debug(ud: Undying, run_id: str) -> str:
    import ray

    info = ray.get(ud.supervisor().info.remote(True), timeout=30)
    hist = [(e.step, e.kind, e.status, e.summary[:80]) for e in ud.history(run_id)]
    return (f"history={hist} fx={ud.store.fx_records(run_id)} "  # type: ignore[attr-defined]
            f"ledger={ud.ledger(run_id)} log={info.get('log', [])[-15:]}")

