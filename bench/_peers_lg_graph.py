"""The LangGraph side of `python -m bench.peers`: an agent node and a tools node.

A module of its own, without ``from __future__ import annotations``: LangGraph reads the
nodes' type hints (``MessagesState``, ``RunnableConfig``) at compile time.
"""

from typing import Any

from langchain_core.messages import AIMessage, ToolMessage
from langchain_core.runnables import RunnableConfig
from langgraph.graph import END, START, MessagesState, StateGraph

from . import _peers_workload as W


def agent(state: MessagesState) -> dict[str, Any]:
    msgs = state["messages"]
    # the conversation is [human, (ai, tool) * k]: k steps are done
    n, tag = W.parse_task(str(msgs[0].content))
    content, call = W.model_turn((len(msgs) - 1) // 2, n, tag)
    if call is None:
        return {"messages": [AIMessage(content=content)]}
    return {"messages": [AIMessage(content=content, tool_calls=[
        {"id": call["id"], "name": call["name"], "args": call["args"]}])]}


def tools(state: MessagesState, config: RunnableConfig) -> dict[str, Any]:
    call = state["messages"][-1].tool_calls[0]  # type: ignore[attr-defined]
    k = int(call["args"]["k"])
    W.maybe_crash(k, config["configurable"]["thread_id"])
    return {"messages": [ToolMessage(content=W.tool_result(k), tool_call_id=call["id"],
                                     name=call["name"])]}


def route(state: MessagesState) -> str:
    return "tools" if state["messages"][-1].tool_calls else END  # type: ignore[attr-defined]


def graph() -> StateGraph:
    g = StateGraph(MessagesState)
    g.add_node("agent", agent)
    g.add_node("tools", tools)
    g.add_edge(START, "agent")
    g.add_conditional_edges("agent", route, ["tools", END])
    g.add_edge("tools", "agent")
    return g
