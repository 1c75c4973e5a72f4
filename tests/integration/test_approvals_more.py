"""More on people deciding about tool calls, on a real local Ray and redis-server.

- A tool whose approval is "always" makes the run wait holding no process; `approve`
  resumes it, and the journal and the history keep who approved, and when.
- `undying in-doubt` lists at-most-once calls left in doubt (their executor was SIGKILLed
  while the target held the request), and `undying resolve RUN CALL --done/--failed/--retry`
  settles each: the model sees the output given, or the failure, or the call runs again.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator

import pytest

from tests.integration._faults import executor_pid, kill, pool_client
from tests.integration._tree_agents import root, task
from tests.integration.test_approvals import _cli, _waiting_for_approval
from tests.integration.test_side_effects import passivated, wait_event
from undying import Undying
from undying._client import ApprovalError
from undying.actors._state import args_hash
from undying.persistence import RedisServer
from undying.testing import HttpSink, sink_agent, sink_answer, sink_task

pytestmark = [pytest.mark.ray, pytest.mark.timeout(120)]

CALL = "t2.0"  # the sink agent's delivery: step 2, the model's first tool call


@pytest.fixture(scope="module")
def ud(ray_local: None, module_redis: RedisServer) -> Iterator[Undying]:
    with pool_client(module_redis.url, "am", hosts_per_node=2,
                     policy={"max_restarts": 3, "window_s": 60, "backoff_base_s": 0.2}) as client:
        yield client


def test_an_always_approval_waits_passivated_and_records_who_approved_and_when(
        ud: Undying) -> None:
    h = ud.start(root(), task("gate", what="deploy v2"))
    row = _waiting_for_approval(ud, h.run_id)  # and no host holds the run
    assert (row.tool, row.arguments) == ("hold", {"what": "deploy v2"})
    assert row.args_hash == args_hash({"what": "deploy v2"})
    assert ud.info(h.run_id).status == "waiting" and ud.ledger(h.run_id) == {}

    before = int(time.time() * 1000)
    ud.approve(h.run_id, row.call_id, by="dana", args_hash=row.args_hash)
    after = int(time.time() * 1000)
    res = h.result(timeout=60)
    assert res.status == "finished" and res.answer == "held: held deploy v2", res.error

    entry = ud.state(h.run_id).journal[row.call_id]
    assert entry.status == "done" and entry.result == "held deploy v2"
    assert entry.approval == {"decision": "approved", "by": "dana", "at_ms": entry.approval["at_ms"],
                              "args_hash": row.args_hash, "reason": ""}
    at_ms = entry.approval["at_ms"]
    assert before <= at_ms <= after
    asked = [e for e in ud.history(h.run_id) if e.status == "waiting"][-1]
    assert asked.summary == f'awaiting approval: {row.call_id} hold {{"what": "deploy v2"}}'
    [approved] = [e for e in ud.history(h.run_id) if e.kind == "approval"]
    assert approved.summary == f"approved {row.call_id} (hold) by dana, args {row.args_hash}"
    assert approved.at_ms >= at_ms and approved.status == "running"
    assert list(ud.ledger(h.run_id).values()) == [1]  # it ran once, after the approval
    with pytest.raises(ApprovalError, match="not waiting for approval"):
        ud.approve(h.run_id, row.call_id, by="dana", args_hash=row.args_hash)


def test_in_doubt_calls_are_listed_and_settled_from_the_cli(ud: Undying,
                                                            module_redis: RedisServer) -> None:
    outcomes = ("done", "failed", "retry")
    with HttpSink() as sink:
        items = {o: f"{o}-{uuid.uuid4().hex[:8]}" for o in outcomes}
        gates = {o: sink.gate(items[o], "hold_before") for o in outcomes}
        runs = {o: ud.start(sink_agent, sink_task(sink.url, items[o], "once")).run_id
                for o in outcomes}
        for g in gates.values():
            g.wait_arrived(60)  # every delivery held by the sink, none applied
        kill(executor_pid(ud))  # the executor performing all three dies mid-call
        for o in outcomes:
            assert gates[o].client_gone.wait(30), "the sink never saw its client go"
            wait_event(ud, runs[o], lambda e: e.kind == "effect_lost" and e.status == "waiting")
            passivated(ud, runs[o])
            assert ud.state(runs[o]).journal[CALL].status == "in_doubt"

        listed = _cli(ud, module_redis, "in-doubt")
        assert listed.returncode == 0, listed.stderr
        rows = sorted(ln.split("  ")[:3] for ln in listed.stdout.splitlines())
        assert rows == sorted([r, CALL, "http_post_once"] for r in runs.values()), listed.stdout

        checked = json.dumps({"status": 200, "body": json.dumps({"receipt": "checked by ops"})})
        for o, extra in (("done", [checked]), ("failed", ["it bounced"]), ("retry", [])):
            out = _cli(ud, module_redis, "resolve", runs[o], CALL, f"--{o}", *extra, "--by", "ops")
            assert out.returncode == 0, out.stderr
            assert f"{CALL} of {runs[o]} settled: {o} (by ops)" in out.stdout
        res = {o: ud.wait(runs[o], timeout=60) for o in outcomes}
        assert all(r.status == "finished" for r in res.values()), res

        # done: the model sees the output given, and nothing was sent again
        assert res["done"].answer == f"{items['done']}: HTTP 200, receipt checked by ops"
        # failed: the model is told it did not happen, and nothing was sent again
        assert res["failed"].answer == (f"{items['failed']}: not delivered: error: in doubt, "
                                        "settled as failed by ops: it bounced")
        for o in ("done", "failed"):
            assert sink.counts(items[o])["received"] == 1 and sink.counts(items[o])["applied"] == 0
        # retry: dispatched again with the same key, and this time delivered
        entry = ud.state(runs["retry"]).journal[CALL]
        assert entry.status == "done" and entry.attempt == 2
        assert res["retry"].answer == sink_answer(items["retry"], entry.result or "")
        assert res["retry"].answer.startswith(f"{items['retry']}: HTTP 200, receipt ")
        counts = sink.counts(items["retry"])
        assert (counts["received"], counts["applied"]) == (2, 1)
        assert [d.request_id for d in sink.deliveries(items["retry"])] == [entry.key] * 2

    for o in outcomes:
        settled = ud.state(runs[o]).journal[CALL]
        assert settled.resolution is not None and settled.resolution["by"] == "ops"
        assert settled.resolution["outcome"] == o and settled.resolution["at_ms"] > 0
        assert [e.kind for e in ud.history(runs[o])].count("resolve") == 1
    after = _cli(ud, module_redis, "in-doubt")
    assert after.returncode == 0 and after.stdout.strip() == "no tool call is in doubt"
    with pytest.raises(ApprovalError, match="is not in doubt"):
        ud.resolve(runs["done"], CALL, "retry", by="ops")
