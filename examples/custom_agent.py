"""A user-defined agent end to end: your own tools, your own scripted policy, durable runs.

    python -m examples.custom_agent        (from the repository root)

Agents and tools live at module level in an importable module: a checkpoint
names the agent as "examples.custom_agent:agent", and any node with this module
installed can resume the run.
"""

from __future__ import annotations

import json

import undying
from undying.actors import ChatMessage, ToolCallRequest
from undying.testing import policy


@undying.tool(side_effect="idempotent")
def convert(amount: float, rate: float) -> str:
    """Convert an amount with an exchange rate."""
    return json.dumps({"result": round(amount * rate, 2)})


@undying.tool(side_effect="keyed")
def record_invoice(customer: str, total: float, ctx: undying.ToolContext) -> str:
    """Record an invoice. Keyed: a retry after a crash reuses ctx.key, so the
    ledger it writes to can drop the duplicate."""
    return json.dumps({"invoice": ctx.key, "customer": customer, "total": total})


@policy("invoicer")
def invoicer(messages, tools):  # type: ignore[no-untyped-def]
    """A scripted stand-in for an LLM: convert, then record, then answer."""
    done = [m for m in messages if m.role == "tool"]
    if not done:
        return ChatMessage(role="assistant", tool_calls=(
            ToolCallRequest(id="c1", name="convert", arguments={"amount": 120, "rate": 0.92}),))
    if len(done) == 1:
        total = json.loads(done[0].content)["result"]
        return ChatMessage(role="assistant", tool_calls=(
            ToolCallRequest(id="c2", name="record_invoice",
                            arguments={"customer": "ACME", "total": total}),))
    return ChatMessage(role="assistant", content=f"Invoice recorded: {done[-1].content}")


agent = undying.Agent(
    "invoicer",
    version="1",
    instructions="Convert the amount to EUR and record an invoice.",
    model="scripted:invoicer",
    tools=[convert, record_invoice],
    budgets=undying.Budgets(max_steps=20),
)


def main() -> None:
    ud = undying.connect()
    run = ud.start(agent, "Invoice ACME for 120 USD in EUR")
    result = run.result(timeout=60)
    print(result.status, "-", result.answer)
    for e in run.history():
        print(f"  step {e.step} {e.kind:<12} {e.summary}")


if __name__ == "__main__":
    main()
