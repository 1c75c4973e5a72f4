"""The server side of both wire formats, for `provider_server`.

Written from the APIs' documentation independently of the client modules
(`openai_compat`, `anthropic`) on purpose: a mapping bug shared by client and
server would otherwise round-trip unnoticed. Requests are checked for what the
real APIs refuse (roles out of order, a tool result for a call never made,
no ``max_tokens``); a violation is a `WireError`, answered with HTTP 400.
"""

from __future__ import annotations

import json
import time
from typing import Any

from ._models import estimate_tokens
from ._state import ChatMessage, ToolCallRequest

OPENAI = "/v1/chat/completions"
ANTHROPIC = "/v1/messages"


class WireError(ValueError):
    """A request the real API would refuse with 400; the message says why."""


def _need(cond: bool, why: str) -> None:
    if not cond:
        raise WireError(why)


# -- requests: wire -> (model, conversation, tools) -------------------------------


def openai_request(body: dict[str, Any]) -> tuple[str, tuple[ChatMessage, ...], list[dict[str, Any]]]:
    _need(isinstance(body.get("model"), str), "model: required string")
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise WireError("messages: required non-empty list")
    names: dict[str, str] = {}  # tool call id -> tool name, from the assistant turns so far
    out: list[ChatMessage] = []
    for i, m in enumerate(raw):
        _need(isinstance(m, dict) and m.get("role") in ("system", "user", "assistant", "tool"),
              f"messages[{i}]: role must be system, user, assistant or tool")
        role, content = m["role"], m.get("content")
        if role == "tool":
            cid = m.get("tool_call_id")
            _need(cid in names, f"messages[{i}]: tool_call_id {cid!r} answers no earlier tool call")
            out.append(ChatMessage(role="tool", content=str(content or ""), tool_call_id=cid,
                                   name=names[cid]))
            continue
        calls = []
        for j, c in enumerate(m.get("tool_calls") or []):
            _need(role == "assistant", f"messages[{i}]: only assistant messages have tool_calls")
            fn = c.get("function") or {}
            _need(isinstance(fn.get("arguments"), str),
                  f"messages[{i}].tool_calls[{j}].function.arguments: must be a JSON string")
            try:
                args = json.loads(fn["arguments"])
            except ValueError as exc:
                raise WireError(f"messages[{i}].tool_calls[{j}].function.arguments: {exc}") from None
            names[c["id"]] = fn["name"]
            calls.append(ToolCallRequest(id=c["id"], name=fn["name"], arguments=args))
        _need(content is None or isinstance(content, str), f"messages[{i}].content: must be a string")
        out.append(ChatMessage(role=role, content=content or "", tool_calls=tuple(calls),
                               name=m.get("name")))
    tools = []
    for t in body.get("tools") or []:
        _need(t.get("type") == "function" and isinstance(t.get("function"), dict),
              "tools: each must be {'type': 'function', 'function': {...}}")
        fn = t["function"]
        tools.append({"name": fn["name"], "description": fn.get("description", ""),
                      "parameters": fn.get("parameters", {})})
    return body["model"], tuple(out), tools


def anthropic_request(body: dict[str, Any],
                      headers: dict[str, str]) -> tuple[str, tuple[ChatMessage, ...], list[dict[str, Any]]]:
    _need("anthropic-version" in headers, "anthropic-version: header required")
    _need(isinstance(body.get("model"), str), "model: required string")
    _need(isinstance(body.get("max_tokens"), int), "max_tokens: required integer")
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise WireError("messages: required non-empty list")
    out: list[ChatMessage] = []
    system = body.get("system")
    if isinstance(system, list):
        system = "".join(b.get("text", "") for b in system)
    if system:
        out.append(ChatMessage(role="system", content=system))
    names: dict[str, str] = {}  # tool_use ids of the previous assistant turn
    for i, turn in enumerate(raw):
        want = "user" if i % 2 == 0 else "assistant"
        _need(turn.get("role") == want, f"messages[{i}]: roles must alternate, starting with "
              f"user; expected {want}")
        blocks = turn.get("content")
        if isinstance(blocks, str):
            blocks = [{"type": "text", "text": blocks}]
        if not isinstance(blocks, list) or not blocks:
            raise WireError(f"messages[{i}].content: required")
        texts: list[str] = []
        calls: list[ToolCallRequest] = []
        answered = set()
        for j, b in enumerate(blocks):
            kind = b.get("type")
            if kind == "text":
                _need(bool(b.get("text")), f"messages[{i}].content[{j}]: text blocks must be non-empty")
                texts.append(b["text"])
            elif kind == "tool_use" and want == "assistant":
                _need(isinstance(b.get("input"), dict), f"messages[{i}].content[{j}].input: object")
                calls.append(ToolCallRequest(id=b["id"], name=b["name"], arguments=b["input"]))
            elif kind == "tool_result" and want == "user":
                tid = b.get("tool_use_id")
                _need(tid in names, f"messages[{i}].content[{j}]: tool_use_id {tid!r} is not a "
                      "tool_use of the previous assistant turn")
                _need(not texts, f"messages[{i}].content[{j}]: tool_result blocks come first")
                answered.add(tid)
                out.append(ChatMessage(role="tool", content=_result_text(b.get("content")),
                                       tool_call_id=tid, name=names[tid]))
            else:
                raise WireError(f"messages[{i}].content[{j}]: unexpected block {kind!r} in a {want} turn")
        if want == "user":
            _need(answered == set(names), f"messages[{i}]: tool_use ids {sorted(set(names) - answered)} "
                  "have no tool_result")
            # the client merges consecutive user messages into one turn, a text block each
            out.extend(ChatMessage(role="user", content=t) for t in texts)
            names = {}
        else:
            out.append(ChatMessage(role="assistant", content="".join(texts), tool_calls=tuple(calls)))
            names = {c.id: c.name for c in calls}
    tools = [{"name": t["name"], "description": t.get("description", ""),
              "parameters": t.get("input_schema", {})} for t in body.get("tools") or []]
    return body["model"], tuple(out), tools


def _result_text(content: Any) -> str:
    if isinstance(content, list):
        return "".join(b.get("text", "") for b in content if isinstance(b, dict))
    return str(content or "")


# -- replies: ChatMessage -> wire ---------------------------------------------------


def usage(messages: tuple[ChatMessage, ...], reply: ChatMessage) -> tuple[int, int]:
    """The scripted model's own token count, so both paths report the same usage."""
    tin = sum(estimate_tokens(m.content) for m in messages)
    tout = estimate_tokens(reply.content + json.dumps([c.arguments for c in reply.tool_calls]))
    return tin, tout


def openai_reply(model: str, n: int, reply: ChatMessage, tokens: tuple[int, int],
                 raw_args: dict[str, str] | None = None) -> dict[str, Any]:
    """``raw_args``: call id -> the arguments string to send instead (fault injection)."""
    raw_args = raw_args or {}
    msg: dict[str, Any] = {"role": "assistant", "content": reply.content or None}
    if reply.tool_calls:
        msg["tool_calls"] = [{"id": c.id, "type": "function", "function": {
            "name": c.name, "arguments": raw_args.get(c.id, json.dumps(c.arguments))}}
            for c in reply.tool_calls]
    return {"id": f"chatcmpl-{n}", "object": "chat.completion", "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0, "message": msg,
                         "finish_reason": "tool_calls" if reply.tool_calls else "stop"}],
            "usage": {"prompt_tokens": tokens[0], "completion_tokens": tokens[1],
                      "total_tokens": sum(tokens)}}


def anthropic_reply(model: str, n: int, reply: ChatMessage, tokens: tuple[int, int],
                    raw_args: dict[str, Any] | None = None) -> dict[str, Any]:
    raw_args = raw_args or {}
    content: list[dict[str, Any]] = []
    if reply.content:
        content.append({"type": "text", "text": reply.content})
    content += [{"type": "tool_use", "id": c.id, "name": c.name,
                 "input": raw_args.get(c.id, c.arguments)} for c in reply.tool_calls]
    return {"id": f"msg_{n:08d}", "type": "message", "role": "assistant", "model": model,
            "content": content, "stop_reason": "tool_use" if reply.tool_calls else "end_turn",
            "stop_sequence": None,
            "usage": {"input_tokens": tokens[0], "output_tokens": tokens[1]}}


_ANTHROPIC_ERRORS = {400: "invalid_request_error", 401: "authentication_error",
                     403: "permission_error", 404: "not_found_error", 429: "rate_limit_error",
                     529: "overloaded_error"}


def error_body(path: str, status: int, message: str) -> dict[str, Any]:
    if path == ANTHROPIC:
        return {"type": "error",
                "error": {"type": _ANTHROPIC_ERRORS.get(status, "api_error"), "message": message}}
    kind = "rate_limit_exceeded" if status == 429 else ("server_error" if status >= 500
                                                        else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "code": status}}
