"""The demo's research agent: plans sub-questions, searches and reads the bundled
corpus, notes findings in its memory and answers with citations.

Its model defaults to the offline scripted model (``scripted:research``).
"""

from __future__ import annotations

from ._agent import Agent
from ._corpus import read, search
from ._state import Budgets

INSTRUCTIONS = (
    "You are a research agent. Break the question into sub-questions, search the corpus "
    "for each, read the most relevant documents, note one finding per document with "
    "`remember`, and answer citing document ids in square brackets."
)

agent = Agent(
    "research",
    version="1",
    instructions=INSTRUCTIONS,
    model="scripted:research",
    tools=[search, read],
    budgets=Budgets(max_steps=60),
    ref="undying.actors.research:agent",
)


def slow_agent(latency_s: float) -> Agent:
    """The same agent with a simulated model latency (tests and benchmarks)."""
    from ._state import ModelSpec

    return Agent("research", version="1", instructions=INSTRUCTIONS,
                 model=ModelSpec(provider="scripted", name="research",
                                 options={"latency_s": latency_s}),
                 tools=[search, read], budgets=Budgets(max_steps=60),
                 ref="undying.actors.research:agent")


LEAD_INSTRUCTIONS = (
    "You are a research lead. Break the question into sub-questions, delegate each to a "
    "research sub-agent with `delegate`, wait for all of them, and combine their answers."
)

lead = Agent(
    "research-lead",
    version="1",
    instructions=LEAD_INSTRUCTIONS,
    model="scripted:research-lead",
    memory=False,
    subagent=agent,
    budgets=Budgets(max_steps=20, max_children=10, max_depth=1),
    ref="undying.actors.research:lead",
)


def slow_lead(latency_s: float) -> Agent:
    """The lead and its sub-agents with a simulated model latency (demo, tests, benchmarks)."""
    from ._state import ModelSpec

    return Agent("research-lead", version="1", instructions=LEAD_INSTRUCTIONS,
                 model=ModelSpec(provider="scripted", name="research-lead",
                                 options={"latency_s": latency_s}),
                 memory=False, subagent=agent, budgets=lead.budgets,
                 subagent_model=ModelSpec(provider="scripted", name="research",
                                          options={"latency_s": latency_s}),
                 ref="undying.actors.research:lead")
