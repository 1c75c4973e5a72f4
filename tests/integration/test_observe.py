"""Watch, history, fork from any step, retention and gc, and the exporter: on real redis-servers
(and the in-memory store where the contract is the same), with runs driven in process (no Ray).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import unique_id
from undying import Settings, Undying
from undying.actors import load_state
from undying.actors._fork import ForkError, fork_run, state_at
from undying.actors.inline import InlineHost, run_until_done
from undying.actors.research import agent, lead, slow_agent, slow_lead
from undying.persistence import MemoryStore, RedisServer, RedisStore, RunExists
from undying.persistence.metrics import CATALOG, flush_all, recorder_for
from undying.persistence.retention import collect_garbage, expire_ended
from undying.testing import run_inline

TASK = "How do fencing tokens stop zombie writers, and what does appendfsync always guarantee?"
LEAD_TASK = "What is a fencing token, and what does appendfsync always guarantee?"


@pytest.fixture(scope="module")
def obs_redis(tmp_root: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_root / f"redis-obs-{uuid.uuid4().hex[:6]}").start()
    yield server
    server.kill()


@pytest.fixture(params=["memory", "redis"])
def any_store(request: pytest.FixtureRequest, obs_redis: RedisServer) -> Iterator[Any]:
    if request.param == "memory":
        yield MemoryStore()
        return
    s = RedisStore(obs_redis.url, unavailable_s=20)
    yield s
    s.close()


def _calls(store: Any, run_id: str) -> list[tuple[str, str]]:
    """Tool executions of a run as (tool, arguments), from its ledger and journal."""
    state = load_state(store, run_id)[0]
    by_key = {e.key: (e.tool, json.dumps(e.arguments, sort_keys=True)) for e in state.journal.values()}
    out = []
    for k, n in store.ledger(run_id).items():
        out += [by_key[k.split("|", 1)[1]]] * n
    return sorted(out)


def _host_tree(store: Any, run_id: str) -> Any:
    """Drive a run and every sub-agent (also those its activation spawns) to the end."""
    host = InlineHost(store)
    host.tree.update(load_state(store, run_id)[0].delegation.pending)
    return asyncio.run(host.run(run_id))


# -- state at any step, fork ---------------------------------------------------------------


def test_state_at_every_step_survives_compaction(any_store: Any) -> None:
    final = run_inline(any_store, agent, TASK, compact_ratio=1.0)  # a snapshot at most steps
    assert final.status == "finished" and final.step >= 6
    for k in range(final.step + 1):
        s = state_at(any_store, final.run_id, k)
        assert s.step == k
        assert final.conversation[: len(s.conversation)] == s.conversation
    assert state_at(any_store, final.run_id, final.step) == final


def test_fork_keeps_the_steps_before_and_runs_the_rest_fresh(any_store: Any) -> None:
    orig = run_inline(any_store, agent, TASK)
    orig_calls = _calls(any_store, orig.run_id)
    for at in range(1, orig.step):
        at_state = state_at(any_store, orig.run_id, at)
        fid = fork_run(any_store, orig.run_id, at)
        fork = run_until_done(any_store, fid)
        assert fork.status == "finished" and fork.result == orig.result, at
        assert fork.conversation[: len(at_state.conversation)] == at_state.conversation
        # tools done by `at` are the recorded ones; the fork ran exactly the others
        done_before = sorted((e.tool, json.dumps(e.arguments, sort_keys=True))
                             for e in at_state.journal.values() if e.status == "done")
        assert sorted(_calls(any_store, fid) + done_before) == orig_calls, at
        assert all(k.split("|", 1)[1].startswith(f"{fid}:") for k in any_store.ledger(fid))
        history = [e for e in Undying(store=any_store, supervise=False).history(fid)]
        assert history[0].kind == "fork" and history[0].step == at
        assert [e.step for e in history[1:]] == list(range(at + 1, fork.step + 1))
        assert any_store.info(fid).parent == ""


def test_a_fork_of_a_fork_reaches_back_to_its_source(any_store: Any) -> None:
    orig = run_inline(any_store, agent, TASK)
    f1 = fork_run(any_store, orig.run_id, 4)
    run_until_done(any_store, f1)
    early = state_at(any_store, f1, 2)  # before the fork: the source's steps
    assert early.conversation == state_at(any_store, orig.run_id, 2).conversation
    for at in (2, 6):
        f2 = fork_run(any_store, f1, at)
        assert run_until_done(any_store, f2).result == orig.result


def test_a_fork_of_a_lead_spawns_the_sub_agents_in_flight_again(any_store: Any) -> None:
    orig = run_inline(any_store, lead, LEAD_TASK)
    assert orig.status == "finished"
    at = next(k for k in range(1, orig.step + 1)
              if state_at(any_store, orig.run_id, k).delegation.pending)
    fid = fork_run(any_store, orig.run_id, at)
    fork = _host_tree(any_store, fid)
    assert fork.status == "finished" and fork.result == orig.result
    assert sorted(fork.delegation.done) == sorted(c.replace(orig.run_id, fid, 1)
                                                  for c in orig.delegation.done)
    for child in fork.delegation.done:
        assert any_store.info(child).parent == fid


def test_fork_refuses_what_it_cannot_do_and_ids_never_collide(any_store: Any) -> None:
    orig = run_inline(any_store, agent, TASK)
    with pytest.raises(ForkError, match="earlier step"):
        fork_run(any_store, orig.run_id, orig.step)  # it had finished there
    with pytest.raises(ForkError, match="has steps 0 to"):
        fork_run(any_store, orig.run_id, orig.step + 5)
    ids = {fork_run(any_store, orig.run_id, 3) for _ in range(20)}
    assert len(ids) == 20
    mine = unique_id("fork")
    fork_run(any_store, orig.run_id, 3, new_id=mine)
    with pytest.raises(RunExists):
        fork_run(any_store, orig.run_id, 3, new_id=mine)


# -- watch -------------------------------------------------------------------------------------


def _client(url: str) -> Undying:
    return Undying(Settings(redis_url=url), store=RedisStore(url, unavailable_s=20),
                   supervise=False)


def _in_thread(store: Any, agent_: Any, task: str, run_id: str) -> threading.Thread:
    t = threading.Thread(target=run_inline, args=(store, agent_, task),
                         kwargs={"run_id": run_id}, daemon=True)
    t.start()
    return t


def _wait_exists(store: Any, run_id: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            store.info(run_id)
            return
        except Exception:
            time.sleep(0.01)
    raise AssertionError(f"{run_id} never created")


def test_watch_leaves_and_rejoins_with_no_gap_and_no_duplicate(obs_redis: RedisServer) -> None:
    driver = RedisStore(obs_redis.url)
    rid = unique_id("watch")
    t = _in_thread(driver, slow_agent(0.15), TASK, rid)
    _wait_exists(driver, rid)
    seen: list[str] = []
    first = _client(obs_redis.url)
    for _, eid, _ev in first.watch_tree(rid, tree=False, timeout=60):
        seen.append(eid)
        if len(seen) == 3:
            break  # the client goes away mid-run
    first.close()
    time.sleep(0.5)  # steps are committed while nobody watches
    second = _client(obs_redis.url)
    for _, eid, _ev in second.watch_tree(rid, after={rid: seen[-1]}, tree=False, timeout=60):
        seen.append(eid)
    t.join(60)
    everything = [eid for eid, _ in second.history_entries(rid)]
    assert seen == everything, "every event once, in order"
    assert len(everything) >= 8
    second.close()
    driver.close()


def test_watch_tree_follows_sub_agents_as_they_are_spawned(obs_redis: RedisServer) -> None:
    driver = RedisStore(obs_redis.url)
    rid = unique_id("tree")
    host = threading.Thread(target=lambda: run_inline(driver, slow_lead(0.1), LEAD_TASK,
                                                      run_id=rid), daemon=True)
    host.start()
    _wait_exists(driver, rid)
    ud = _client(obs_redis.url)
    got: dict[str, list[str]] = {}
    cursors: dict[str, str] = {}
    for n, (run, eid, _ev) in enumerate(ud.watch_tree(rid, timeout=90)):
        got.setdefault(run, []).append(eid)
        cursors[run] = eid
        if n == 4:
            break  # leave, and come back with the cursors
    for run, eid, _ev in ud.watch_tree(rid, after=cursors, timeout=90):
        got.setdefault(run, []).append(eid)
    host.join(60)
    final = load_state(driver, rid)[0]
    assert final.status == "finished" and len(final.delegation.done) >= 2
    assert set(got) == {rid, *final.delegation.done}, "the root and every sub-agent"
    for run, ids in got.items():
        assert ids == [eid for eid, _ in ud.history_entries(run)], run
    ud.close()
    driver.close()


def _cli(url: str, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "UNDYING_REDIS_URL": url}
    return subprocess.run([sys.executable, "-m", "undying.cli", *argv], env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_cli_watch_with_a_cursor_file_goes_on_where_it_stopped(obs_redis: RedisServer,
                                                              tmp_path: Path) -> None:
    driver = RedisStore(obs_redis.url)
    rid = unique_id("cli")
    t = _in_thread(driver, slow_agent(0.4), TASK, rid)
    _wait_exists(driver, rid)
    cursor = tmp_path / "cursor.json"
    lines: list[dict[str, Any]] = []
    for _ in range(40):  # each watch stops after ~1 s: a client that keeps reconnecting
        out = _cli(obs_redis.url, "watch", rid, "--json", "--cursor", str(cursor),
                   "--timeout", "1")
        lines += [json.loads(x) for x in out.stdout.splitlines()]
        if out.returncode in (0, 2):
            break
        assert "did not end within" in out.stderr, out.stderr
    t.join(60)
    ids = [x["id"] for x in lines]
    assert ids == [eid for eid, _ in _client(obs_redis.url).history_entries(rid)]
    assert lines[-1]["status"] == "finished"
    driver.close()


def test_cli_history_lists_every_step_with_restarts(obs_redis: RedisServer) -> None:
    store = RedisStore(obs_redis.url)
    final = run_inline(store, agent, TASK)
    from undying.actors import StepEvent
    from undying.persistence import encode

    ev = StepEvent(step=final.step, kind="restart", status="finished", epoch=9,
                   at_ms=int(time.time() * 1000), summary="restart 1: host died")
    store.record_restart(final.run_id, time.time(), encode("event", ev, run_id=final.run_id))
    out = _cli(obs_redis.url, "history", final.run_id, "--json")
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert [r["step"] for r in rows if r["kind"] != "restart"] == list(range(1, final.step + 1))
    assert rows[-1]["kind"] == "restart" and all(r["id"] for r in rows)
    text = _cli(obs_redis.url, "history", final.run_id)
    assert text.returncode == 0, text.stderr
    assert f"{final.step} steps, 1 restarts" in text.stdout
    assert re.search(r"\d\d:\d\d:\d\d\.\d{3}\s+1\s+start", text.stdout), text.stdout
    store.close()


def test_cli_fork_and_gc(obs_redis: RedisServer) -> None:
    store = RedisStore(obs_redis.url)
    final = run_inline(store, agent, TASK)
    out = _cli(obs_redis.url, "fork", final.run_id, "--at", "3", "--no-wait")
    assert out.returncode == 0, out.stderr
    fid = out.stdout.split()[1]
    assert store.info(fid).step == 3 and store.is_queued(fid)
    run_until_done(store, fid)
    out = _cli(obs_redis.url, "gc", "--older-than", "0s", "--dry-run", "--json")
    report = json.loads(out.stdout)
    assert report["dry_run"] and {final.run_id, fid} <= {r["root"] for r in report["removed"]}
    assert store.info(final.run_id)  # a dry run removes nothing
    store.close()


# -- retention and gc ---------------------------------------------------------------------------


def _keys_of(store: Any, run_id: str) -> list[str]:
    if isinstance(store, MemoryStore):
        return [run_id] if run_id in store._runs else []
    return [k.decode() for k in store.r.scan_iter(match=f"ud:{{{run_id}}}:*")]


def test_gc_removes_ended_trees_and_never_what_is_running_or_waiting(any_store: Any) -> None:
    done = run_inline(any_store, lead, LEAD_TASK)
    children = sorted(done.delegation.done)
    queued = unique_id("queued")  # created, waiting for a host: not ended
    from undying.actors import create_run

    create_run(any_store, agent, TASK, run_id=queued)
    busy_root = run_inline(any_store, agent, TASK)
    # an ended root whose sub-agent is still going: the whole tree stays
    from undying.actors._engine import create_run_from

    create_run_from(any_store, agent.context(), "still going", run_id=f"{busy_root.run_id}.9-0",
                    parent_id=busy_root.run_id)
    report = collect_garbage(any_store, 0.0)
    removed = {r.root: r.runs for r in report.removed}
    assert removed.get(done.run_id) == 1 + len(children)
    assert busy_root.run_id not in removed and queued not in removed
    assert any(root == busy_root.run_id and "pending" in why for root, why in report.kept)
    for rid in (done.run_id, *children):
        assert _keys_of(any_store, rid) == [], rid
        assert rid not in dict(any_store.index_items())
    for rid in (queued, busy_root.run_id, f"{busy_root.run_id}.9-0"):
        assert any_store.info(rid)
    assert any_store.counters().get("removed|gc", 0) >= 1 + len(children)


def test_retention_expires_ended_roots_with_their_trees(any_store: Any) -> None:
    done = run_inline(any_store, lead, LEAD_TASK)
    quarantined = run_inline(any_store, agent, TASK)
    any_store.quarantine(quarantined.run_id, "a test says so")
    assert expire_ended(any_store, 3600.0) == [] or all(
        r.root != done.run_id for r in expire_ended(any_store, 3600.0))  # not yet
    removed = {r.root: r for r in expire_ended(any_store, 0.0, now=time.time() + 1)}
    assert removed[done.run_id].runs == 1 + len(done.delegation.done)
    assert any_store.info(quarantined.run_id)  # retention keeps it for someone to look at
    gone = collect_garbage(any_store, 0.0)
    assert quarantined.run_id in {r.root for r in gone.removed}


# -- the exporter ---------------------------------------------------------------------------------


def test_the_exporter_exposes_the_whole_catalogue(tmp_root: Path) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from undying.dashboards.exporter import render
    from undying.persistence import Commit, Fenced
    from undying.supervisor._observe import note_lease_expired, note_restart

    server = RedisServer(tmp_root / f"redis-exp-{uuid.uuid4().hex[:6]}").start()
    try:
        store = RedisStore(server.url)
        done = run_inline(store, lead, LEAD_TASK)
        fid = fork_run(store, done.run_id, 2)
        _host_tree(store, fid)
        victim = run_inline(store, agent, TASK)
        old = store.claim_epoch(victim.run_id)
        store.claim_epoch(victim.run_id)
        with pytest.raises(Fenced):
            store.commit(victim.run_id, Commit(epoch=old, step=victim.step + 1, status="running"))
        restarted = unique_id("restarted")
        from undying.actors import create_run

        create_run(store, agent, TASK, run_id=restarted)
        note_restart(store, restarted, "lease expired", time.time() - 0.25)
        note_lease_expired(store)
        assert run_until_done(store, restarted).status == "finished"
        bad = create_run(store, agent, TASK, run_id=unique_id("bad"))
        store.quarantine(bad, "a test says so")
        collect_garbage(store, 0.0)
        flush_all()
        text = render(server.url).decode()
        samples = {s.name: s for f in text_string_to_metric_families(text) for s in f.samples}
        # by a kind that only a failed or retried call names (tests/integration/test_prometheus.py
        # makes those happen with a provider that answers 429 and 500)
        by_failure = {"undying_model_errors_total", "undying_model_retries_total"}
        for m in CATALOG.values():
            want = m.name + "_bucket" if m.kind == "histogram" else m.name
            assert want in samples or m.name in by_failure, f"{m.name} is not exposed"
        for f in text_string_to_metric_families(text):
            for s in f.samples:
                assert not {"run", "run_id"} & set(s.labels), s
        value = {(s.name, tuple(sorted(s.labels.items()))): s.value
                 for f in text_string_to_metric_families(text) for s in f.samples}
        assert value[("undying_fenced_commits_total", ())] == 1
        assert value[("undying_forks_total", ())] == 1
        assert value[("undying_restarts_total", (("reason", "lease_expired"),))] == 1
        assert value[("undying_recovery_seconds_count", ())] == 1
        assert 0.2 < value[("undying_recovery_seconds_sum", ())] < 60
        assert value[("undying_runs_ended_total", (("status", "quarantined"),))] == 1
        assert value[("undying_steps_total", (("kind", "child_result"),))] >= 4
        assert value[("undying_spawns_total", ())] >= 4
        assert value[("undying_runs_removed_total", (("why", "gc"),))] >= 1
        assert value[("undying_model_calls_total", (("model", "research"), ("outcome", "ok"),
                                                    ("provider", "scripted")))] > 0
        assert value[("undying_redis_up", ())] == 1
        if shutil.which("promtool"):
            out = subprocess.run(["promtool", "check", "metrics"], input=text,
                                 capture_output=True, text=True)
            assert out.returncode == 0, out.stdout + out.stderr
        store.close()
    finally:
        server.kill()


def test_recorder_batches_and_survives_a_store_outage() -> None:
    mem = MemoryStore()
    rec = recorder_for(mem)
    assert recorder_for(mem) is rec
    for _ in range(1000):
        rec.observe("undying_commit_seconds", 0.0003)
    rec.inc("undying_tool_calls_total", tool="read", outcome="ok")
    assert mem.read_metrics() == {}  # nothing written per observation
    calls = []

    def down(incs: dict[str, float]) -> None:
        calls.append(len(incs))
        raise ConnectionError("Redis is restarting")

    rec.sink = down
    assert rec.flush() == 0 and calls  # kept for the next flush
    rec.sink = mem.add_metrics
    assert rec.flush() == 4  # one bucket, sum, count, the counter: one write each
    got = mem.read_metrics()
    assert sum(v for k, v in got.items() if '"count"' in k) == 1000


def test_the_supervisor_sweeps_retention_with_the_options_it_is_given() -> None:
    from undying.persistence import RunNotFound
    from undying.supervisor._observe import Housekeeping

    opts: dict[str, Any] = {"retention_s": 0.0, "exporter_port": 0, "hosts_per_node": 2}
    hk = Housekeeping(opts)
    assert opts == {"hosts_per_node": 2}, "its options do not reach the pool"
    assert hk.exporter_port is None and hk.start_exporter("redis://unused") == ""
    store = MemoryStore()
    done = run_inline(store, lead, LEAD_TASK)
    time.sleep(0.01)
    assert hk.sweep(store) == 1 + len(done.delegation.done)
    assert hk.sweep(store) == 0  # at most every few seconds
    with pytest.raises(RunNotFound):
        store.info(done.run_id)
    assert Housekeeping({"retention_s": None}).sweep(store) == 0  # retention off
