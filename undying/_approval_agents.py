"""Agents for approval tests and examples (importable by every worker: they live in the package).

``payer``: pays 500 cents, then 700 cents (different arguments: each needs its own
approval, since both are over the limit of 100 that its `pay` tool asks approval for),
then answers. A rejection is reported in the answer.
"""

from __future__ import annotations

from typing import Any

from undying.actors import Agent, Budgets, ChatMessage, ModelSpec, ToolCallRequest, tool
from undying.actors.scripted import policy


def _over_100(args: dict[str, Any]) -> bool:
    return int(args["cents"]) > 100


@tool(side_effect="at_most_once", approval=_over_100)
def pay(cents: int, to: str) -> str:
    """Move money (a test double: the tool ledger counts its executions)."""
    return f"paid {cents} cents to {to}"


@policy("payer")
def _payer(messages: tuple[ChatMessage, ...], tools: list[dict[str, Any]]) -> ChatMessage:
    results = [m for m in messages if m.role == "tool"]
    if not results:
        return ChatMessage(role="assistant", content="paying", tool_calls=(
            ToolCallRequest(id="p1", name="pay", arguments={"cents": 500, "to": "alice"}),))
    if results[-1].content.startswith("error"):
        return ChatMessage(role="assistant", content=f"payment refused: {results[-1].content}")
    if len(results) == 1:
        return ChatMessage(role="assistant", content="paying again", tool_calls=(
            ToolCallRequest(id="p2", name="pay", arguments={"cents": 700, "to": "alice"}),))
    return ChatMessage(role="assistant", content="; ".join(m.content for m in results))


payer = Agent("payer", version="1", model=ModelSpec(provider="scripted", name="payer"),
              tools=[pay], memory=False, budgets=Budgets(max_steps=40),
              ref="undying._approval_agents:payer")


@policy("payer-small")
def _payer_small(messages: tuple[ChatMessage, ...], tools: list[dict[str, Any]]) -> ChatMessage:
    results = [m for m in messages if m.role == "tool"]
    if not results:
        return ChatMessage(role="assistant", content="paying", tool_calls=(
            ToolCallRequest(id="p1", name="pay", arguments={"cents": 50, "to": "bob"}),))
    return ChatMessage(role="assistant", content=f"done: {results[-1].content}")


# pays 50 cents (under the approval limit) once: a call that can be left in doubt
small_payer = Agent("small-payer", version="1",
                    model=ModelSpec(provider="scripted", name="payer-small"), tools=[pay],
                    memory=False, budgets=Budgets(max_steps=20),
                    ref="undying._approval_agents:small_payer")
