"""The offline scripted model: a deterministic stand-in for a hosted LLM.

No weights can be downloaded here, so demos and tests use this: a scripted
policy reads the conversation and answers as a research agent would. It is a
*script*, not a language model, and is named as such everywhere it appears
(provider ``scripted``). The same conversation always gives the same reply,
which is what lets tests require an identical answer after any crash.

The ``research`` policy: plan sub-questions and search for each; read the
best documents; remember one finding per document; answer with citations.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from collections.abc import Callable
from typing import Any

from ._corpus import score, sentences, terms
from ._models import ModelRequest, ModelResponse, RateLimiter, estimate_tokens, register_provider
from ._state import ChatMessage, ModelSpec, ToolCallRequest

Policy = Callable[[tuple[ChatMessage, ...], list[dict[str, Any]]], ChatMessage]
POLICIES: dict[str, Policy] = {}


def policy(name: str) -> Callable[[Policy], Policy]:
    def register(fn: Policy) -> Policy:
        POLICIES[name] = fn
        return fn

    return register


class ScriptedModel:
    """Answers from a named policy after an optional simulated latency.

    ``latency_max_s``: when above ``latency_s``, each call waits a time between the two,
    drawn from a hash of the conversation (deterministic: the same call, the same wait).
    """

    def __init__(self, policy_name: str = "research", latency_s: float = 0.0,
                 latency_max_s: float | None = None) -> None:
        if policy_name not in POLICIES:
            raise ValueError(f"no scripted policy {policy_name!r}; have {sorted(POLICIES)}")
        self.policy = POLICIES[policy_name]
        self.latency_s = latency_s
        self.latency_max_s = latency_max_s

    def _latency(self, request: ModelRequest) -> float:
        lo, hi = self.latency_s, self.latency_max_s
        if hi is None or hi <= lo:
            return lo
        h = hashlib.sha1("".join(m.content for m in request.messages[-2:]).encode()).digest()
        return lo + (hi - lo) * (int.from_bytes(h[:4], "big") / 2**32)

    async def complete(self, request: ModelRequest) -> ModelResponse:
        wait = self._latency(request)
        if wait:
            await asyncio.sleep(wait)
        reply = self.policy(request.messages, request.tools)
        tin = sum(estimate_tokens(m.content) for m in request.messages)
        tout = estimate_tokens(reply.content + json.dumps([c.arguments for c in reply.tool_calls]))
        return ModelResponse(message=reply, tokens_in=tin, tokens_out=tout)


def _from_spec(spec: ModelSpec, *, limiter: RateLimiter | None = None) -> ScriptedModel:
    # a script has no provider to protect: the limiter is accepted and ignored
    top = spec.options.get("latency_max_s")
    return ScriptedModel(spec.name if spec.name != "default" else "research",
                         float(spec.options.get("latency_s", 0.0)),
                         None if top is None else float(top))


register_provider("scripted", _from_spec)


# -- the research policy --------------------------------------------------------


def _task(messages: tuple[ChatMessage, ...]) -> str:
    for m in messages:
        if m.role == "user":
            return m.content
    return ""


def sub_questions(question: str, limit: int = 3) -> list[str]:
    parts = [p.strip(" ?.") for p in re.split(r"\?|;|\band\b|,", question) if p.strip(" ?.")]
    parts = [p for p in parts if terms(p)]
    if not parts:
        return [question.strip() or "overview"]
    return parts[:limit]


def _calls(prefix: str, name: str, args: list[dict[str, Any]]) -> tuple[ToolCallRequest, ...]:
    return tuple(ToolCallRequest(id=f"{prefix}{i}", name=name, arguments=a)
                 for i, a in enumerate(args))


@policy("research")
def research(messages: tuple[ChatMessage, ...], tools: list[dict[str, Any]]) -> ChatMessage:
    question = _task(messages)
    turns = [m for m in messages if m.role == "assistant"]
    available = {t["name"] for t in tools}
    n = len(turns)
    if n == 0:
        plan = sub_questions(question)
        calls = []
        if "set_plan" in available:
            calls.append(ToolCallRequest(id="plan", name="set_plan", arguments={"steps": plan}))
        calls.extend(_calls("s", "search", [{"query": q} for q in plan]))
        return ChatMessage(role="assistant", content=f"Plan: {'; '.join(plan)}",
                           tool_calls=tuple(calls))
    last = turns[-1]
    last_names = {c.name for c in last.tool_calls}
    # tool results arrive in completion order; read them in call order so the
    # reply does not depend on which concurrent call finished first
    results = sorted((m for m in messages if m.role == "tool"), key=lambda m: m.tool_call_id or "")
    if "search" in last_names:
        docs: list[str] = []
        for m in results:
            if m.name == "search" and m.content.startswith("{"):
                for hit in json.loads(m.content).get("hits", [])[:2]:
                    if hit["doc"] not in docs:
                        docs.append(hit["doc"])
        if not docs:
            return ChatMessage(role="assistant",
                               content=f"I found nothing in the corpus about: {question}")
        return ChatMessage(role="assistant", content=f"Reading {', '.join(docs[:3])}.",
                           tool_calls=_calls("r", "read", [{"doc": d} for d in docs[:3]]))
    if "read" in last_names:
        read_ids = {c.id: c.arguments.get("doc", "") for c in last.tool_calls}
        notes = []
        for m in results:
            if m.name == "read" and m.tool_call_id in read_ids and not m.content.startswith("error"):
                best = max(sentences(m.content), key=lambda s: score(question, s), default="")
                if best:
                    notes.append({"key": read_ids[m.tool_call_id], "value": best})
        if notes and "remember" in available:
            return ChatMessage(role="assistant", content="Noting findings.",
                               tool_calls=_calls("n", "remember", notes))
        return _answer(question, notes)
    notes = [c.arguments for t in turns for c in t.tool_calls if c.name == "remember"]
    return _answer(question, notes)


def _answer(question: str, notes: list[dict[str, Any]]) -> ChatMessage:
    if not notes:
        return ChatMessage(role="assistant", content=f"I could not find an answer to: {question}")
    lines = [f"Answer to: {question}"]
    lines += [f"- {n['value']} [{n['key']}]" for n in notes]
    lines.append("Sources: " + ", ".join(sorted({n["key"] for n in notes})))
    return ChatMessage(role="assistant", content="\n".join(lines))


# -- the research lead: delegates each sub-question to a research sub-agent ---------------


@policy("research-lead")
def research_lead(messages: tuple[ChatMessage, ...], tools: list[dict[str, Any]]) -> ChatMessage:
    question = _task(messages)
    turns = [m for m in messages if m.role == "assistant"]
    if not turns:
        plan = sub_questions(question)
        if "delegate" not in {t["name"] for t in tools}:
            return ChatMessage(role="assistant", content=f"I cannot delegate: {question}")
        return ChatMessage(role="assistant", content=f"Delegating: {'; '.join(plan)}",
                           tool_calls=(ToolCallRequest(id="d0", name="delegate",
                                                       arguments={"tasks": plan, "wait": "all"}),))
    asked = [c.arguments.get("tasks", []) for t in turns for c in t.tool_calls
             if c.name == "delegate"]
    order = {task: i for i, task in enumerate(asked[-1] if asked else [])}
    answers: list[dict[str, Any]] = []
    for m in messages:
        if m.role == "tool" and m.name == "delegate":
            if m.content.startswith("{"):
                answers.extend(json.loads(m.content).get("results", []))
            else:
                return ChatMessage(role="assistant", content=f"Delegation failed: {m.content}")
    # children finish in any order: report them in the order they were asked
    answers.sort(key=lambda r: order.get(r.get("task", ""), len(order)))
    lines = [f"Answer to: {question}"]
    for r in answers:
        if r.get("status") == "finished":
            body = [ln for ln in str(r.get("answer", "")).splitlines() if ln.startswith("- ")]
            lines.append(f"* {r['task']}:")
            lines.extend(f"  {ln}" for ln in body or ["- (no finding)"])
        else:
            lines.append(f"* {r.get('task')}: sub-agent {r.get('status')}: {r.get('error', '')}")
    return ChatMessage(role="assistant", content="\n".join(lines))


# -- fan-out: a tree of sub-agents of a given width and depth (tests, benchmarks) ----------


def fanout_task(width: int, depth: int, label: str) -> str:
    return f"fanout {width} {depth} {label}"


@policy("fanout")
def fanout(messages: tuple[ChatMessage, ...], tools: list[dict[str, Any]]) -> ChatMessage:
    """Task "fanout W D label": with D > 0, delegate W tasks of depth D - 1 and wait for all;
    a leaf (D = 0) thinks once (a `remember`, which takes another model turn), then answers."""
    words = _task(messages).split()
    width, depth, label = int(words[1]), int(words[2]), words[3]
    turns = [m for m in messages if m.role == "assistant"]
    if depth > 0:
        if not turns:
            tasks = [fanout_task(width, depth - 1, f"{label}.{i}") for i in range(width)]
            return ChatMessage(role="assistant", content=f"delegating {width}",
                               tool_calls=(ToolCallRequest(id="d", name="delegate",
                                                           arguments={"tasks": tasks}),))
        results = [r for m in messages if m.role == "tool" and m.name == "delegate"
                   and m.content.startswith("{") for r in json.loads(m.content)["results"]]
        ok = sum(1 for r in results if r["status"] == "finished")
        return ChatMessage(role="assistant", content=f"{label}: {ok}/{width} sub-agents answered")
    if not turns:
        return ChatMessage(role="assistant", content="thinking", tool_calls=(ToolCallRequest(
            id="n", name="remember", arguments={"key": label, "value": "leaf"}),))
    return ChatMessage(role="assistant", content=f"{label}: leaf answer")
