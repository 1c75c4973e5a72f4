"""A parent restarted after an activation that died gets a child's result from the child's
checkpoint (`RunEngine._recover` -> `_reconcile_children`), on a real local Ray and
redis-server, and applies it exactly once.

The fault, aimed by events rather than timing: the parent waits (passivated) for a child
that waits for an approval. The test then takes the parent's lease itself, as a host that
is about to die would (the store's own `activate`, with a new epoch), and approves the
child. The child finishes; its result reaches the parent's inbox while "its host" holds it,
so nothing queues the parent. The test deletes that inbox entry (the message the parent
never got) — or, in the other case, leaves it — and lets the lease lapse, as a dead host's
does. The supervisor restarts the parent from its checkpoint; the activation is unclean, so
it asks its pending children, finds the finished one, and delivers its result itself.

The whole tree runs on the loopback HTTP provider with prices, so the child's tokens and
dollars both have to reach the parent's delegation totals.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from tests.integration._faults import pool_client
from tests.integration._tree_agents import http_model, root, task
from tests.integration.test_approvals import _waiting_for_approval
from undying import Undying
from undying.actors import ChildResult
from undying.actors._state import Envelope
from undying.persistence import RedisServer, unpack, validate
from undying.persistence._keys import _k

pytestmark = [pytest.mark.ray, pytest.mark.timeout(120)]

PRICES = {"price_in_per_mtok": 3.0, "price_out_per_mtok": 15.0}
DEAD_OWNER = "test-host#gone|no-node|0"  # pid 0: nothing for anyone to kill


@pytest.fixture(scope="module")
def ud(ray_local: None, module_redis: RedisServer) -> Iterator[Undying]:
    with pool_client(module_redis.url, "rc", hosts_per_node=2,
                     policy={"max_restarts": 5, "window_s": 60, "backoff_base_s": 0.1}) as client:
        yield client


@pytest.fixture(scope="module")
def provider() -> Iterator[object]:
    from undying.actors.provider_server import ProviderServer

    with ProviderServer(policy="tree") as server:
        yield server


def child_results(ud: Undying, run_id: str) -> list[tuple[str, ChildResult]]:
    """The child results in the run's inbox: (entry id, message)."""
    out = []
    for e in ud.store.read_inbox(run_id, "0-0", 1000):
        msg = validate("message", Envelope, unpack("message", e.data, run_id=run_id),
                       run_id=run_id).message
        if isinstance(msg, ChildResult):
            out.append((e.entry_id, msg))
    return out


def _id(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq)


def passivated_waiting(ud: Undying, run_id: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while ud.actor_info(run_id) is not None or ud.info(run_id).status != "waiting":
        assert time.monotonic() < deadline, (ud.info(run_id), ud.actor_info(run_id))
        time.sleep(0.02)


@pytest.mark.parametrize("lost", [True, False], ids=["result-lost", "result-kept"])
def test_a_restarted_parent_reconciles_a_finished_child_from_its_checkpoint(
        ud: Undying, provider: object, lost: bool) -> None:
    spec = http_model(provider.url, **PRICES)  # type: ignore[attr-defined]
    h = ud.start(root(model=spec), task("delegate", tasks=[task("gate", what="r")]))
    parent = h.run_id
    deadline = time.monotonic() + 30
    while not ud.state(parent).delegation.pending:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    [child] = ud.state(parent).delegation.pending
    approval = _waiting_for_approval(ud, child)
    passivated_waiting(ud, parent)

    # a host takes the parent (a new epoch; from now on its activation is unclean)...
    act = ud.store.activate(parent, "test-host#gone", DEAD_OWNER, 60_000)  # type: ignore[attr-defined]
    assert act is not None and act.clean and act.step == ud.info(parent).step
    # ... and meanwhile the child finishes: its result goes to the held parent's inbox
    ud.approve(child, approval.call_id, by="tests", args_hash=approval.args_hash)
    assert ud.wait(child, timeout=60).status == "finished"
    deadline = time.monotonic() + 30
    while not child_results(ud, parent):
        assert time.monotonic() < deadline, "the child's result never reached the parent's inbox"
        time.sleep(0.02)
    [(entry, sent)] = child_results(ud, parent)
    assert ud.store.lease_owner(parent) == f"{act.epoch}|{DEAD_OWNER}"  # type: ignore[attr-defined]
    assert not ud.store.is_queued(parent)  # type: ignore[attr-defined]
    if lost:
        ud.store.r.xdel(_k(parent, "inbox"), entry)  # type: ignore[attr-defined]
        assert child_results(ud, parent) == []
    # the host dies: it stops renewing, and its lease lapses
    ud.store.renew_lease(parent, act.epoch, DEAD_OWNER, 1)  # type: ignore[attr-defined]

    res = h.result(timeout=60)
    assert res.status == "finished", res.error
    history = ud.history(parent)
    assert sum(1 for e in history if e.kind == "restart") == 1, [e.kind for e in history]
    assert sum(1 for e in history if e.kind == "child_result") == 1, [e.kind for e in history]
    # the result it applied came from the child's checkpoint (it is in the inbox after the
    # restart); the one relayed before it, if kept, was the same message, applied once
    inbox = child_results(ud, parent)
    assert len(inbox) == (1 if lost else 2) and _id(inbox[-1][0]) > _id(entry)
    assert {m.id for _, m in inbox} == {f"result:{child}"}
    assert inbox[-1][1] == sent  # the checkpoint tells what the relayed message told

    cs, ps = ud.state(child), ud.state(parent)
    assert ps.delegation.done == {child: "finished"} and not ps.delegation.pending
    assert ps.delegation.tokens == cs.usage.tokens > 0
    assert ps.delegation.cost_usd == cs.usage.cost_usd > 0
    assert ps.delegation.steps == cs.step
    assert res.tokens == ps.usage.tokens + cs.usage.tokens
    assert res.answer is not None and '"answer": "held: held r"' in res.answer
    assert sum(ud.ledger(child).values()) == 1  # the child's approved call ran once
