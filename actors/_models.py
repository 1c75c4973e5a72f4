"""Models: the seam between the loop and an LLM provider.

A model turns the conversation and the tool schemas into one assistant
message. Which model a run uses is configuration (`ModelSpec`), resolved on
whichever node performs the call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from undying.persistence import UndyingError

from ._state import ChatMessage, ModelSpec


@dataclass(frozen=True)
class ModelRequest:
    messages: tuple[ChatMessage, ...]
    tools: list[dict[str, Any]] = field(default_factory=list)
    run_id: str = ""
    effect_id: str = ""


@dataclass(frozen=True)
class ModelResponse:
    message: ChatMessage
    tokens_in: int = 0
    tokens_out: int = 0


class Model(Protocol):
    async def complete(self, request: ModelRequest) -> ModelResponse: ...


class ModelConfigError(UndyingError):
    pass


ModelFactory = Callable[[ModelSpec], Model]
_PROVIDERS: dict[str, ModelFactory] = {}


def register_provider(name: str, factory: ModelFactory) -> None:
    _PROVIDERS[name] = factory


def build_model(spec: ModelSpec) -> Model:
    factory = _PROVIDERS.get(spec.provider)
    if factory is None:
        known = ", ".join(sorted(_PROVIDERS))
        raise ModelConfigError(f"unknown model provider {spec.provider!r}; available: {known}")
    return factory(spec)


def estimate_tokens(text: str) -> int:
    return max(1, len(text) // 4)
