"""Budgets flowing down a tree of sub-agents, and `delegate`'s wait "any" / first K, on a real
local Ray and redis-server.

- a parent whose children's usage (tokens, or dollars from a priced HTTP model) pushes it over
  its own budget fails with the reason, and its children still running are cancelled;
- a sub-agent at the depth limit, or a run at its fan-out limit, that asks to delegate gets
  an error its model sees, and nothing is spawned;
- a child's own wall-time budget ends the child (not its parent) when its timer fires;
- a group that waits for any one, or the first two, of three children resumes its parent
  once enough have finished, and the others end cancelled.

Children that must still be running when something happens wait for an approval nobody
gives (`_tree_agents`: the ``gate`` task), holding no process: no timing is guessed.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.integration._faults import pool_client
from tests.integration._tree_agents import http_model, root, task, walled
from tests.integration.test_approvals import _waiting_for_approval
from undying import Undying
from undying.actors import Budgets
from undying.actors.provider_server import ProviderServer
from undying.persistence import TERMINAL, RedisServer, RunInfo

pytestmark = [pytest.mark.ray, pytest.mark.timeout(120)]

PRICES = {"price_in_per_mtok": 0.0, "price_out_per_mtok": 1000.0}  # $1 per 1,000 tokens out


@pytest.fixture(scope="module")
def ud(ray_local: None, module_redis: RedisServer) -> Iterator[Undying]:
    with pool_client(module_redis.url, "tb", hosts_per_node=2,
                     policy={"max_restarts": 5, "window_s": 60, "backoff_base_s": 0.1}) as client:
        yield client


@pytest.fixture(scope="module")
def provider() -> Iterator[ProviderServer]:
    with ProviderServer(policy="tree") as server:
        yield server


def settled(ud: Undying, run_id: str, timeout: float = 30) -> dict[str, RunInfo]:
    """Wait until the run and every run below it ended: {run id: info}."""
    deadline = time.monotonic() + timeout
    while True:
        tree = ud.tree(run_id)
        if all(i.status in TERMINAL for _, i in tree):
            return {i.run_id: i for _, i in tree}
        assert time.monotonic() < deadline, [(i.run_id, i.status) for _, i in tree]
        time.sleep(0.05)


def children(ud: Undying, run_id: str) -> list[str]:
    """Every run created with this parent (from the run index, not the parent's ledger)."""
    return sorted(r.run_id for r in ud.runs() if r.parent == run_id)


def delegate_messages(ud: Undying, run_id: str) -> list[str]:
    return [m.content for m in ud.state(run_id).conversation
            if m.role == "tool" and m.name == "delegate"]


# -- budgets -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["tokens", "cost"])
def test_childrens_usage_over_the_parents_budget_fails_it_and_cancels_the_rest(
        ud: Undying, provider: ProviderServer, kind: str) -> None:
    if kind == "tokens":
        agent = root(Budgets(max_steps=50, max_tokens=2_000))
    else:  # every run of the tree on the priced HTTP model
        agent = root(Budgets(max_steps=50, max_cost_usd=0.5),
                     model=http_model(provider.url, **PRICES))
    # one child answers at once with ~3,000 tokens ($3); two wait on approvals meanwhile
    h = ud.start(agent, task("delegate", tasks=[task("big", chars=12_000), task("gate", what="a"),
                                                task("gate", what="b")]))
    res = h.result(timeout=60)
    assert res.status == "failed", (res.status, res.answer, res.error)
    state = ud.state(h.run_id)
    big, *gated = sorted(state.delegation.done) + sorted(state.delegation.pending)
    assert big.endswith("-0") and state.delegation.done == {big: "finished"}
    child = ud.state(big)
    if kind == "tokens":
        used = state.usage.tokens + child.usage.tokens
        assert res.error == f"budget exceeded: tokens {used} > 2000"
        assert child.usage.tokens > 2_000 and state.delegation.tokens == child.usage.tokens
    else:
        spent = state.usage.cost_usd + child.usage.cost_usd
        assert child.usage.cost_usd > 0.5 and state.delegation.cost_usd == child.usage.cost_usd
        assert res.error == f"budget exceeded: cost ${spent:.4f} > $0.5000"
    # the children still running when it failed are cancelled, and say why
    runs = settled(ud, h.run_id)
    assert len(runs) == 4 and children(ud, h.run_id) == sorted([big, *gated])
    for c in gated:
        assert runs[c].status == "cancelled", runs[c]
        assert ud.state(c).error == f"parent {h.run_id} failed"
        assert ud.approvals(c) == [] and ud.ledger(c) == {}  # nothing left to approve or run


def test_a_sub_agent_at_the_depth_limit_is_told_so_and_spawns_nothing(ud: Undying) -> None:
    agent = root(Budgets(max_steps=50, max_depth=1))
    grandchild = task("answer", text="too deep")
    h = ud.start(agent, task("delegate", tasks=[task("delegate", tasks=[grandchild])]))
    res = h.result(timeout=60)
    assert res.status == "finished", res.error
    [child] = children(ud, h.run_id)
    cs = ud.state(child)
    assert (cs.status, cs.context.depth, cs.context.budgets.max_depth) == ("finished", 1, 1)
    # its model saw the error as the delegate call's result, and answered from it
    said = "error: delegation depth limit reached (this run is at depth 1, at most 1)"
    assert [m[:len(said)] for m in delegate_messages(ud, child)] == [said]
    assert cs.result is not None and cs.result.startswith(f"delegated: {said}")
    assert cs.delegation.spawned == 0 and children(ud, child) == []
    # and the root got the child's answer
    [row] = json.loads(delegate_messages(ud, h.run_id)[0])["results"]
    assert row["status"] == "finished" and row["answer"] == cs.result
    assert len(settled(ud, h.run_id)) == 2


def test_a_fan_out_over_max_children_is_refused_and_the_model_delegates_less(
        ud: Undying) -> None:
    agent = root(Budgets(max_steps=50, max_children=2))
    three = [task("answer", text=f"t{i}") for i in range(3)]
    h = ud.start(agent, task("delegate", tasks=three, fallback=three[:2]))
    res = h.result(timeout=60)
    assert res.status == "finished", res.error
    refused, granted = delegate_messages(ud, h.run_id)
    assert refused == ("error: fan-out budget: 0 sub-agents spawned of at most 2; "
                       "3 more is too many")
    answers = sorted(r["answer"] for r in json.loads(granted)["results"])
    assert answers == ["answer: t0", "answer: t1"]
    state = ud.state(h.run_id)
    assert state.delegation.spawned == 2 and len(children(ud, h.run_id)) == 2
    assert res.answer == f"delegated: {refused} | {granted}"


def test_a_childs_own_wall_time_ends_the_child_not_its_parent(ud: Undying) -> None:
    agent = root(subagent=walled)  # the parent has no wall-time budget; its child has 1 s
    t0 = time.monotonic()
    h = ud.start(agent, task("delegate", tasks=[task("gate", what="forever")]))
    res = h.result(timeout=60)
    took = time.monotonic() - t0
    assert res.status == "finished", res.error
    [child] = children(ud, h.run_id)
    cs = ud.state(child)
    assert ud.state(h.run_id).context.deadline_ms is None
    assert cs.context.deadline_ms == cs.context.created_ms + 1000
    assert (cs.status, cs.error) == ("failed", "budget exceeded: wall time of 1.0s")
    assert any(e.kind == "timer" for e in ud.history(child))
    assert took < 8, f"the child's deadline ended it {took:.1f}s after the start"
    [row] = json.loads(delegate_messages(ud, h.run_id)[0])["results"]
    assert (row["status"], row["error"]) == ("failed", "budget exceeded: wall time of 1.0s")


# -- wait any / first K ----------------------------------------------------------------------


@pytest.mark.parametrize("wait, fast", [("any", 1), (2, 2)])
def test_wait_any_or_first_k_resumes_the_parent_and_cancels_the_rest(
        ud: Undying, wait: Any, fast: int) -> None:
    tasks = [task("answer", text=f"f{i}") for i in range(fast)]
    tasks += [task("gate", what=f"s{i}") for i in range(3 - fast)]
    h = ud.start(root(), task("delegate", tasks=tasks, wait=wait))
    res = h.result(timeout=60)
    assert res.status == "finished", res.error
    kids = children(ud, h.run_id)
    assert len(kids) == 3
    answered, slow = kids[:fast], kids[fast:]
    [content] = delegate_messages(ud, h.run_id)
    report = json.loads(content)
    assert sorted(r["run_id"] for r in report["results"]) == answered
    assert sorted(r["answer"] for r in report["results"]) == [f"answer: f{i}" for i in range(fast)]
    assert sorted(report["cancelled"]) == slow and report["still_running"] == []
    runs = settled(ud, h.run_id)
    assert [runs[c].status for c in answered] == ["finished"] * fast
    for c in slow:
        assert runs[c].status == "cancelled"
        assert ud.state(c).error == f"parent {h.run_id} has the {fast} result(s) it waited for"
        assert ud.approvals(c) == [] and ud.ledger(c) == {}
    # the model went on once, after the group resolved: one delegate result, one answer
    assert res.answer == f"delegated: {content}"
    assert sum(1 for e in ud.history(h.run_id) if e.kind == "model_reply") == 2


def test_a_gated_child_waits_holding_no_process(ud: Undying) -> None:
    """What the tests above rely on: a ``gate`` child waits for its approval, passivated."""
    h = ud.start(root(), task("delegate", tasks=[task("gate", what="x")]))
    deadline = time.monotonic() + 30
    while not children(ud, h.run_id):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    [child] = children(ud, h.run_id)
    row = _waiting_for_approval(ud, child)
    assert ud.info(child).status == "waiting" and ud.info(h.run_id).status == "waiting"
    ud.approve(child, row.call_id, by="tests", args_hash=row.args_hash)
    res = h.result(timeout=60)
    assert res.status == "finished", res.error
    assert ud.state(child).result == "held: held x"
