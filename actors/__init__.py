"""Actors: the run actor, the agent loop, models (LLM providers) and tools.

The pure core (`decide`, the state schema) and the engine import no Ray; the
Ray adapter lives in `undying.actors.ray_actor`.
"""

from . import scripted as _scripted  # registers the scripted provider
from ._agent import Agent, AgentNotFound, load_agent
from ._corpus import read, search
from ._decide import decide, recover
from ._engine import RunEngine, create_run, encode_message, load_state, new_run_id
from ._models import Model, ModelRequest, ModelResponse, build_model, register_provider
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

del _scripted

__all__ = [
    "Agent",
    "AgentNotFound",
    "Budgets",
    "Cancel",
    "ChatMessage",
    "ChildResult",
    "JournalEntry",
    "Model",
    "ModelReply",
    "ModelRequest",
    "ModelResponse",
    "ModelSpec",
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
