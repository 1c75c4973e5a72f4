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
    cost_usd: float = 0.0
    retries: int = 0  # failed model call attempts that were retried

    @property
    def tokens(self) -> int:
        return self.tokens_in + self.tokens_out


# -- execution context ---------------------------------------------------------


class Budgets(Strict):
    """Limits of one run. A child's budgets are capped by what its parent has left."""

    max_steps: int = 200
    max_tokens: int = 1_000_000
    max_tool_calls: int = 500
    max_model_errors: int = 3
    max_depth: int = 3  # how deep the delegation tree below a root may go
    max_children: int = 100  # sub-agents one run may spawn in all (fan-out)
    max_wall_s: float | None = None  # wall time from the root's creation
    max_effect_attempts: int = 4  # a model or tool call lost this often (its executor died) fails the run
    max_cost_usd: float | None = None  # what the run and its sub-agents may spend on models


class SecretRef(Strict):
    """A secret by reference: the name of an environment variable, never its value."""

    env: str


class ToolInfo(Strict):
    name: str
    side_effect: SideEffect
    builtin: bool = False
    reconcile: bool = False  # it has a hook that can tell whether an in-doubt call happened


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
    depth: int = 0  # 0 for a root run, parent's depth + 1 for a sub-agent
    subagent_ref: str | None = None  # the agent `delegate` spawns; None: no delegation
    subagent_version: str | None = None
    subagent_model: ModelSpec | None = None  # overrides the sub-agent's own model (configuration)
    deadline_ms: int | None = None  # wall-time budget as an absolute time, inherited down the tree


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
    status: Literal["intent", "done", "error", "in_doubt", "awaiting_approval"] = "intent"
    result: str | None = None
    error: str | None = None
    # the decision on a call that needed approval: decision, by, at_ms, args_hash, reason
    approval: dict[str, Any] | None = None
    attempt: int = 1  # the dispatch that was in flight when the call went in doubt
    resolution: dict[str, Any] | None = None  # how an in-doubt call was settled, and by whom


def args_hash(arguments: dict[str, Any]) -> str:
    """What an approval approves: the exact arguments, canonical JSON, hashed."""
    import hashlib
    import json

    canon = json.dumps(arguments, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return "sha256:" + hashlib.sha256(canon.encode()).hexdigest()[:16]


class DelegationGroup(Strict):
    """One `delegate` call: its children, and how many must end before the model goes on."""

    call_id: str  # the model's tool call id, answered when the group resolves
    children: tuple[str, ...]
    tasks: tuple[str, ...]
    need: int  # all, any (1) or the first K
    cancel_rest: bool = True  # once resolved, cancel the children still running
    resolved: bool = False


class Delegation(Strict):
    """Sub-agent bookkeeping: the ledger a parent keeps of its children."""

    pending: dict[str, str] = Field(default_factory=dict)  # child run id -> task
    done: dict[str, str] = Field(default_factory=dict)  # child run id -> status
    results: dict[str, str] = Field(default_factory=dict)  # child run id -> answer
    groups: dict[str, DelegationGroup] = Field(default_factory=dict)  # group id -> group
    group_of: dict[str, str] = Field(default_factory=dict)  # child run id -> group id
    ended: dict[str, int] = Field(default_factory=dict)  # group id -> children that ended
    finished: dict[str, int] = Field(default_factory=dict)  # group id -> ... with an answer
    order: tuple[str, ...] = ()  # children in the order their results arrived
    spawned: int = 0  # children spawned in all (the fan-out budget)
    tokens: int = 0  # tokens used by finished children and their subtrees
    steps: int = 0  # steps taken by finished children and their subtrees
    cost_usd: float = 0.0  # spent by finished children and their subtrees


class PendingEffect(Strict):
    effect_id: str
    kind: Literal["model", "tool"]
    step: int
    attempt: int = 1  # bumped each time the call is dispatched again (executor died, back-off)
    # a model call backing off on a durable timer until then: nothing is dispatched, no
    # executor holds it, the timer dispatches it again (see `ModelRetry`)
    retry_at_ms: int | None = None
    backoffs: int = 0  # dispatches that ended in such a back-off (they are not losses)
    tries: int = 0  # provider attempts made by earlier dispatches (they count against the limit)
    slot: bool = False  # the rate limiter's slot for the next attempt is reserved already
    retries: tuple[dict[str, Any], ...] = ()  # retry records of earlier dispatches

    @property
    def backing_off(self) -> bool:
        """Waiting for its back-off timer, not for an executor."""
        return self.retry_at_ms is not None


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


class Spawn(Strict):
    """A parent's request for a sub-agent, committed in its outbox; relaying it creates the
    child run (idempotently: the child id derives from the parent id and step)."""

    type: Literal["spawn"] = "spawn"
    id: str
    task: str
    parent_id: str
    agent_ref: str
    agent_version: str | None = None
    budgets: Budgets  # caps: what the parent had left when it spawned
    depth: int
    deadline_ms: int | None = None
    model: ModelSpec | None = None  # the parent's choice of model for its sub-agents


class ModelReply(Strict):
    type: Literal["model_reply"] = "model_reply"
    id: str
    effect_id: str
    message: ChatMessage
    tokens_in: int = 0
    tokens_out: int = 0
    cost_usd: float = 0.0
    # what it took: failed attempts retried (429s, 5xx, timeouts), each a small plain record
    retries: tuple[dict[str, Any], ...] = ()


class ModelFailed(Strict):
    type: Literal["model_failed"] = "model_failed"
    id: str
    effect_id: str
    error: str
    retryable: bool = False
    # the provider answered, but unusably: the model is told what was wrong (up to a limit)
    malformed: bool = False
    retries: tuple[dict[str, Any], ...] = ()


class ModelRetry(Strict):
    """A model call's next attempt must wait longer than is worth holding an executor for
    (a long Retry-After, a long queue at the rate limiter): the run records it, sets a
    durable timer for ``at_ms`` and passivates; the timer dispatches the call again."""

    type: Literal["model_retry"] = "model_retry"
    id: str
    effect_id: str
    attempt: int  # the dispatch that asks to wait
    at_ms: int  # when to try again
    wait_s: float
    reason: str  # "http_429", "http_503", "rate_limit", ...
    retry_after_s: float | None = None  # what the provider asked for
    attempts: int = 0  # provider attempts made so far, earlier dispatches included
    slot: bool = False  # a rate-limiter slot at ``at_ms`` is reserved for the next attempt
    retries: tuple[dict[str, Any], ...] = ()  # this dispatch's, the deferred one last


class ToolResult(Strict):
    type: Literal["tool_result"] = "tool_result"
    id: str
    effect_id: str
    output: str = ""
    error: str | None = None
    # the tool did not run: it needs someone's approval of these exact arguments first
    needs_approval: bool = False


class Resolve(Strict):
    """Settles a tool call that is in doubt: it happened (with its output), it did not and
    failed, or it did not and is to be dispatched again. From the tool's reconcile hook,
    or from a person (`undying resolve`)."""

    type: Literal["resolve"] = "resolve"
    id: str
    call_id: str
    outcome: Literal["done", "failed", "retry"]
    output: str = ""
    by: str
    at_ms: int = 0
    reason: str = ""


class Approval(Strict):
    """Someone approved or rejected one tool call, for its exact arguments (their hash)."""

    type: Literal["approval"] = "approval"
    id: str
    call_id: str
    approved: bool
    by: str
    at_ms: int
    args_hash: str
    reason: str = ""


class ChildResult(Strict):
    """A sub-agent's final outcome, relayed from its outbox to its parent's inbox."""

    type: Literal["child_result"] = "child_result"
    id: str
    child_id: str
    status: RunStatus
    answer: str | None = None
    error: str | None = None
    tokens: int = 0  # used by the child and its subtree
    steps: int = 0
    cost_usd: float = 0.0


class Cancel(Strict):
    type: Literal["cancel"] = "cancel"
    id: str
    reason: str = "cancelled"


class EffectLost(Strict):
    """A model or tool call whose executor died (or never received it): dispatch it again
    according to its side-effect class, or mark it in doubt."""

    type: Literal["effect_lost"] = "effect_lost"
    id: str
    effect_id: str
    attempt: int
    started: bool  # an at-most-once call had begun: it may have happened
    reason: str = ""
    record: str = ""  # the dispatch record this report saw ("<attempt>|q", "<attempt>|c|<executor>")


class Timer(Strict):
    """A durable timer fired (set by a `SetTimer` effect)."""

    type: Literal["timer"] = "timer"
    id: str
    timer_id: str


Message = Annotated[Start | ModelReply | ModelFailed | ToolResult | ChildResult | Cancel | Spawn
                    | EffectLost | Timer | Approval | Resolve | ModelRetry,
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


class SendMessage(Strict):
    """A message to another run: committed in the outbox, relayed after the commit."""

    type: Literal["send"] = "send"
    to: str
    message: Message


class Reconcile(Strict):
    """Ask an in-doubt tool call's reconcile hook whether it happened; the answer comes back
    as `Resolve` (or nothing, and a person decides)."""

    type: Literal["reconcile"] = "reconcile"
    effect_id: str


class SetTimer(Strict):
    """Deliver `Timer(timer_id)` to this run at ``at_ms``, durably (it survives every restart)."""

    type: Literal["set_timer"] = "set_timer"
    timer_id: str
    at_ms: int


Effect = Annotated[CallModel | CallTool | SendMessage | SetTimer | Reconcile,
                   Field(discriminator="type")]


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
