"""Agents for the tree, reconcile and approval tests on Ray (importable by every worker).

One scripted policy, ``tree``, reads its task as JSON and does what it says:

- ``{"do": "answer", "text": T}``: answers ``answer: T`` at once;
- ``{"do": "big", "chars": N}``: answers N characters at once (N/4 tokens out);
- ``{"do": "gate", "what": W}``: calls ``hold`` (which always needs someone's approval),
  then answers ``held: <what the tool said>``;
- ``{"do": "delegate", "tasks": [...], "wait": "all" | "any" | K, "fallback": [...]}``:
  delegates the tasks (each a task of this grammar); if the model is told an error and
  there is a fallback, it delegates the fallback instead; then answers
  ``delegated: <every delegate message it saw, joined by " | ">``.

A run that waits on ``hold`` holds no process and never ends by itself: the tests use it
as a sub-agent that is still running when they need one.
"""

from __future__ import annotations

import json
from typing import Any

from undying.actors import Agent, Budgets, ChatMessage, ModelSpec, ToolCallRequest, tool
from undying.actors.scripted import policy

REF = "tests.integration._tree_agents"


def task(do: str, **fields: Any) -> str:
    return json.dumps({"do": do, **fields}, sort_keys=True)


@tool(side_effect="keyed", approval="always")
def hold(what: str) -> str:
    """Do something that someone must approve first (a test double)."""
    return f"held {what}"


@policy("tree")
def _tree(messages: tuple[ChatMessage, ...], tools: list[dict[str, Any]]) -> ChatMessage:
    spec = json.loads(next(m.content for m in messages if m.role == "user"))
    results = [m for m in messages if m.role == "tool"]
    do = spec["do"]
    if do == "answer":
        return ChatMessage(role="assistant", content=f"answer: {spec['text']}")
    if do == "big":
        return ChatMessage(role="assistant", content="x" * int(spec["chars"]))
    if do == "gate":
        if not results:
            return ChatMessage(role="assistant", content="asking", tool_calls=(
                ToolCallRequest(id="h", name="hold", arguments={"what": spec["what"]}),))
        return ChatMessage(role="assistant", content=f"held: {results[-1].content}")
    if do == "delegate":
        tried = [m for m in results if m.name == "delegate"]
        if not tried or (len(tried) == 1 and tried[0].content.startswith("error")
                         and spec.get("fallback")):
            tasks = spec["tasks"] if not tried else spec["fallback"]
            return ChatMessage(role="assistant", content="delegating", tool_calls=(
                ToolCallRequest(id=f"d{len(tried)}", name="delegate",
                                arguments={"tasks": tasks, "wait": spec.get("wait", "all")}),))
        return ChatMessage(role="assistant",
                           content="delegated: " + " | ".join(m.content for m in tried))
    return ChatMessage(role="assistant", content=f"unknown task {do!r}")


SCRIPTED = ModelSpec(provider="scripted", name="tree")

# delegates to itself (the tests give roots other budgets, with this same ref)
tree = Agent("tree", version="1", model=SCRIPTED, tools=[hold], memory=False,
             subagent=f"{REF}:tree", budgets=Budgets(max_steps=50), ref=f"{REF}:tree")

# a sub-agent with a wall-time budget of its own (no parent gives it one)
walled = Agent("walled", version="1", model=SCRIPTED, tools=[hold], memory=False,
               budgets=Budgets(max_steps=50, max_wall_s=1.0), ref=f"{REF}:walled")


def root(budgets: Budgets | None = None, *, model: ModelSpec | None = None,
         subagent: Agent | None = None) -> Agent:
    """A root of the tree with its own budgets and model (a run's context is taken from
    this object; workers load the tools and the policy through the ref)."""
    return Agent("tree", version="1", model=model or SCRIPTED, tools=[hold], memory=False,
                 subagent=subagent or f"{REF}:tree", subagent_model=model,
                 budgets=budgets or Budgets(max_steps=50), ref=f"{REF}:tree")


def http_model(base_url: str, **prices: float) -> ModelSpec:
    """The ``tree`` policy behind the loopback provider server (OpenAI wire), priced."""
    return ModelSpec(provider="openai", name="tree", base_url=base_url + "/v1",
                     options={"timeout_s": 10.0, "max_attempts": 2, "backoff_base_s": 0.02,
                              **prices})
