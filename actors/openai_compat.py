"""Provider ``openai``: the OpenAI-compatible chat completions API over httpx.

One wire format covers OpenAI itself and the servers that copy it (vLLM,
llama.cpp server, Ollama, most hosted models): ``POST {base_url}/chat/completions``
with ``tools`` in, ``tool_calls`` out. ``base_url`` includes the version
segment, as in OpenAI's own clients: ``https://api.openai.com/v1``,
``http://localhost:11434/v1``.

    ModelSpec(provider="openai", name="gpt-4o-mini", api_key=SecretRef(env="OPENAI_API_KEY"),
              options={"rpm": 500, "tpm": 200_000, "price_in_per_mtok": 0.15,
                       "price_out_per_mtok": 0.6})
"""

from __future__ import annotations

import json
from typing import Any

from ._http import HttpProvider
from ._models import MalformedOutput, ModelRequest, ProviderError, RateLimiter, estimate_tokens
from ._state import ChatMessage, ModelSpec, ToolCallRequest


def to_wire(messages: tuple[ChatMessage, ...]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        if m.role == "tool":
            if not m.tool_call_id:
                raise ProviderError(f"conversation message #{i} is a tool result without a "
                                    "tool_call_id; the provider cannot match it to its call",
                                    provider="openai", kind="config")
            # no "name": the tool is known from the call this id answers
            out.append({"role": "tool", "tool_call_id": m.tool_call_id, "content": m.content})
            continue
        msg: dict[str, Any] = {"role": m.role, "content": m.content}
        if m.name:
            msg["name"] = m.name
        if m.role == "assistant" and m.tool_calls:
            msg["content"] = m.content or None
            msg["tool_calls"] = [
                {"id": c.id, "type": "function",
                 "function": {"name": c.name, "arguments": json.dumps(c.arguments)}}
                for c in m.tool_calls]
        out.append(msg)
    return out


def tools_to_wire(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"type": "function",
             "function": {"name": t["name"], "description": t.get("description", ""),
                          "parameters": t.get("parameters") or {"type": "object", "properties": {}}}}
            for t in tools]


class OpenAIModel(HttpProvider):
    provider = "openai"
    default_base_url = "https://api.openai.com/v1"

    def _path(self) -> str:
        return "/chat/completions"

    def _headers(self, key: str | None) -> dict[str, str]:
        headers = {"content-type": "application/json"}
        if key:
            headers["authorization"] = f"Bearer {key}"
        return headers

    def _payload(self, request: ModelRequest) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.spec.name, "messages": to_wire(request.messages)}
        if request.tools:
            body["tools"] = tools_to_wire(request.tools)
        for opt in ("max_tokens", "temperature"):
            if opt in self.spec.options:
                body[opt] = self.spec.options[opt]
        return body

    def _parse(self, body: dict[str, Any], request: ModelRequest) -> tuple[ChatMessage, int, int]:
        choices = body.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise self._missing("'choices' (a non-empty list)", body)
        msg = choices[0].get("message")
        if not isinstance(msg, dict):
            raise self._missing("'choices[0].message'", body)
        content = _text(msg.get("content"))
        if content is None:
            raise MalformedOutput(f"{self.label}: message content is a "
                                  f"{type(msg.get('content')).__name__}, not text",
                                  provider=self.provider)
        calls = []
        raw_calls = msg.get("tool_calls") or []
        if not isinstance(raw_calls, list):
            raise self._missing("'tool_calls' as a list", body)
        for i, raw in enumerate(raw_calls):
            fn = raw.get("function") if isinstance(raw, dict) else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
                raise MalformedOutput(f"{self.label}: tool call #{i} has no function name",
                                      provider=self.provider)
            name = fn["name"]
            self._check_tool(name, request)
            call_id = raw.get("id")
            if not isinstance(call_id, str) or not call_id:
                raise MalformedOutput(f"{self.label}: tool call {name!r} has no id",
                                      provider=self.provider)
            calls.append(ToolCallRequest(id=call_id, name=name,
                                         arguments=self._arguments(fn.get("arguments"), name)))
        if not content.strip() and not calls:
            raise self._empty(f"finish_reason {choices[0].get('finish_reason')!r}")
        reply = ChatMessage(role="assistant", content=content, tool_calls=tuple(calls))
        raw_usage = body.get("usage")
        usage = raw_usage if isinstance(raw_usage, dict) else {}
        tin = usage.get("prompt_tokens")
        tout = usage.get("completion_tokens")
        # servers that omit usage (some local ones) are charged an estimate, not zero
        if not isinstance(tin, int):
            tin = sum(estimate_tokens(m.content) for m in request.messages)
        if not isinstance(tout, int):
            tout = estimate_tokens(content + json.dumps([c.arguments for c in calls]))
        return reply, tin, tout

    def _missing(self, what: str, body: dict[str, Any]) -> MalformedOutput:
        return MalformedOutput(f"{self.label}: response has no {what}; its keys are "
                               f"{sorted(body)[:10]}", provider=self.provider)


def _text(content: Any) -> str | None:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # some servers send a list of content parts
        parts = [p.get("text", "") for p in content if isinstance(p, dict)]
        if all(isinstance(p, str) for p in parts):
            return "".join(parts)
    return None


def _from_spec(spec: ModelSpec, *, limiter: RateLimiter | None = None) -> OpenAIModel:
    return OpenAIModel(spec, limiter=limiter)
