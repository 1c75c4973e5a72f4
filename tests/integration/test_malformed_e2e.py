"""Malformed model replies through the whole path: `Undying.start` on a real local Ray and a
real redis-server, the research agent's model served over HTTP (OpenAI-compatible and
Anthropic wire formats) by the loopback `ProviderServer`, whose content faults spoil a reply.

Invalid JSON and bad tool arguments are covered in ``test_provider_faults_e2e``; here:

- a tool call naming a tool the agent does not have, and an empty reply (no text, no tool
  calls): the run records a ``model_failed`` step, the model's next request carries the
  error text, and the run finishes with the scripted answer;
- a provider that keeps spoiling replies: past ``Budgets.max_model_errors`` the run ends
  ``failed`` with a reason naming the count and the last problem, while a run started at
  the same time finishes normally.

In every case no pool actor died (same pids, no host counted a crash) and the supervisor
recorded no restart: a bad reply is data for the loop, never a crashed actor.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.integration import test_provider_faults_e2e as pfe
from tests.integration.test_backoff_passivation import pool_info
from undying import Undying
from undying.actors._retries import model_calls
from undying.actors.provider_server import ProviderServer
from undying.actors.research import agent as research

pytestmark = [pytest.mark.ray, pytest.mark.timeout(120)]

# the fixtures of the provider-fault tests (importing the module also sets its canary key in
# the environment before this module's Ray starts: the executors read it at call time)
pe_redis = pfe.pe_redis
ud = pfe.ud
reference = pfe.reference

TOLD = "error: your last reply could not be used: "
LABEL = {"openai": "openai model 'research'", "anthropic": "anthropic model 'research'"}


def problem(fault: str, provider: str, offered: Any) -> str:
    """What the model is told about ``fault`` (the start of it: an empty reply adds why)."""
    what = {"unknown_tool": "tool call 'frobnicate' names a tool that was not offered "
                            f"(offered: {', '.join(sorted(offered))})",
            "empty": "empty reply: no content and no tool calls"}[fault]
    return f"{TOLD}MalformedOutput: {LABEL[provider]}: {what}"


def pool_pids(ud: Undying) -> tuple[dict[str, int], int]:
    """Every pool actor's pid by name, and how many run crashes its hosts have counted."""
    infos = pool_info(ud)
    assert len(infos) == 4, sorted(infos)  # two hosts (the fixture's hosts_per_node) + two executors
    return ({name: i["pid"] for name, i in infos.items()},
            sum(i.get("crashed", 0) for i in infos.values()))


def told(conversation: Any) -> list[str]:
    """The error messages the model was shown (the server decodes them as user text)."""
    return [m.content for m in conversation if m.role == "user" and TOLD in m.content]


def assert_not_crashed(ud: Undying, run_id: str) -> None:
    assert ud.store.restarts(run_id) == []  # type: ignore[attr-defined]
    assert ud.store.last_crash(run_id) == ""  # type: ignore[attr-defined]


@pytest.mark.parametrize("fault", ["unknown_tool", "empty"])
def test_a_malformed_reply_is_shown_to_the_model_and_the_run_finishes(
        ud: Undying, reference: str, fault: str) -> None:
    before = pool_pids(ud)
    # the run's second model call (a conversation with tool results in it) is spoiled
    rules = [{"kind": fault, "first": 1, "after": 1, "path": pfe.PATH[p]} for p in pfe.PROVIDERS]
    with ProviderServer(api_key=pfe.CANARY, faults=rules) as server:
        handles = {p: ud.start(pfe.over_http(p, server), pfe.TASK) for p in pfe.PROVIDERS}
        for provider, h in handles.items():
            res = pfe.finished(ud, h.run_id, server)
            assert res.answer == reference
            state = ud.state(h.run_id)
            said = problem(fault, provider, state.context.tools)
            fired = [r.fault for r in server.records() if r.path == pfe.PATH[provider]]
            assert fired.count(fault) == 1 and fired[1] == fault, fired
            (bad,) = [c for c in model_calls(ud.store, h.run_id) if c.outcome == "failed"]
            assert bad.malformed and f"{TOLD}{bad.error}".startswith(said), bad
            assert [e.kind for e in h.history()].count("model_failed") == 1
            assert state.model_errors == 1
            (mine,) = told(state.conversation)
            assert mine.startswith(said), mine
            # what went over the wire afterwards: the run's last request carried it
            (sent,) = told(server.last_conversation(pfe.PATH[provider]))
            assert sent.startswith(said), sent
            assert ud.info(h.run_id).status == "finished"
            assert_not_crashed(ud, h.run_id)
    assert pool_pids(ud) == before


def test_past_max_model_errors_the_run_fails_cleanly_and_a_concurrent_run_finishes(
        ud: Undying, reference: str) -> None:
    limit = research.budgets.max_model_errors
    before = pool_pids(ud)
    # every reply spoiled, each kind in turn: arguments that are not JSON, an unknown tool,
    # then empty replies; they count against one budget
    rules = [r for p in pfe.PROVIDERS for r in (
        {"kind": "bad_args", "times": 1, "path": pfe.PATH[p]},
        {"kind": "unknown_tool", "times": 1, "path": pfe.PATH[p]},
        {"kind": "empty", "path": pfe.PATH[p]})]
    with ProviderServer(api_key=pfe.CANARY, faults=rules) as bad, \
            ProviderServer(api_key=pfe.CANARY) as good:
        doomed = {p: ud.start(pfe.over_http(p, bad), pfe.TASK) for p in pfe.PROVIDERS}
        healthy = ud.start(pfe.over_http("openai", good), pfe.TASK)
        for provider, h in doomed.items():
            res = h.result(timeout=60)
            assert res.status == "failed", res
            assert ud.info(h.run_id).status == "failed"  # not quarantined: a verdict, not damage
            last = problem("empty", provider, ()).removeprefix("error: ")
            expected = f"budget exceeded: malformed model turns {limit + 1} > {limit}, last: {last}"
            assert (res.error or "").startswith(expected), res.error
            # one request per turn, none after the verdict, none retried in the client
            fired = [r.fault for r in bad.records() if r.path == pfe.PATH[provider]]
            assert fired == ["bad_args", "unknown_tool"] + ["empty"] * (limit - 1), fired
            state = ud.state(h.run_id)
            assert state.model_errors == limit + 1 and state.pending == {}
            assert state.usage.retries == 0
            kinds = [e.kind for e in h.history()]
            assert kinds.count("model_failed") == limit + 1, kinds
            assert h.history()[-1].status == "failed"
            # the model was shown every problem but the last (after it there was no turn)
            assert len(told(state.conversation)) == limit + 1
            assert len(told(bad.last_conversation(pfe.PATH[provider]))) == limit
            assert_not_crashed(ud, h.run_id)
        res = pfe.finished(ud, healthy.run_id, good)
        assert res.answer == reference
        assert ud.state(healthy.run_id).model_errors == 0
        assert_not_crashed(ud, healthy.run_id)
    assert pool_pids(ud) == before
