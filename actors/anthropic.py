"""Provider ``anthropic``: the Anthropic messages API over httpx.

``POST {base_url}/v1/messages`` with ``x-api-key`` and ``anthropic-version``
headers. The wire format differs from undying's conversation in three ways
that this module bridges both ways: system prompts go in a separate
``system`` field; tool calls and results are content blocks (``tool_use`` in
an assistant turn, ``tool_result`` in the next user turn); and roles must
alternate, so consecutive tool results (and a user message after them) are
merged into one user turn.

    ModelSpec(provider="anthropic", name="claude-sonnet-4-5",
              api_key=SecretRef(env="ANTHROPIC_API_KEY"), options={"max_tokens": 4096})
"""

from __future__ import annotations

from typing import Any

from ._http import HttpProvider
from ._models import MalformedOutput, ModelRequest, ProviderError, RateLimiter
from ._state import ChatMessage, ModelSpec, ToolCallRequest

API_VERSION = "2023-06-01"
DEFAULT_MAX_TOKENS = 4096  # required by the API; the reply is cut there


def to_wire(messages: tuple[ChatMessage, ...]) -> tuple[str, list[dict[str, Any]]]:
    """(system prompt, alternating user/assistant turns of content blocks)."""
    system: list[str] = []
    turns: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        blocks: list[dict[str, Any]] = []
        if m.role == "system":
            system.append(m.content)
            continue
        if m.role == "tool":
            if not m.tool_call_id:
                raise ProviderError(f"conversation message #{i} is a tool result without a "
                                    "tool_call_id; the provider cannot match it to its call",
                                    provider="anthropic", kind="config")
            role = "user"
            blocks.append({"type": "tool_result", "tool_use_id": m.tool_call_id,
                           "content": m.content})
        else:
            role = m.role
            if m.content:  # the API refuses empty text blocks
                blocks.append({"type": "text", "text": m.content})
            blocks.extend({"type": "tool_use", "id": c.id, "name": c.name, "input": c.arguments}
                          for c in m.tool_calls)
        if not blocks:
            continue
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"].extend(blocks)
        else:
            turns.append({"role": role, "content": blocks})
    return "\n\n".join(s for s in system if s), turns


def tools_to_wire(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"name": t["name"], "description": t.get("description", ""),
             "input_schema": t.get("parameters") or {"type": "object", "properties": {}}}
            for t in tools]


class AnthropicModel(HttpProvider):
    provider = "anthropic"
    default_base_url = "https://api.anthropic.com"
    extra_options = frozenset({"anthropic_version"})

    def _path(self) -> str:
        # accept a base URL given with or without the version segment
        return "/messages" if self.base_url.endswith("/v1") else "/v1/messages"

    def _headers(self, key: str | None) -> dict[str, str]:
        headers = {"content-type": "application/json",
                   "anthropic-version": str(self.spec.options.get("anthropic_version", API_VERSION))}
        if key:
            headers["x-api-key"] = key
        return headers

    def _payload(self, request: ModelRequest) -> dict[str, Any]:
        system, turns = to_wire(request.messages)
        body: dict[str, Any] = {"model": self.spec.name, "messages": turns,
                                "max_tokens": int(self.spec.options.get("max_tokens",
                                                                        DEFAULT_MAX_TOKENS))}
        if system:
            body["system"] = system
        if request.tools:
            body["tools"] = tools_to_wire(request.tools)
        if "temperature" in self.spec.options:
            body["temperature"] = self.spec.options["temperature"]
        return body

    def _parse(self, body: dict[str, Any], request: ModelRequest) -> tuple[ChatMessage, int, int]:
        blocks = body.get("content")
        if not isinstance(blocks, list):
            raise MalformedOutput(f"{self.label}: response has no 'content' list; its keys are "
                                  f"{sorted(body)[:10]}", provider=self.provider)
        texts: list[str] = []
        calls: list[ToolCallRequest] = []
        for i, block in enumerate(blocks):
            kind = block.get("type") if isinstance(block, dict) else None
            if kind == "text":
                texts.append(str(block.get("text") or ""))
            elif kind == "tool_use":
                name, call_id, args = block.get("name"), block.get("id"), block.get("input", {})
                if not isinstance(name, str) or not name or not isinstance(call_id, str) or not call_id:
                    raise MalformedOutput(f"{self.label}: tool_use block #{i} lacks a name or an id",
                                          provider=self.provider)
                self._check_tool(name, request)
                if not isinstance(args, dict):
                    raise MalformedOutput(f"{self.label}: tool call {name!r} has input that is not "
                                          f"a JSON object (got {type(args).__name__})",
                                          provider=self.provider)
                calls.append(ToolCallRequest(id=call_id, name=name, arguments=args))
            # other blocks (thinking, redacted_thinking) carry nothing the loop uses
        content = "".join(texts)
        if not content.strip() and not calls:
            raise self._empty(f"stop_reason {body.get('stop_reason')!r}")
        usage = body.get("usage")
        if not isinstance(usage, dict) or not isinstance(usage.get("input_tokens"), int) \
                or not isinstance(usage.get("output_tokens"), int):
            raise MalformedOutput(f"{self.label}: response has no usage.input_tokens / "
                                  "usage.output_tokens", provider=self.provider)
        # cached prompt tokens are still prompt tokens for budgets
        tin = usage["input_tokens"] + sum(int(usage.get(k) or 0) for k in (
            "cache_creation_input_tokens", "cache_read_input_tokens"))
        reply = ChatMessage(role="assistant", content=content, tool_calls=tuple(calls))
        return reply, tin, usage["output_tokens"]


def _from_spec(spec: ModelSpec, *, limiter: RateLimiter | None = None) -> AnthropicModel:
    return AnthropicModel(spec, limiter=limiter)
