"""Actors: the run actor, the agent loop, models (LLM providers) and tools.

The pure core (`decide`, the state schema) and the engine import no Ray; the
Ray adapters live in `undying.actors.ray_host` (hosts), `undying.actors.ray_executor`
(executors) and `undying.actors.pool`.
"""

from . import anthropic as _anthropic
from . import openai_compat as _openai_compat
from . import scripted as _scripted  # registers the scripted provider
from ._agent import Agent, AgentNotFound, load_agent
from ._corpus import read, search
from ._decide import decide, recover
from ._engine import RunEngine, create_run, encode_message, load_state, new_run_id
from ._models import (
    MalformedOutput,
    Model,
    ModelRequest,
    ModelResponse,
    ProviderError,
    build_model,
    register_provider,
)
from ._state import (
    Budgets,
    Cancel,
    ChatMessage,
    ChildResult,
    JournalEntry,
    ModelReply,
    ModelSpec,
    RunState,
    SecretRef,
    Start,
    StepEvent,
    ToolCallRequest,
    ToolResult,
)
from ._tools import Tool, ToolArgumentsError, ToolContext, tool
from .scripted import ScriptedModel

register_provider("openai", _openai_compat._from_spec)
register_provider("anthropic", _anthropic._from_spec)

del _scripted, _openai_compat, _anthropic

__all__ = [
    "Agent",
    "AgentNotFound",
    "Budgets",
    "Cancel",
    "ChatMessage",
    "ChildResult",
    "JournalEntry",
    "MalformedOutput",
    "Model",
    "ModelReply",
    "ModelRequest",
    "ModelResponse",
    "ModelSpec",
    "ProviderError",
    "RunEngine",
    "RunState",
    "ScriptedModel",
    "SecretRef",
    "Start",
    "StepEvent",
    "Tool",
    "ToolArgumentsError",
    "ToolCallRequest",
    "ToolContext",
    "ToolResult",
    "build_model",
    "create_run",
    "decide",
    "encode_message",
    "load_agent",
    "load_state",
    "new_run_id",
    "read",
    "recover",
    "register_provider",
    "search",
    "tool",
]
