"""Built-in tools an agent may list: HTTP (allow-listed) and the corpus tools.

Nothing here is registered globally: an agent names the tools it wants, and
its ``config`` says which hosts they may reach.

    from undying.actors.builtin_tools import http_fetch, http_post
    agent = Agent("ops", tools=[http_fetch, http_post],
                  config={"http_allow": ["api.example.com", "127.0.0.1:8080"]})

- `http_fetch` (``idempotent``): GET a URL, redirects followed only to allowed hosts.
- `http_post` (``keyed``): POST JSON with the call's idempotency key as the
  ``Idempotency-Key`` header. The key is the same on every attempt of the
  call, whether this tool re-sends after a transient failure or the run
  dispatches the call again after its executor died, so a server that honours
  the header applies it once.
- `http_post_once` (``at_most_once``): POST JSON that is never sent twice. A
  failure after the request may have left is reported as an unknown outcome,
  not retried; the call's key goes in ``X-Request-Id`` so that whoever
  reconciles it can ask the server.
- `search` and `read` over a folder of documents (see `_corpus`). The run's
  memory (``remember``, ``set_plan``) and ``delegate`` are handled by the loop
  itself and need no listing.

Configuration keys (all optional but ``http_allow``):

- ``http_allow``: entries ``"host"`` (the scheme's default port only),
  ``"host:port"``, ``"host:*"`` (any port), ``"*.example.com"`` (any subdomain,
  not the domain itself), optionally with a port. Nothing is allowed without it.
- ``http_max_bytes``: the largest response body read, after decompression
  (default 1 MiB); a larger one is refused.
- ``http_timeout_s``: the whole call, retries included (default 15 s).
- ``http_retries``: how often `http_post` re-sends after a transient failure
  (default 2).

Errors name the tool, the URL (without credentials or query) and what was
refused; the model sees them as the call's result.
"""

from __future__ import annotations

import asyncio
import json
import random
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx

from ._corpus import read, search
from ._http import parse_retry_after, public_url
from ._tools import ToolContext, tool

__all__ = [
    "AllowList",
    "HttpLimits",
    "HttpOutcomeUnknown",
    "HttpRefused",
    "HttpToolError",
    "http_fetch",
    "http_post",
    "http_post_once",
    "read",
    "search",
]

DEFAULT_MAX_BYTES = 1 << 20
DEFAULT_TIMEOUT_S = 15.0
DEFAULT_RETRIES = 2
MAX_REDIRECTS = 5
DEFAULT_PORTS = {"http": 80, "https": 443}
# a POST answered with one of these did not take effect (or the server says to come back):
# re-sending it with the same key is what keys are for
RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})


class HttpToolError(Exception):
    """A built-in HTTP tool could not do what was asked; the message says what and why."""


class HttpRefused(HttpToolError):
    """Refused before anything was sent (a host not allowed, a bad URL), or a response
    refused for its size."""


class HttpOutcomeUnknown(HttpToolError):
    """The request may have reached the server and been applied; nobody knows."""


@dataclass(frozen=True)
class HttpLimits:
    max_bytes: int = DEFAULT_MAX_BYTES
    timeout_s: float = DEFAULT_TIMEOUT_S
    retries: int = DEFAULT_RETRIES

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> HttpLimits:
        def num(name: str, default: float, low: float) -> float:
            v = config.get(name, default)
            if isinstance(v, bool) or not isinstance(v, int | float) or v < low:
                raise HttpRefused(f"config[{name!r}] must be a number >= {low:g}, not {v!r}")
            return float(v)

        return cls(max_bytes=int(num("http_max_bytes", DEFAULT_MAX_BYTES, 1)),
                   timeout_s=num("http_timeout_s", DEFAULT_TIMEOUT_S, 0.001),
                   retries=int(num("http_retries", DEFAULT_RETRIES, 0)))


@dataclass(frozen=True)
class AllowList:
    """Hosts (and ports) the HTTP tools may reach: ``(host pattern, port)`` pairs, where a
    port of None means the scheme's default and "*" any."""

    entries: tuple[tuple[str, int | str | None], ...] = ()

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> AllowList:
        raw = config.get("http_allow") or ()
        if isinstance(raw, str):
            raw = (raw,)
        return cls(tuple(_entry(e) for e in raw))

    def describe(self) -> str:
        if not self.entries:
            return "nothing: set config['http_allow'] on the agent"
        return ", ".join(h + ("" if p is None else f":{p}") for h, p in self.entries)

    def check(self, tool_name: str, url: str) -> httpx.URL:
        """The URL, parsed, if it may be reached; else `HttpRefused` naming why."""
        shown = public_url(url) if "://" in url else url[:200]
        try:
            u = httpx.URL(url)
        except (httpx.InvalidURL, TypeError, ValueError) as exc:
            raise HttpRefused(f"{tool_name} refused {shown!r}: not a valid URL ({exc})") from None
        if u.scheme not in DEFAULT_PORTS:
            raise HttpRefused(f"{tool_name} refused {shown}: scheme {u.scheme or '(none)'!r} is "
                              "not http or https")
        host = u.host.lower()
        if not host:
            raise HttpRefused(f"{tool_name} refused {shown}: the URL has no host")
        port = u.port or DEFAULT_PORTS[u.scheme]
        for pattern, allowed in self.entries:
            if not _host_matches(pattern, host):
                continue
            if allowed == "*" or allowed == port or (allowed is None
                                                     and port == DEFAULT_PORTS[u.scheme]):
                return u
        where = f"[{host}]" if ":" in host else host
        raise HttpRefused(f"{tool_name} refused {shown}: host {where}:{port} is not in this "
                          f"agent's config['http_allow'] (allowed: {self.describe()})")


def _entry(raw: Any) -> tuple[str, int | str | None]:
    if not isinstance(raw, str) or not raw.strip():
        raise HttpRefused(f"config['http_allow'] entries are 'host', 'host:port' or 'host:*', "
                          f"not {raw!r}")
    text = raw.strip().lower()
    if "://" in text:
        raise HttpRefused(f"config['http_allow'] entry {raw!r}: give a host, not a URL")
    if text.endswith(":*"):
        return text[:-2].strip("[]"), "*"
    try:
        parts = urlsplit("//" + text)
        host, port = parts.hostname or "", parts.port
    except ValueError as exc:
        raise HttpRefused(f"config['http_allow'] entry {raw!r}: {exc}") from None
    if not host:
        raise HttpRefused(f"config['http_allow'] entry {raw!r} names no host")
    return host, port


def _host_matches(pattern: str, host: str) -> bool:
    if pattern.startswith("*."):
        return host.endswith(pattern[1:])  # a subdomain, never the domain itself
    return host == pattern


# -- one exchange -------------------------------------------------------------------------


@dataclass(frozen=True)
class _Answer:
    url: str
    status: int
    content_type: str
    body: bytes
    charset: str | None
    replayed: bool  # the server answered an earlier delivery of this idempotency key
    retry_after_s: float | None
    location: str | None  # where a redirect points, resolved against the request's URL

    def text(self) -> str:
        try:
            return self.body.decode(self.charset or "utf-8", errors="replace")
        except LookupError:  # a charset Python does not know
            return self.body.decode("utf-8", errors="replace")

    def to_json(self, **extra: Any) -> str:
        out: dict[str, Any] = {"url": self.url, "status": self.status,
                               "content_type": self.content_type, "body": self.text()}
        if self.replayed:
            out["replayed"] = True
        out.update(extra)
        return json.dumps(out)


async def _exchange(client: httpx.AsyncClient, tool_name: str, method: str, url: httpx.URL,
                    limits: HttpLimits, *, json_body: Any = None,
                    headers: dict[str, str] | None = None) -> _Answer:
    """One request and its whole response, refused past the size limit."""
    shown = public_url(str(url))
    req = client.build_request(method, url, json=json_body, headers=headers)
    resp = await client.send(req, stream=True)
    try:
        declared = resp.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limits.max_bytes:
            raise HttpRefused(f"{tool_name}: the response from {shown} is {int(declared)} bytes, "
                              f"more than the limit of {limits.max_bytes} "
                              "(config['http_max_bytes']); refused")
        body = bytearray()
        # decoded bytes: the limit holds for what a compressed body expands to
        async for chunk in resp.aiter_bytes():
            body += chunk
            if len(body) > limits.max_bytes:
                raise HttpRefused(f"{tool_name}: the response from {shown} is larger than the "
                                  f"limit of {limits.max_bytes} bytes (config['http_max_bytes']); "
                                  "refused")
    finally:
        await resp.aclose()
    location = resp.headers.get("location") if resp.is_redirect else None
    return _Answer(url=shown, status=resp.status_code,
                   content_type=resp.headers.get("content-type", ""), body=bytes(body),
                   charset=resp.charset_encoding,
                   replayed=resp.headers.get("idempotent-replayed", "").lower() == "true",
                   retry_after_s=parse_retry_after(resp.headers),
                   location=str(url.join(location)) if location else None)


def _client(limits: HttpLimits) -> httpx.AsyncClient:
    # trust_env=False: no proxy or .netrc credentials picked up from the executor's environment
    return httpx.AsyncClient(timeout=httpx.Timeout(limits.timeout_s,
                                                   connect=min(5.0, limits.timeout_s)),
                             follow_redirects=False, trust_env=False)


def _too_slow(tool_name: str, url: str, limits: HttpLimits) -> str:
    return (f"{tool_name}: no complete answer from {public_url(url)} within "
            f"{limits.timeout_s:g} s (config['http_timeout_s'])")


# -- the tools ------------------------------------------------------------------------------


@tool(side_effect="idempotent")
async def http_fetch(url: str, ctx: ToolContext) -> str:
    """Fetch a URL with GET (allow-listed hosts only). Returns JSON: url, status,
    content_type and the body as text."""
    allow = AllowList.from_config(ctx.config)
    limits = HttpLimits.from_config(ctx.config)
    target = allow.check("http_fetch", url)
    try:
        async with asyncio.timeout(limits.timeout_s), _client(limits) as client:
            for _ in range(MAX_REDIRECTS + 1):
                answer = await _exchange(client, "http_fetch", "GET", target, limits)
                if answer.location is None:
                    return answer.to_json()
                target = allow.check("http_fetch", answer.location)  # a redirect is checked too
            raise HttpToolError(f"http_fetch: more than {MAX_REDIRECTS} redirects from "
                                f"{public_url(url)}")
    except TimeoutError:
        raise HttpToolError(_too_slow("http_fetch", str(target), limits)) from None
    except httpx.HTTPError as exc:
        raise HttpToolError(f"http_fetch: {public_url(str(target))}: "
                            f"{type(exc).__name__}: {exc}") from None


@tool(side_effect="keyed")
async def http_post(url: str, body: dict[str, Any], ctx: ToolContext) -> str:
    """POST a JSON body (allow-listed hosts only) with an Idempotency-Key header, so that a
    re-sent call is applied once by a server that honours it. Returns JSON: url, status,
    content_type, body, attempts."""
    allow = AllowList.from_config(ctx.config)
    limits = HttpLimits.from_config(ctx.config)
    target = allow.check("http_post", url)
    headers = {"Idempotency-Key": ctx.key}
    rng = random.Random(ctx.key)
    attempt = 0
    try:
        async with asyncio.timeout(limits.timeout_s), _client(limits) as client:
            while True:
                attempt += 1
                wait = None
                try:
                    answer = await _exchange(client, "http_post", "POST", target, limits,
                                             json_body=body, headers=headers)
                    if answer.status not in RETRY_STATUSES or attempt > limits.retries:
                        return answer.to_json(attempts=attempt)
                    wait = answer.retry_after_s
                except (httpx.TransportError, httpx.DecodingError) as exc:
                    if attempt > limits.retries:
                        raise HttpOutcomeUnknown(
                            f"http_post: {public_url(url)}: {type(exc).__name__}: {exc} (after "
                            f"{attempt} attempts); it may have been applied: calling it again "
                            "with the same key is safe") from None
                # the same key on every attempt: the server applies the first that arrives
                backoff = rng.uniform(0.0, min(2.0, 0.1 * 2 ** attempt))
                await asyncio.sleep(min(wait, 5.0) if wait is not None else backoff)
    except TimeoutError:
        raise HttpOutcomeUnknown(_too_slow("http_post", url, limits) + "; it may have been "
                                 "applied: calling it again with the same key is safe") from None


@tool(side_effect="at_most_once")
async def http_post_once(url: str, body: dict[str, Any], ctx: ToolContext) -> str:
    """POST a JSON body at most once (allow-listed hosts only): never re-sent, not even
    after a failure. Returns JSON: url, status, content_type, body."""
    allow = AllowList.from_config(ctx.config)
    limits = HttpLimits.from_config(ctx.config)
    target = allow.check("http_post_once", url)
    unknown = (f"http_post_once: {public_url(url)}: the request may or may not have been "
               f"applied; it is not sent again (at most once; its call key is {ctx.key})")
    try:
        async with asyncio.timeout(limits.timeout_s), _client(limits) as client:
            answer = await _exchange(client, "http_post_once", "POST", target, limits,
                                     json_body=body, headers={"X-Request-Id": ctx.key})
            return answer.to_json()
    except TimeoutError:
        raise HttpOutcomeUnknown(f"{_too_slow('http_post_once', url, limits)}. {unknown}") \
            from None
    except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
        # refused before a byte was sent: it certainly did not happen
        raise HttpToolError(f"http_post_once: {public_url(url)}: not sent, cannot connect "
                            f"({type(exc).__name__}: {exc})") from None
    except httpx.HTTPError as exc:
        raise HttpOutcomeUnknown(f"{unknown} ({type(exc).__name__}: {exc})") from None
