"""Models: the seam between the loop and an LLM provider.

A model turns the conversation and the tool schemas into one assistant
message. Which model a run uses is configuration (`ModelSpec`), resolved on
whichever node performs the call.

Errors a provider raises, and what the engine should do with them:

- `MalformedOutput`: the provider answered, but the reply is unusable (not
  JSON, a tool call whose arguments are not a JSON object, an empty reply, a
  missing field). Retrying the same request would most likely give the same
  answer, so the engine shows the message to the model on its next turn.
- `ProviderError` with ``retryable=True``: the provider was overloaded or
  unreachable (429, 5xx, timeouts, resets) for every attempt the retry policy
  allowed; the run may back off and call again later.
- `ProviderError` with ``retryable=False``: the request itself was refused
  (400, 401, 403, 404, 422, a missing API key); fix the configuration.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from undying.persistence import UndyingError
from undying.persistence.ratelimit import Limits

from ._state import ChatMessage, ModelSpec


@dataclass(frozen=True)
class ModelRequest:
    messages: tuple[ChatMessage, ...]
    tools: list[dict[str, Any]] = field(default_factory=list)
    run_id: str = ""
    effect_id: str = ""
    # a wait longer than the retry policy's ``passivate_after_s`` may end the call with
    # `RetryLater` instead of a sleep (the executor's runs have durable timers to wait on)
    can_defer: bool = False
    tries: int = 0  # attempts made in earlier dispatches of this call: they count
    slot_reserved: bool = False  # the rate limiter's slot for the first attempt is held


@dataclass(frozen=True)
class RetryRecord:
    """One failed attempt that was retried. Plain and small: it goes into the run's history."""

    attempt: int  # 1-based number of the attempt that failed
    kind: str  # "http_429", "http_503", "timeout", "connect", "reset", "malformed", "failover"
    waited_s: float  # back-off slept before the next attempt
    status: int | None = None
    retry_after_s: float | None = None  # what the provider asked for, before capping
    model: str = ""  # "provider:name" of the endpoint that failed
    passivated: bool = False  # the wait was not slept: the run passivated on a durable timer

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ModelResponse:
    message: ChatMessage
    tokens_in: int = 0
    tokens_out: int = 0
    attempts: int = 1
    retries: tuple[RetryRecord, ...] = ()
    cost_usd: float = 0.0
    provider: str = ""  # the provider that answered (differs from the spec after a failover)
    model: str = ""


class Model(Protocol):
    async def complete(self, request: ModelRequest) -> ModelResponse: ...


class RateLimiter(Protocol):
    """What a provider needs of a limiter (`undying.persistence.ratelimit.RedisRateLimiter`)."""

    async def acquire(self, bucket: str, tokens: int = 0, *, requests: int = 1,
                      limits: Limits | None = None, wait: bool = True) -> float: ...


class ModelConfigError(UndyingError):
    pass


class ProviderError(UndyingError):
    """A model provider failed. Messages never contain secret values."""

    def __init__(self, message: str, *, provider: str, status: int | None = None,
                 retryable: bool = False, retry_after_s: float | None = None,
                 kind: str = "", attempts: int = 1,
                 retries: tuple[RetryRecord, ...] = ()) -> None:
        super().__init__(message)
        self.provider = provider
        self.status = status
        self.retryable = retryable
        self.retry_after_s = retry_after_s
        self.kind = kind or (f"http_{status}" if status is not None else "error")
        self.attempts = attempts
        self.retries = retries


class MalformedOutput(ProviderError):
    """The provider answered but the content is unusable; the model should be told what was wrong."""

    def __init__(self, message: str, *, provider: str, status: int | None = None,
                 retryable: bool = False, attempts: int = 1,
                 retries: tuple[RetryRecord, ...] = ()) -> None:
        super().__init__(message, provider=provider, status=status, retryable=retryable,
                         kind="malformed", attempts=attempts, retries=retries)


class RetryLater(ProviderError):
    """Not a failure: the next attempt must wait ``wait_s``, longer than is worth holding
    an executor for (a long Retry-After, a rate limiter's queue). The run sets a durable
    timer and passivates; the timer dispatches the call again, its attempts counted on.

    ``kind``: why ("http_429", "http_503", "rate_limit", ...); ``attempts``: attempts made
    so far, earlier dispatches included; ``slot``: a rate-limiter slot at the end of the
    wait is reserved for the next attempt (it must not queue again)."""

    def __init__(self, message: str, *, provider: str, wait_s: float, kind: str,
                 attempts: int, retries: tuple[RetryRecord, ...] = (),
                 status: int | None = None, retry_after_s: float | None = None,
                 slot: bool = False) -> None:
        super().__init__(message, provider=provider, status=status, retryable=True,
                         retry_after_s=retry_after_s, kind=kind, attempts=attempts,
                         retries=retries)
        self.wait_s = wait_s
        self.slot = slot


class ModelFactory(Protocol):
    def __call__(self, spec: ModelSpec, *, limiter: RateLimiter | None = None) -> Model: ...


_PROVIDERS: dict[str, ModelFactory] = {}


def register_provider(name: str, factory: ModelFactory) -> None:
    _PROVIDERS[name] = factory


def build_model(spec: ModelSpec, *, limiter: RateLimiter | None = None) -> Model:
    """The model for ``spec``; providers over HTTP call ``limiter`` before every attempt."""
    factory = _PROVIDERS.get(spec.provider)
    if factory is None:
        known = ", ".join(sorted(_PROVIDERS))
        raise ModelConfigError(f"unknown model provider {spec.provider!r}; available: {known}")
    return factory(spec, limiter=limiter)


async def close_model(model: Model) -> None:
    """Release what a model holds (an HTTP connection pool); models without any are left alone."""
    aclose: Callable[[], Any] | None = getattr(model, "aclose", None)
    if aclose is not None:
        result = aclose()
        if inspect.isawaitable(result):
            await result


def estimate_tokens(text: str) -> int:
    return max(1, len(text) // 4)
