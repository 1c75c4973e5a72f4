"""What every model provider over HTTP shares: retries, back-off, rate limiting, failover, secrets.

One call (`HttpProvider.complete`) is a loop of attempts. Before each attempt
the cluster-wide rate limiter is asked for a slot; a failed attempt is retried
when the failure is transient (429, 5xx, timeouts, connection errors, a
connection reset mid-body, a body that is not JSON at all) and raised when it
is not (400, 401, 403, 404, 422, a reply that parsed but is unusable). Between
attempts the loop sleeps ``Retry-After`` when the provider sent one, else an
exponential back-off with full jitter, so a thousand agents that failed
together do not retry together.

A wait longer than ``passivate_after_s`` (a long Retry-After, a long queue at
the rate limiter) is not slept when the request allows it (``can_defer``):
the call ends with `RetryLater`, its run sets a durable timer and passivates,
and the timer dispatches the call again, with the attempts made so far
(``tries``) still counting against ``max_attempts``. Nothing then holds a
process, a connection or an executor slot while the run waits.

Secrets: the API key is read from the environment at call time, sent only in
a header, and never stored on the instance; every error text leaving this
module is scrubbed of it, and httpx exceptions (whose ``request`` carries the
headers) are never chained onto ours.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import math
import os
import random
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any, ClassVar
from urllib.parse import urlsplit, urlunsplit

import httpx

from undying.persistence.ratelimit import Limits, bucket_name

from ._models import (
    MalformedOutput,
    Model,
    ModelConfigError,
    ModelRequest,
    ModelResponse,
    ProviderError,
    RateLimiter,
    RetryLater,
    RetryRecord,
    build_model,
    close_model,
    estimate_tokens,
)
from ._state import ChatMessage, ModelSpec

# transient: the same request may well succeed later (529: Anthropic "overloaded")
RETRY_STATUSES = frozenset({408, 409, 425, 429, 500, 502, 503, 504, 529})
# the request itself is wrong: sending it again cannot help
FATAL_STATUSES = frozenset({400, 401, 403, 404, 413, 422})

# options every HTTP provider understands; anything else in ModelSpec.options is a typo
RETRY_OPTIONS = frozenset({
    "timeout_s", "connect_timeout_s", "max_attempts", "backoff_base_s", "backoff_cap_s",
    "max_retry_after_s", "malformed_retries", "fallback", "failover_after",
    "passivate_after_s", "max_passivated_wait_s",
    "rpm", "tpm", "rpm_burst", "tpm_burst", "price_in_per_mtok", "price_out_per_mtok",
    "max_tokens", "temperature",
})

Sleep = Callable[[float], Awaitable[Any]]


def is_retryable_status(status: int) -> bool:
    if status in RETRY_STATUSES:
        return True
    if status in FATAL_STATUSES:
        return False
    return status >= 500  # an unlisted 5xx is the server's fault; an unlisted 4xx is ours


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 4
    base_s: float = 0.5
    cap_s: float = 20.0
    max_retry_after_s: float = 60.0
    timeout_s: float = 60.0
    connect_timeout_s: float = 5.0
    malformed_retries: int = 2  # a body that is not JSON at all: retried this many times
    failover_after: int = 2  # consecutive transient failures before the fallback is used
    # a longer wait passivates the run on a durable timer instead of sleeping (when the
    # executor allows it); such a wait honours Retry-After up to max_passivated_wait_s
    passivate_after_s: float = 5.0
    max_passivated_wait_s: float = 3600.0

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> RetryPolicy:
        p = cls(max_attempts=int(options.get("max_attempts", cls.max_attempts)),
                base_s=float(options.get("backoff_base_s", cls.base_s)),
                cap_s=float(options.get("backoff_cap_s", cls.cap_s)),
                max_retry_after_s=float(options.get("max_retry_after_s", cls.max_retry_after_s)),
                timeout_s=float(options.get("timeout_s", cls.timeout_s)),
                connect_timeout_s=float(options.get("connect_timeout_s", cls.connect_timeout_s)),
                malformed_retries=int(options.get("malformed_retries", cls.malformed_retries)),
                failover_after=int(options.get("failover_after", cls.failover_after)),
                passivate_after_s=float(options.get("passivate_after_s", cls.passivate_after_s)),
                max_passivated_wait_s=float(options.get("max_passivated_wait_s",
                                                        cls.max_passivated_wait_s)))
        if (p.max_attempts < 1 or p.failover_after < 1 or p.timeout_s <= 0
                or p.passivate_after_s < 0):
            raise ModelConfigError(f"retry options out of range: {p}")
        return p

    def backoff(self, retry: int, rng: random.Random) -> float:
        """Full jitter: uniform over [0, min(cap, base * 2**retry)], ``retry`` counted from 0."""
        return rng.uniform(0.0, min(self.cap_s, self.base_s * 2.0 ** retry))

    def delay(self, retry: int, retry_after_s: float | None, rng: random.Random,
              passivated: bool = False) -> float:
        """Seconds to wait before the next attempt.

        A provider's Retry-After is a floor (capped by ``max_retry_after_s``, or by
        ``max_passivated_wait_s`` when the wait may passivate the run: it then costs
        nothing, and coming back early would only be turned away again), plus up to
        10 % jitter so that the callers it turned away do not all come back in the
        same instant.
        """
        if retry_after_s is None:
            return self.backoff(retry, rng)
        cap = max(self.max_retry_after_s, self.max_passivated_wait_s) if passivated \
            else self.max_retry_after_s
        floor = min(max(retry_after_s, 0.0), cap)
        return floor + rng.uniform(0.0, 0.1 * floor)


def parse_retry_after(headers: httpx.Headers | dict[str, str],
                      now: Callable[[], float] = time.time) -> float | None:
    """Seconds to wait from ``retry-after-ms``, or ``Retry-After`` as seconds or an HTTP-date."""
    lower = {k.lower(): v for k, v in headers.items()}
    ms = lower.get("retry-after-ms")
    if ms is not None:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    value = lower.get("retry-after")
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
        return max(0.0, seconds) if math.isfinite(seconds) else None
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None  # unparseable: fall back to our own back-off
    return max(0.0, when.timestamp() - now())


def redact(text: str, secrets: Iterable[str]) -> str:
    for s in secrets:
        if s:
            text = text.replace(s, "***")
    return text


def public_url(url: str) -> str:
    """A URL fit for an error message: no user:password@, no query string."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def snippet(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "…"


class HttpProvider:
    """Base of the HTTP providers: one attempt is `_send`, everything around it is here.

    Subclasses set `provider` and `default_base_url` and implement `_path`,
    `_headers`, `_payload` and `_parse`.
    """

    provider: ClassVar[str] = ""
    default_base_url: ClassVar[str] = ""
    extra_options: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, spec: ModelSpec, *, limiter: RateLimiter | None = None,
                 transport: httpx.AsyncBaseTransport | None = None, sleep: Sleep = asyncio.sleep,
                 rng: random.Random | None = None) -> None:
        unknown = set(spec.options) - RETRY_OPTIONS - self.extra_options
        if unknown:
            raise ModelConfigError(f"{self.provider} model {spec.name!r}: unknown options "
                                   f"{sorted(unknown)}; known: {sorted(RETRY_OPTIONS | self.extra_options)}")
        self.spec = spec
        self.label = f"{self.provider} model {spec.name!r}"
        self.base_url = (spec.base_url or self.default_base_url).rstrip("/")
        self.key_env = spec.api_key.env if spec.api_key else None
        self.policy = RetryPolicy.from_options(spec.options)
        try:
            self.limits = Limits.from_options(spec.options)
        except ValueError as exc:
            raise ModelConfigError(f"{self.label}: {exc}") from None
        self.limiter = limiter if self.limits.active else None
        # the bucket is a Redis key: no user:password@ from the URL, never the key's value
        self.bucket = bucket_name(self.provider, public_url(self.base_url), self.key_env)
        self.sleep = sleep
        self.rng = rng or random.Random()
        self._transport = transport
        self._http: httpx.AsyncClient | None = None
        self._http_loop: asyncio.AbstractEventLoop | None = None
        self.fallback: Model | None = None
        if "fallback" in spec.options:
            try:
                fb = ModelSpec.model_validate(spec.options["fallback"])
            except ValueError as exc:
                raise ModelConfigError(f"{self.label}: option 'fallback' is not a model spec: "
                                       f"{exc}") from None
            self.fallback = build_model(fb, limiter=limiter)

    def __repr__(self) -> str:
        key = f" key=${self.key_env}" if self.key_env else ""
        return f"<{type(self).__name__} {self.spec.name!r} at {public_url(self.base_url)}{key}>"

    # -- what a subclass provides ------------------------------------------------

    def _path(self) -> str:
        raise NotImplementedError

    def _headers(self, key: str | None) -> dict[str, str]:
        raise NotImplementedError

    def _payload(self, request: ModelRequest) -> dict[str, Any]:
        raise NotImplementedError

    def _parse(self, body: dict[str, Any], request: ModelRequest) -> tuple[ChatMessage, int, int]:
        raise NotImplementedError

    # -- one call -------------------------------------------------------------------

    async def complete(self, request: ModelRequest) -> ModelResponse:
        secrets = self._secret_values()
        try:
            resp = await self._complete(request)
        except ProviderError as exc:
            # the last line of defence: nothing a server echoed may carry the key out
            exc.args = tuple(redact(str(a), secrets) for a in exc.args)
            raise
        if secrets and any(s in resp.message.model_dump_json() for s in secrets):
            clean = redact(resp.message.model_dump_json(), secrets)
            resp = replace(resp, message=ChatMessage.model_validate_json(clean))
        return resp

    async def _complete(self, request: ModelRequest) -> ModelResponse:
        retries: list[RetryRecord] = []
        malformed = 0
        # attempts of earlier dispatches (before a passivated back-off) count: all failed
        failures = attempt = max(0, request.tries)
        slot_held = request.slot_reserved
        while True:
            attempt += 1
            reserved = self._estimate(request)
            if self.limiter is not None:
                if slot_held:
                    slot_held = False  # reserved before the run passivated: it is ours now
                else:
                    await self._acquire(request, reserved, attempt, retries)
            try:
                resp = await self._send(request)
            except ProviderError as exc:
                if isinstance(exc, MalformedOutput) and exc.retryable:
                    malformed += 1
                    exc.retryable = malformed <= self.policy.malformed_retries
                if not exc.retryable:
                    raise self._final(exc, attempt, retries) from None
                failures += 1
                if self.fallback is not None and failures >= self.policy.failover_after:
                    retries.append(self._record(attempt, exc, 0.0, kind="failover"))
                    return await self._failover(request, attempt, retries, exc)
                if attempt >= self.policy.max_attempts:
                    raise self._final(exc, attempt, retries) from None
                delay = self.policy.delay(attempt - 1, exc.retry_after_s, self.rng,
                                          passivated=request.can_defer)
                if request.can_defer and delay > self.policy.passivate_after_s:
                    retries.append(self._record(attempt, exc, delay, passivated=True))
                    raise RetryLater(
                        f"{self.label}: attempt {attempt} failed ({exc.kind}); the next "
                        f"waits {delay:.1f} s, passivated", provider=self.provider,
                        wait_s=delay, kind=exc.kind, attempts=attempt, retries=tuple(retries),
                        status=exc.status, retry_after_s=exc.retry_after_s) from None
                retries.append(self._record(attempt, exc, delay))
                await self.sleep(delay)
                continue
            used = resp.tokens_in + resp.tokens_out
            if self.limiter is not None and used > reserved:
                # settle the difference without waiting: the next caller pays for it
                await self.limiter.acquire(self.bucket, used - reserved, requests=0,
                                           limits=self.limits, wait=False)
            return replace(resp, attempts=attempt, retries=tuple(retries))

    async def _acquire(self, request: ModelRequest, tokens: int, attempt: int,
                       retries: list[RetryRecord]) -> None:
        """The rate limiter's slot for this attempt: waited for here, or, when the queue is
        longer than ``passivate_after_s`` and the request may defer, `RetryLater`.

        A limiter that can reserve (`RedisRateLimiter.reserve`) is asked once: a slot
        within its horizon is reserved and kept across the passivation (the call keeps its
        place in the queue and does not queue again); a queue beyond the horizon reserves
        nothing, and the call comes back when its slot is nearly in reach."""
        assert self.limiter is not None
        reserve = getattr(self.limiter, "reserve", None)
        if not request.can_defer or reserve is None:
            await self.limiter.acquire(self.bucket, tokens, limits=self.limits)
            return
        try:
            res = await reserve(self.bucket, limits=self.limits, tokens=tokens)
        except Exception:  # the limiter's store: acquire knows whether to fail open
            await self.limiter.acquire(self.bucket, tokens, limits=self.limits)
            return
        if res.granted and res.wait_s <= self.policy.passivate_after_s:
            if res.wait_s > 0:
                await self.sleep(res.wait_s)
            return
        wait = res.wait_s
        if not res.granted:  # as the limiter does: return spread out, a little before the slot
            horizon = float(getattr(self.limiter, "max_reserve_s", 0.0))
            wait = max(self.policy.passivate_after_s,
                       res.wait_s - horizon * self.rng.uniform(0.5, 0.9))
        retries.append(RetryRecord(attempt=attempt, kind="rate_limit", waited_s=round(wait, 4),
                                   model=f"{self.provider}:{self.spec.name}", passivated=True))
        raise RetryLater(f"{self.label}: the rate limiter's next slot is {res.wait_s:.1f} s "
                         "away; passivated", provider=self.provider, wait_s=wait,
                         kind="rate_limit", attempts=attempt - 1, retries=tuple(retries),
                         slot=res.granted)

    async def _failover(self, request: ModelRequest, attempt: int, retries: list[RetryRecord],
                        last: ProviderError) -> ModelResponse:
        assert self.fallback is not None
        try:
            # the fallback sleeps its own waits: this call's attempts are counted here
            resp = await self.fallback.complete(replace(request, can_defer=False, tries=0,
                                                        slot_reserved=False))
        except ProviderError as exc:
            exc.args = (f"{self.label} failed {attempt} times (last: {last}); its fallback failed "
                        f"too: {exc}",)
            exc.attempts += attempt
            exc.retries = tuple(retries) + exc.retries
            raise
        return replace(resp, attempts=attempt + resp.attempts, retries=tuple(retries) + resp.retries)

    def _record(self, attempt: int, exc: ProviderError, waited: float,
                kind: str | None = None, passivated: bool = False) -> RetryRecord:
        return RetryRecord(attempt=attempt, kind=kind or exc.kind, waited_s=round(waited, 4),
                           status=exc.status, retry_after_s=exc.retry_after_s,
                           model=f"{self.provider}:{self.spec.name}", passivated=passivated)

    def _final(self, exc: ProviderError, attempt: int, retries: list[RetryRecord]) -> ProviderError:
        exc.attempts, exc.retries = attempt, tuple(retries)
        if attempt > 1:
            exc.args = (f"{exc.args[0]} (gave up after {attempt} attempts)",)
        return exc

    # -- one attempt ----------------------------------------------------------------

    async def _send(self, request: ModelRequest) -> ModelResponse:
        key = self._api_key()
        url = self.base_url + self._path()
        where = f"{self.label} at {public_url(url)}"
        try:
            # httpx's read timeout is per chunk; a server that drips bytes is cut by this one
            async with asyncio.timeout(self.policy.timeout_s):
                r = await self._client().post(url, json=self._payload(request),
                                              headers=self._headers(key))
        except (TimeoutError, httpx.TimeoutException):
            raise self._error(f"{where}: no complete answer within {self.policy.timeout_s:g} s",
                              kind="timeout") from None
        except httpx.ConnectError as exc:
            raise self._error(f"{where}: cannot connect ({exc})", kind="connect") from None
        except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as exc:
            raise self._error(f"{where}: connection closed before the whole response arrived "
                              f"({type(exc).__name__}: {exc})", kind="reset") from None
        except httpx.HTTPError as exc:
            raise self._error(f"{where}: transport error ({type(exc).__name__}: {exc})",
                              kind="transport") from None
        if r.status_code >= 400:
            raise self._status_error(where, r)
        try:
            body = json.loads(r.content)
        except ValueError as exc:
            raise MalformedOutput(f"{where}: response body is not valid JSON ({exc}); it begins "
                                  f"{snippet(r.text, 80)!r}", provider=self.provider,
                                  status=r.status_code, retryable=True) from None
        if not isinstance(body, dict):
            raise MalformedOutput(f"{where}: response body is a JSON {type(body).__name__}, "
                                  "not an object", provider=self.provider, status=r.status_code)
        message, tin, tout = self._parse(body, request)
        return ModelResponse(message=message, tokens_in=tin, tokens_out=tout,
                             cost_usd=self._cost(tin, tout), provider=self.provider,
                             model=str(body.get("model") or self.spec.name))

    def _error(self, message: str, *, kind: str) -> ProviderError:
        return ProviderError(message, provider=self.provider, retryable=True, kind=kind)

    def _status_error(self, where: str, r: httpx.Response) -> ProviderError:
        detail = r.reason_phrase
        try:
            body = r.json()
            err = body.get("error") if isinstance(body, dict) else None
            if isinstance(err, dict) and err.get("message"):
                detail = str(err["message"])
            elif isinstance(err, str):
                detail = err
        except ValueError:
            detail = snippet(r.text) or detail
        retryable = is_retryable_status(r.status_code)
        retry_after = parse_retry_after(r.headers)
        hint = "retryable" if retryable else "not retryable: fix the request or configuration"
        return ProviderError(f"{where}: HTTP {r.status_code} ({snippet(detail)}); {hint}",
                             provider=self.provider, status=r.status_code, retryable=retryable,
                             retry_after_s=retry_after)

    def _api_key(self) -> str | None:
        if self.key_env is None:
            return None
        key = os.environ.get(self.key_env)
        if not key:
            raise ProviderError(f"{self.label}: environment variable {self.key_env} (its API key) "
                                "is not set on this node", provider=self.provider, kind="config")
        return key

    def _secret_values(self) -> list[str]:
        return [os.environ.get(self.key_env, "")] if self.key_env else []

    def _client(self) -> httpx.AsyncClient:
        # a client's pooled connections belong to the event loop that opened them
        loop = asyncio.get_running_loop()
        if self._http is None or self._http_loop is not loop:
            self._http = httpx.AsyncClient(
                transport=self._transport,
                timeout=httpx.Timeout(self.policy.timeout_s, connect=self.policy.connect_timeout_s),
                limits=httpx.Limits(max_connections=64, max_keepalive_connections=32))
            self._http_loop = loop
        return self._http

    async def aclose(self) -> None:
        if self._http is not None and self._http_loop is asyncio.get_running_loop():
            await self._http.aclose()
        self._http = self._http_loop = None
        if self.fallback is not None:
            await close_model(self.fallback)

    async def __aenter__(self) -> HttpProvider:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _estimate(self, request: ModelRequest) -> int:
        """Tokens to reserve before the call: the prompt's estimate plus the output cap."""
        text = sum(estimate_tokens(m.content) for m in request.messages)
        calls = sum(estimate_tokens(json.dumps(c.arguments)) for m in request.messages
                    for c in m.tool_calls)
        return text + calls + int(self.spec.options.get("max_tokens", 0))

    def _cost(self, tokens_in: int, tokens_out: int) -> float:
        o = self.spec.options
        cost = (tokens_in * float(o.get("price_in_per_mtok", 0.0))
                + tokens_out * float(o.get("price_out_per_mtok", 0.0))) / 1e6
        return round(cost, 8)

    def _arguments(self, raw: Any, tool: str) -> dict[str, Any]:
        """Tool-call arguments as a dict, or `MalformedOutput` saying exactly what was wrong."""
        if isinstance(raw, str):
            if not raw.strip():
                return {}  # some servers send "" for a call without arguments
            try:
                raw = json.loads(raw)
            except ValueError as exc:
                raise MalformedOutput(f"{self.label}: tool call {tool!r} has arguments that are not "
                                      f"valid JSON: {exc}", provider=self.provider) from None
        if not isinstance(raw, dict):
            raise MalformedOutput(f"{self.label}: tool call {tool!r} has arguments that are not a "
                                  f"JSON object (got {type(raw).__name__})", provider=self.provider)
        return raw

    def _check_tool(self, name: str, request: ModelRequest) -> None:
        offered = sorted(t["name"] for t in request.tools)
        if name not in offered:
            raise MalformedOutput(f"{self.label}: tool call {name!r} names a tool that was not "
                                  f"offered (offered: {', '.join(offered) or 'none'})",
                                  provider=self.provider)

    def _empty(self, why: str) -> MalformedOutput:
        return MalformedOutput(f"{self.label}: empty reply: no content and no tool calls ({why})",
                               provider=self.provider)
