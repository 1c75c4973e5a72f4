"""What a checkpoint holds, and the messages and effects a step consumes and emits.

Every model refuses fields it does not know (``extra="forbid"``). Messages and
effects are discriminated unions on ``type``. States are updated copy-on-write
so that `undying.persistence.diff_states` writes only what changed.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

SideEffect = Literal["pure", "idempotent", "keyed", "at_most_once"]
RunStatus = Literal[
    "pending", "running", "waiting", "finished", "failed", "cancelled", "quarantined"
]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# -- conversation ------------------------------------------------------------


class ToolCallRequest(Strict):
    id: str
    name: str
    arguments: dict[str, Any] = Field(default_factory=dict)


class ChatMessage(Strict):
    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    tool_calls: tuple[ToolCallRequest, ...] = ()
    tool_call_id: str | None = None
    name: str | None = None


class Usage(Strict):
    model_calls: int = 0
    tool_calls: int = 0
    tokens_in: int = 0
    tokens_out: int = 0

    @property
    def tokens(self) -> int:
        return self.tokens_in + self.tokens_out


# -- execution context ---------------------------------------------------------


class Budgets(Strict):
    max_steps: int = 200
    max_tokens: int = 1_000_000
    max_tool_calls: int = 500
    max_model_errors: int = 3


class SecretRef(Strict):
    """A secret by reference: the name of an environment variable, never its value."""

    env: str


class ToolInfo(Strict):
    name: str
    side_effect: SideEffect
    builtin: bool = False


class ModelSpec(Strict):
    """Which model: configuration, not code. Keys are `SecretRef`s."""

    provider: str = "scripted"
    name: str = "research"
    base_url: str | None = None
    api_key: SecretRef | None = None
    options: dict[str, Any] = Field(default_factory=dict)


class Context(Strict):
    agent_ref: str
    agent_version: str
    instructions: str = ""
    model: ModelSpec = Field(default_factory=ModelSpec)
    tools: dict[str, ToolInfo] = Field(default_factory=dict)
    budgets: Budgets = Field(default_factory=Budgets)
    config: dict[str, Any] = Field(default_factory=dict)
    secrets: dict[str, SecretRef] = Field(default_factory=dict)
    created_ms: int = 0


# -- tool-call journal and delegation ----------------------------------------------


class JournalEntry(Strict):
    """One tool call: its intent is committed before it runs, its result after."""

    call_id: str
    model_call_id: str
    tool: str
    arguments: dict[str, Any] = Field(default_factory=dict)
    key: str
    side_effect: SideEffect
    step: int
    status: Literal["intent", "done", "error", "in_doubt"] = "intent"
    result: str | None = None
    error: str | None = None


class Delegation(Strict):
    """Sub-agent bookkeeping (used by delegation; empty until then, but in the schema)."""

    pending: dict[str, str] = Field(default_factory=dict)  # child run id -> task
    done: dict[str, str] = Field(default_factory=dict)  # child run id -> status
    results: dict[str, str] = Field(default_factory=dict)  # child run id -> answer


class PendingEffect(Strict):
    effect_id: str
    kind: Literal["model", "tool"]
    step: int


class RunState(Strict):
    run_id: str
    parent_id: str | None = None
    status: RunStatus = "pending"
    task: str = ""
    step: int = 0
    inbox_cursor: str = "0-0"
    conversation: tuple[ChatMessage, ...] = ()
    memory: dict[str, str] = Field(default_factory=dict)
    plan: tuple[str, ...] = ()
    journal: dict[str, JournalEntry] = Field(default_factory=dict)
    delegation: Delegation = Field(default_factory=Delegation)
    pending: dict[str, PendingEffect] = Field(default_factory=dict)
    context: Context
    usage: Usage = Field(default_factory=Usage)
    model_errors: int = 0
    result: str | None = None
    error: str | None = None


# -- messages (inbound) ---------------------------------------------------------


class Start(Strict):
    type: Literal["start"] = "start"
    id: str
    task: str


class ModelReply(Strict):
    type: Literal["model_reply"] = "model_reply"
    id: str
    effect_id: str
    message: ChatMessage
    tokens_in: int = 0
    tokens_out: int = 0


class ModelFailed(Strict):
    type: Literal["model_failed"] = "model_failed"
    id: str
    effect_id: str
    error: str
    retryable: bool = False


class ToolResult(Strict):
    type: Literal["tool_result"] = "tool_result"
    id: str
    effect_id: str
    output: str = ""
    error: str | None = None


class ChildResult(Strict):
    """A sub-agent's final outcome, relayed from its outbox to its parent's inbox."""

    type: Literal["child_result"] = "child_result"
    id: str
    child_id: str
    status: RunStatus
    answer: str | None = None
    error: str | None = None


class Cancel(Strict):
    type: Literal["cancel"] = "cancel"
    id: str
    reason: str = "cancelled"


Message = Annotated[Start | ModelReply | ModelFailed | ToolResult | ChildResult | Cancel,
                    Field(discriminator="type")]


class Envelope(Strict):
    """What an inbox entry holds."""

    message: Message


# -- effects (outbound) ---------------------------------------------------------


class CallModel(Strict):
    type: Literal["call_model"] = "call_model"
    effect_id: str


class CallTool(Strict):
    type: Literal["call_tool"] = "call_tool"
    effect_id: str  # the journal's call id


class MarkInDoubt(Strict):
    """An at-most-once call found with an intent and no result: never re-run blindly."""

    type: Literal["in_doubt"] = "in_doubt"
    effect_id: str


class SendMessage(Strict):
    """A message to another run: committed in the outbox, relayed after the commit."""

    type: Literal["send"] = "send"
    to: str
    message: Message


Effect = Annotated[CallModel | CallTool | MarkInDoubt | SendMessage, Field(discriminator="type")]


class StepEvent(Strict):
    """One line of a run's history."""

    step: int
    kind: str
    status: RunStatus
    epoch: int
    at_ms: int
    duration_ms: float = 0.0
    delta_bytes: int = 0
    snapshot_bytes: int = 0
    summary: str = ""
