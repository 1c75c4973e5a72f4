"""A local model provider with fault injection: both wire formats, answered by the scripted policies.

For tests, demos and load experiments with no hosted model: it serves
``POST /v1/chat/completions`` (OpenAI-compatible) and ``POST /v1/messages``
(Anthropic) on 127.0.0.1, turns the wire request back into undying's
conversation, and answers with the scripted policy the request's model names
(``"research"``: `undying.actors.scripted.POLICIES`). A run through a real
HTTP client therefore behaves exactly as it does with the scripted model,
until a fault says otherwise (see `_provider_faults` for the rules).

    server = ProviderServer(faults=[{"kind": "429", "retry_after": 1, "every": 3}]).start()
    ... ModelSpec(provider="openai", name="research", base_url=server.url + "/v1") ...
    server.stats()["by_path"]   # {"/v1/chat/completions": {"200": 8, "429": 3}}
    server.stop()

    python -m undying.actors.provider_server --port 8700 --faults '[{"kind": "503", "first": 2}]'

It is a plain HTTP/1.1 server on asyncio streams in a thread of its own, so
that it can do what a framework would not let it: answer half a body and
close, or hold a connection and never answer. ``GET /stats`` returns
`stats()` as JSON for tests that drive it from another process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import email.utils
import json
import signal
import threading
import time
from typing import Any

from ._loopback import LoopbackServer, read_request, until_closed
from ._provider_faults import FaultPlan, FaultRule, SlidingWindow, max_in_window
from ._provider_wire import (
    ANTHROPIC,
    OPENAI,
    WireError,
    anthropic_reply,
    anthropic_request,
    error_body,
    openai_reply,
    openai_request,
    usage,
)
from ._state import ChatMessage, ToolCallRequest
from .scripted import POLICIES

_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found",
            429: "Too Many Requests", 500: "Internal Server Error", 502: "Bad Gateway",
            503: "Service Unavailable", 504: "Gateway Timeout", 529: "Overloaded"}


@dataclasses.dataclass(frozen=True)
class _Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclasses.dataclass
class Record:
    """One request, recorded on arrival (so a test counts it even while it is held)."""

    at: float  # time.monotonic() of arrival
    path: str
    # "200", "429", …; "pending" while held; "timeout", "reset", "close" when no whole answer
    # went out; "gone" when the client hung up during a slow answer
    status: str = "pending"
    fault: str | None = None
    model: str = ""


class ProviderServer(LoopbackServer):
    kind = "provider server"
    backlog = 1024
    read_limit = 1 << 22

    def __init__(self, policy: str | None = "research",
                 faults: list[dict[str, Any]] | dict[str, Any] | None = None,
                 rate_limit_rps: int | None = None, *, host: str = "127.0.0.1", port: int = 0,
                 api_key: str | None = None, seed: int = 0) -> None:
        super().__init__(host, port)
        self.policy = policy  # used when the request's model names no policy
        self.api_key = api_key
        self.window = SlidingWindow(rate_limit_rps) if rate_limit_rps else None
        self.plan = _plan(faults, seed)
        self._lock = threading.Lock()
        self._records: list[Record] = []
        self._last: dict[str, tuple[ChatMessage, ...]] = {}
        self._served = 0
        self._started = time.monotonic()

    def _on_ready(self) -> None:
        self._started = time.monotonic()

    # -- what tests look at ---------------------------------------------------------

    def set_faults(self, faults: list[dict[str, Any]] | dict[str, Any] | None,
                   seed: int | None = None) -> None:
        plan = _plan(faults, self.plan.seed if seed is None else seed)
        with self._lock:
            self.plan = plan

    def records(self) -> list[Record]:
        with self._lock:
            return [dataclasses.replace(r) for r in self._records]

    def last_conversation(self, path: str) -> tuple[ChatMessage, ...]:
        """The conversation the last request on ``path`` decoded to (to check the wire mapping)."""
        with self._lock:
            return self._last.get(path, ())

    def stats(self) -> dict[str, Any]:
        recs = self.records()
        by_path: dict[str, dict[str, int]] = {}
        by_fault: dict[str, int] = {}
        per_second: dict[int, int] = {}
        for r in recs:
            counts = by_path.setdefault(r.path, {})
            counts[r.status] = counts.get(r.status, 0) + 1
            if r.fault:
                by_fault[r.fault] = by_fault.get(r.fault, 0) + 1
            sec = int(r.at - self._started)
            per_second[sec] = per_second.get(sec, 0) + 1
        return {"requests": len(recs), "by_path": by_path, "by_fault": by_fault,
                "per_second": [per_second.get(s, 0) for s in range(max(per_second, default=-1) + 1)],
                "max_in_any_second": max_in_window(sorted(r.at for r in recs)),
                "max_ok_in_any_second": max_in_window(sorted(r.at for r in recs if r.status == "200"))}

    def _arrived(self, path: str) -> Record:
        rec = Record(time.monotonic(), path)
        with self._lock:
            self._records.append(rec)
        return rec

    # -- HTTP ------------------------------------------------------------------------

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                req = await _read_request(reader)
                if req is None or not await self._respond(req, reader, writer):
                    break
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            pass  # a client that hung up mid-request, or sent garbage: nothing to answer
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, asyncio.CancelledError):
                await writer.wait_closed()

    async def _respond(self, req: _Request, reader: asyncio.StreamReader,
                       writer: asyncio.StreamWriter) -> bool:
        """Answer one request; False closes the connection."""
        path = req.path.split("?", 1)[0]
        if req.method == "GET" and path in ("/stats", "/health"):
            await _send(writer, 200, self.stats() if path == "/stats" else {"ok": True})
            return True
        rec = self._arrived(path)
        if req.method != "POST" or path not in (OPENAI, ANTHROPIC):
            return await self._error(writer, rec, 404, f"no route {req.method} {path}")
        try:
            body = json.loads(req.body)
        except ValueError:
            body = None
        if not isinstance(body, dict):
            return await self._error(writer, rec, 400, "request body is not a JSON object")
        model = rec.model = str(body.get("model", ""))
        if self.api_key is not None:
            given = (req.headers.get("x-api-key") if path == ANTHROPIC
                     else req.headers.get("authorization", "").removeprefix("Bearer "))
            if given != self.api_key:
                # echoes the key it was given, as some real servers do: clients must redact
                return await self._error(writer, rec, 401, f"invalid API key {given!r}")
        if self.window is not None:
            wait = self.window.admit(rec.at)
            if wait is not None:
                rec.fault = "rate_limit"
                return await self._error(writer, rec, 429, "rate limit: too many requests per "
                                         "second", headers={"Retry-After": f"{wait:.3f}"})
        with self._lock:
            rule = self.plan.pick(path, model)
        rec.fault = rule.kind if rule else None
        return await self._answer(req, body, rec, rule, reader, writer)

    async def _answer(self, req: _Request, body: dict[str, Any], rec: Record,
                      rule: FaultRule | None, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> bool:
        kind, path, model = rec.fault, rec.path, rec.model
        if rule is not None and rule.status is not None:
            return await self._error(writer, rec, rule.status, f"injected fault {rule.kind}",
                                     headers=_retry_after(rule))
        if kind in ("timeout", "close"):
            rec.status = str(kind)
            if kind == "timeout":  # hold the connection until the client gives up
                await until_closed(reader)
            return False
        if rule is not None and kind == "slow":
            try:  # a client that gives up meanwhile is not answered
                await asyncio.wait_for(until_closed(reader), rule.delay)
                rec.status = "gone"
                return False
            except TimeoutError:
                pass
        try:
            if path == OPENAI:
                model, messages, tools = openai_request(body)
            else:
                model, messages, tools = anthropic_request(body, req.headers)
        except (WireError, KeyError, TypeError, AttributeError) as exc:
            return await self._error(writer, rec, 400, f"invalid request: {exc}")
        policy = POLICIES.get(model) or (POLICIES.get(self.policy) if self.policy else None)
        if policy is None:
            return await self._error(writer, rec, 404, f"model {model!r} not found; "
                                     f"scripted policies: {sorted(POLICIES)}")
        with self._lock:
            self._last[path] = messages
            self._served += 1
            n = self._served
        try:
            reply = policy(messages, tools)
        except Exception as exc:  # a policy that cannot cope is the provider's 500, not a hang-up
            return await self._error(writer, rec, 500, f"policy {model!r} failed: "
                                     f"{type(exc).__name__}: {exc}")
        tokens = usage(messages, reply)
        reply, raw_args = _mangle(rule, reply, tools, path)
        encode = openai_reply if path == OPENAI else anthropic_reply
        data = json.dumps(encode(model, n, reply, tokens, raw_args)).encode()
        if rule is not None and kind == "malformed":
            data = rule.body.encode() if rule.body is not None else data[: len(data) // 2]
        if kind == "reset":
            rec.status = "reset"
            writer.write(_head(200, len(data)) + data[: len(data) // 2])
            await writer.drain()
            writer.transport.abort()
            return False
        rec.status = "200"
        await _send_bytes(writer, 200, data)
        return True

    async def _error(self, writer: asyncio.StreamWriter, rec: Record, status: int, message: str,
                     *, headers: dict[str, str] | None = None) -> bool:
        rec.status = str(status)
        await _send(writer, status, error_body(rec.path, status, message), headers)
        return True


def _plan(faults: list[dict[str, Any]] | dict[str, Any] | None, seed: int) -> FaultPlan:
    if isinstance(faults, dict):  # {"seed": 1, "rules": [...]}
        return FaultPlan(faults.get("rules", []), int(faults.get("seed", seed)))
    return FaultPlan(faults, seed)


def _retry_after(rule: FaultRule) -> dict[str, str]:
    if rule.retry_after is None:
        return {}
    if rule.retry_after_format == "date":
        return {"Retry-After": email.utils.formatdate(time.time() + rule.retry_after, usegmt=True)}
    if rule.retry_after_format == "ms":
        return {"retry-after-ms": f"{rule.retry_after * 1000:.0f}"}
    return {"Retry-After": f"{rule.retry_after:g}"}


def _mangle(rule: FaultRule | None, reply: ChatMessage, tools: list[dict[str, Any]],
            path: str) -> tuple[ChatMessage, dict[str, Any]]:
    """Apply a content fault; returns the reply and raw tool arguments to send instead."""
    if rule is None or rule.kind not in ("bad_args", "unknown_tool", "empty"):
        return reply, {}
    if rule.kind == "empty":
        return ChatMessage(role="assistant"), {}
    calls = list(reply.tool_calls)
    if not calls:  # the fault needs a tool call to spoil
        name = tools[0]["name"] if tools else "search"
        calls = [ToolCallRequest(id="fault0", name=name, arguments={})]
    first = calls[0]
    if rule.kind == "unknown_tool":
        calls[0] = first.model_copy(update={"name": rule.tool})
        return reply.model_copy(update={"tool_calls": tuple(calls)}), {}
    reply = reply.model_copy(update={"tool_calls": tuple(calls)})
    text = json.dumps(first.arguments)
    if rule.shape == "wrong_shape":
        return reply, {first.id: json.dumps(list(first.arguments.values())) if path == OPENAI
                       else list(first.arguments.values())}
    return reply, {first.id: text[: max(1, len(text) - 2)]}  # cut: not JSON any more


async def _read_request(reader: asyncio.StreamReader) -> _Request | None:
    got = await read_request(reader)
    return None if got is None else _Request(*got)


def _head(status: int, length: int, extra: dict[str, str] | None = None) -> bytes:
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}",
             "Content-Type: application/json", f"Content-Length: {length}"]
    lines += [f"{k}: {v}" for k, v in (extra or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def _send(writer: asyncio.StreamWriter, status: int, body: Any,
                extra: dict[str, str] | None = None) -> None:
    await _send_bytes(writer, status, json.dumps(body).encode(), extra)


async def _send_bytes(writer: asyncio.StreamWriter, status: int, data: bytes,
                      extra: dict[str, str] | None = None) -> None:
    writer.write(_head(status, len(data), extra) + data)
    await writer.drain()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m undying.actors.provider_server",
                                description="A local model provider answering from scripted "
                                            "policies, with fault injection.")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--policy", default="research", help="policy for unknown model names")
    p.add_argument("--faults", default=None, help='JSON: [{"kind": "429", "every": 3}, …] '
                                                  'or {"seed": 1, "rules": […]}')
    p.add_argument("--rate-limit-rps", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    server = ProviderServer(args.policy, json.loads(args.faults) if args.faults else None,
                            args.rate_limit_rps, host=args.host, port=args.port,
                            seed=args.seed).start()
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    print(f"provider server listening on {server.url}", flush=True)
    try:
        done.wait()
    except KeyboardInterrupt:
        pass
    server.stop()


if __name__ == "__main__":
    main()
