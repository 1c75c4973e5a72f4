"""Executors: perform model and tool calls for many runs at once, while those runs hold no process.

A run that waits for a call commits and passivates; the call is performed
here and its result enters the run's inbox like any message, which
re-activates the run. Every dispatch (effect id + attempt) is claimed in the
store before it runs, so a dispatch sent twice, or superseded by a newer
attempt, runs at most once. Claims are renewed while they run; a claim whose
executor died is reported as `EffectLost` (by the executor's next incarnation,
or by the supervisor when the claim is overdue), and the run's `decide`
chooses by side-effect class whether to run it again or mark it in doubt.

The same class serves one run in-process (`undying.testing.run_inline`) and,
wrapped in a Ray actor (`ray_executor`), every run on a node.

Long waits: with ``passivate_waits`` (an executor whose runs have durable
timers, fired by the supervisor), a model call whose next attempt must wait
longer than its retry policy's ``passivate_after_s`` does not sleep here: it
ends with `ModelRetry`, and its run waits on a timer, holding nothing.
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import json
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from undying.persistence import UndyingError, plain

from ._agent import load_agent
from ._models import MalformedOutput, Model, ModelRequest, RetryLater, build_model
from ._state import (
    ChatMessage,
    EffectLost,
    Envelope,
    Message,
    ModelFailed,
    ModelReply,
    ModelRetry,
    ModelSpec,
    Resolve,
    ToolResult,
    args_hash,
)
from ._telemetry import model_call, recorder_for, tool_call
from ._tools import ToolArgumentsError, ToolContext


@dataclass(frozen=True)
class EffectRequest:
    """One dispatch of a model or tool call: all an executor needs, no secret values."""

    run_id: str
    effect_id: str
    attempt: int
    kind: str  # "model" or "tool"
    agent_ref: str
    agent_version: str | None = None
    # model calls
    spec: ModelSpec | None = None
    messages: tuple[ChatMessage, ...] = ()
    # the conversation is append-only: a host that sent this run's first ``prefix`` messages
    # to this executor before sends only the rest (``messages``); 0: all of it
    prefix: int = 0
    tools: tuple[dict[str, Any], ...] = ()
    tries: int = 0  # provider attempts made by earlier dispatches (before a back-off)
    slot: bool = False  # the rate limiter's slot for the first attempt is reserved already
    # tool calls
    tool: str = ""
    arguments: dict[str, Any] = field(default_factory=dict)
    key: str = ""
    approved_hash: str = ""  # the arguments someone approved, when the tool needs approval


def message_bytes(msg: Message, run_id: str) -> bytes:
    from undying.persistence import encode

    return encode("message", Envelope(message=msg), run_id=run_id)


class Executor:
    def __init__(self, store: Any, name: str, *, incarnation: str | None = None,
                 concurrency: int = 256, claim_lease_ms: int = 6000,
                 model_factory: Callable[[ModelSpec], Model] | None = None,
                 ledger: Any = None,
                 hold: Callable[[EffectRequest], Awaitable[None]] | None = None,
                 on_crash: Callable[[BaseException], None] | None = None,
                 on_done: Callable[[], None] | None = None,
                 passivate_waits: bool = False) -> None:
        """``passivate_waits``: a long back-off ends the call with `ModelRetry` (its run
        waits on a durable timer) instead of a sleep here. Only where something fires the
        runs' timers (the supervisor); in-process runs sleep their waits."""
        self.store = store
        self.name = name
        self.incarnation = incarnation or uuid.uuid4().hex[:10]
        self.claim_lease_ms = claim_lease_ms
        self.model_factory = model_factory or self._build_model
        self.limiter: Any = None  # made on first use, in the loop that uses it
        self.ledger = ledger if ledger is not None else store
        # in-process runs with concurrency 1: keep the slot until the result is committed,
        # so no call starts before the previous one's result is durable
        self.hold = hold
        self.on_crash = on_crash
        self.on_done = on_done
        self.passivate_waits = passivate_waits
        self.sem = asyncio.Semaphore(concurrency)
        self.claimed: dict[str, EffectRequest] = {}  # "run|effect" -> the request running
        self.tasks: set[asyncio.Task[None]] = set()
        self.models: dict[str, Model] = {}
        # each run's conversation as last seen here, so a call ships only what is new
        self.conversations: collections.OrderedDict[str, tuple[ChatMessage, ...]] = (
            collections.OrderedDict())
        self.conversations_max = 2048
        self.stats = {"received": 0, "claimed": 0, "skipped": 0, "completed": 0, "failed": 0}
        self.metrics = recorder_for(store)  # metrics: in process, flushed to Redis each second

    # -- intake -------------------------------------------------------------------

    def submit(self, requests: Iterable[EffectRequest]) -> None:
        """Schedule requests on the running loop (returns at once)."""
        loop = asyncio.get_running_loop()
        for req in requests:
            self.stats["received"] += 1
            task = loop.create_task(self.perform(req))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def perform(self, req: EffectRequest) -> None:
        try:
            await self._perform(req)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            if self.on_crash is None:
                raise
            self.on_crash(exc)  # the in-process host re-raises it where the run is driven

    async def _perform(self, req: EffectRequest) -> None:
        if req.kind == "reconcile":
            await self._reconcile(req)
            return
        if self.hold is not None:
            # one call at a time, in order: nothing is claimed before the previous
            # call's result is committed
            async with self.sem:
                if await self._claim(req):
                    await self._run(req)
            return
        # claimed on receipt, renewed while it waits for a slot and while it runs: a call
        # queued behind others here is not mistaken for a lost one
        if await self._claim(req):
            async with self.sem:
                await self._run(req)

    async def _claim(self, req: EffectRequest) -> bool:
        running = self.claimed.get(f"{req.run_id}|{req.effect_id}")
        if running is not None and running.attempt == req.attempt:
            self.stats["skipped"] += 1  # a second copy of a dispatch running here
            return False
        claim = self.store.fx_claim(req.run_id, req.effect_id, req.attempt, self.name,
                                    self.claim_lease_ms, self.incarnation)
        if claim.status != "ok":
            self.stats["skipped"] += 1
            return False
        self.stats["claimed"] += 1
        self.claimed[f"{req.run_id}|{req.effect_id}"] = req
        return True

    async def _run(self, req: EffectRequest) -> None:
        try:
            t0 = time.perf_counter()
            msg = await (self._model(req) if req.kind == "model" else self._tool(req))
            if req.kind == "tool":  # metrics
                tool_call(self.metrics, req.tool, time.perf_counter() - t0, _tool_outcome(msg))
            self.store.fx_complete(req.run_id, req.effect_id, req.attempt, self.name,
                                   message_bytes(msg, req.run_id), self.incarnation)
            self.stats["completed"] += 1
            self.last_call_s = time.perf_counter() - t0
        finally:
            self.claimed.pop(f"{req.run_id}|{req.effect_id}", None)
        if self.on_done is not None:
            self.on_done()
        if self.hold is not None:
            await self.hold(req)

    # -- calls --------------------------------------------------------------------

    def _build_model(self, spec: ModelSpec) -> Model:
        """Providers share one rate limiter per executor, in the store's Redis (a cluster-wide
        bucket per provider and key), when the spec asks for limits."""
        url = getattr(self.store, "url", None)
        wants = any(k in spec.options for k in ("rpm", "tpm"))
        if self.limiter is None and url and wants:
            from undying.persistence.ratelimit import RedisRateLimiter

            self.limiter = RedisRateLimiter(url)
        return build_model(spec, limiter=self.limiter if wants else None)

    def _model_for(self, spec: ModelSpec) -> Model:
        key = json.dumps(spec.model_dump(mode="json"), sort_keys=True)
        model = self.models.get(key)
        if model is None:
            model = self.models[key] = self.model_factory(spec)
        return model

    async def _model(self, req: EffectRequest) -> Message:
        eid = req.effect_id
        t0 = time.perf_counter()
        try:
            # the agent's module registers what its model needs (a provider, a policy)
            load_agent(req.agent_ref, req.agent_version)
            assert req.spec is not None
            messages = await self._conversation(req)
            resp = await self._model_for(req.spec).complete(ModelRequest(
                messages=messages, tools=list(req.tools), run_id=req.run_id, effect_id=eid,
                can_defer=self.passivate_waits, tries=req.tries, slot_reserved=req.slot))
            model_call(self.metrics, req.spec, time.perf_counter() - t0, resp=resp)  # metrics
            # whatever a provider sent must be storable, or the step would redo forever
            reply = ChatMessage.model_validate(plain(resp.message.model_dump(mode="json")))
            return ModelReply(id=f"reply:{eid}:{req.attempt}", effect_id=eid, message=reply,
                              tokens_in=resp.tokens_in, tokens_out=resp.tokens_out,
                              cost_usd=getattr(resp, "cost_usd", 0.0),
                              retries=_retries(getattr(resp, "retries", ())))
        except RetryLater as exc:  # not a failure: the run waits on a timer, passivated
            self.stats["deferred"] = self.stats.get("deferred", 0) + 1
            _deferred(self.metrics, req.spec, exc)  # metrics
            return ModelRetry(id=f"retry:{eid}:{req.attempt}", effect_id=eid,
                              attempt=req.attempt, at_ms=int((time.time() + exc.wait_s) * 1000),
                              wait_s=round(exc.wait_s, 3), reason=exc.kind,
                              retry_after_s=exc.retry_after_s, attempts=exc.attempts,
                              slot=exc.slot, retries=_retries(exc.retries))
        except Exception as exc:  # a provider fault is data for the loop, not a crash
            self.stats["failed"] += 1
            model_call(self.metrics, req.spec, time.perf_counter() - t0, exc=exc)  # metrics
            return ModelFailed(id=f"failed:{eid}:{req.attempt}", effect_id=eid,
                               error=f"{type(exc).__name__}: {exc}"[:2000],
                               retryable=bool(getattr(exc, "retryable", False)),
                               malformed=isinstance(exc, MalformedOutput),
                               retries=_retries(getattr(exc, "retries", ())))

    async def _conversation(self, req: EffectRequest) -> tuple[ChatMessage, ...]:
        """The whole conversation of a model call: the prefix kept here plus what was sent.
        If the prefix is not here (a new executor, evicted), it is read from the run's
        checkpoint: the conversation only ever grows, so any later state has that prefix."""
        if req.prefix == 0:
            messages = req.messages
        else:
            kept = self.conversations.get(req.run_id)
            if kept is None or len(kept) < req.prefix:
                from ._engine import load_state

                state, _ = await asyncio.to_thread(load_state, self.store, req.run_id)
                kept = state.conversation
                self.stats["conversation_reloads"] = self.stats.get("conversation_reloads", 0) + 1
            messages = (*kept[: req.prefix], *req.messages)
        self.conversations[req.run_id] = messages
        self.conversations.move_to_end(req.run_id)
        while len(self.conversations) > self.conversations_max:
            self.conversations.popitem(last=False)
        return messages

    async def _tool(self, req: EffectRequest) -> Message:
        eid = req.effect_id
        mid = f"tool:{eid}:{req.attempt}"
        try:
            agent = load_agent(req.agent_ref, req.agent_version)
        except UndyingError as exc:
            return ToolResult(id=mid, effect_id=eid, error=str(exc))
        tool = agent.tools.get(req.tool)
        if tool is None:
            return ToolResult(id=mid, effect_id=eid,
                              error=f"tool {req.tool!r} is not installed on this node")
        ctx = ToolContext(run_id=req.run_id, call_id=eid, key=req.key, attempt=req.attempt,
                          config=agent.config)
        try:
            tool.validate(req.arguments)
            if tool.needs_approval(req.arguments) and req.approved_hash != args_hash(req.arguments):
                # not run: the run records the request and waits for a decision
                return ToolResult(id=mid, effect_id=eid, needs_approval=True,
                                  output=args_hash(req.arguments))
            if tool.side_effect == "at_most_once":
                # from here on a crash leaves the call in doubt: it may have happened
                self.store.fx_start(req.run_id, req.effect_id, req.attempt)
            self.ledger.ledger_record(req.run_id, req.tool, req.key)
            out = await tool.invoke(req.arguments, ctx)
            return ToolResult(id=mid, effect_id=eid, output=plain(out))
        except ToolArgumentsError as exc:
            return ToolResult(id=mid, effect_id=eid, error=str(exc))
        except Exception as exc:
            self.stats["failed"] += 1
            return ToolResult(id=mid, effect_id=eid, error=f"{type(exc).__name__}: {exc}")

    async def _reconcile(self, req: EffectRequest) -> None:
        """Ask an in-doubt call's reconcile hook whether it happened; settle it if it knows."""
        try:
            tool = load_agent(req.agent_ref, req.agent_version).tools.get(req.tool)
            if tool is None or tool.reconcile is None:
                return
            ctx = ToolContext(run_id=req.run_id, call_id=req.effect_id, key=req.key,
                              attempt=req.attempt)
            answer = tool.reconcile(tool.validate(req.arguments), ctx)
            if inspect.isawaitable(answer):
                answer = await answer
        except Exception as exc:  # the hook failed: a person decides
            answer, why = None, f"{type(exc).__name__}: {exc}"
        else:
            why = ""
        if not answer:
            return  # it cannot tell: the call stays in doubt for a person
        outcome, output = answer
        msg = Resolve(id=f"resolve:{req.effect_id}:{req.attempt}", call_id=req.effect_id,
                      outcome="done" if outcome == "done" else "retry",
                      output=_text(output) if outcome == "done" and output is not None else "",
                      by=f"reconcile hook of {req.tool}", at_ms=int(time.time() * 1000),
                      reason=why)
        self.store.deliver(req.run_id, message_bytes(msg, req.run_id))

    # -- liveness -------------------------------------------------------------------

    def heartbeat(self) -> int:
        """Renew the claims of the calls running here (call about every second)."""
        if not self.claimed:
            return 0
        return int(self.store.fx_heartbeat(list(self.claimed), self.claim_lease_ms))

    async def heartbeat_forever(self, every_s: float = 1.0) -> None:
        while True:
            await asyncio.sleep(every_s)
            try:
                await asyncio.to_thread(self.heartbeat)
            except UndyingError:
                continue  # the store is down: claims may go overdue; results are still sent

    def report_lost(self, *, reason: str, dead: Callable[[str], bool] | None = None) -> int:
        """Report the calls earlier incarnations of this executor claimed and never finished.

        Ray restarts an executor only after its process died, so every claim of
        another incarnation under this name is lost: its run gets `EffectLost`.
        """
        lost = [c for c in self.store.executor_claims(self.name)
                if c[3] != self.incarnation and (dead is None or dead(c[3]))]
        for run_id, eid, attempt, inc in lost:
            rec = self.store.fx_records(run_id).get(eid, "")
            if not rec.startswith(f"{attempt}|"):
                continue  # answered or dispatched again since
            report_lost(self.store, run_id, eid, attempt, started=rec_started(rec), record=rec,
                        reason=f"{reason} (executor {self.name}#{inc})")
        self.store.executor_forget(self.name, lost)
        return len(lost)


def _tool_outcome(msg: Any) -> str:
    """A tool result's outcome, as the metric `undying_tool_calls_total` counts it."""
    if getattr(msg, "needs_approval", False):
        return "needs_approval"
    error = getattr(msg, "error", None)
    if not error:
        return "ok"
    if error.startswith("bad arguments for tool"):
        return "invalid_arguments"
    if error.startswith("tool ") and "is not installed" in error:
        return "not_installed"
    return "error"


def _deferred(rec: Any, spec: ModelSpec | None, exc: RetryLater) -> None:
    """The failed attempts of a call that went to back off on a timer (its final reply or
    failure counts only what comes after): retries, and 429s, by provider and model."""
    labels = {"provider": spec.provider if spec else "unknown",
              "model": spec.name if spec else "unknown"}
    failed = [r for r in exc.retries if r.kind != "rate_limit"]
    for r in failed:
        rec.inc("undying_model_retries_total", kind=r.kind, **labels)
    limited = sum(1 for r in failed if r.kind == "http_429")
    if limited:
        rec.inc("undying_model_rate_limited_total", limited, **labels)


def _text(value: Any) -> str:
    return plain(value) if isinstance(value, str) else json.dumps(plain(value), default=str)


def _retries(records: Iterable[Any]) -> tuple[dict[str, Any], ...]:
    """Retry records as plain data for the run's history (they hold no secret)."""
    return tuple(plain(r.to_dict() if hasattr(r, "to_dict") else dict(r)) for r in records)


def rec_started(record: str) -> bool:
    """Whether a dispatch record says the call may have happened (an at-most-once call
    that began): "<attempt>|s|<executor>". Claimed-only ("|c|") or queued ("|q") did not."""
    return record.split("|")[1:2] == ["s"]


def report_lost(store: Any, run_id: str, effect_id: str, attempt: int, *, started: bool,
                reason: str, record: str = "") -> None:
    """Tell a run that one dispatch of a call was lost (deduplicated by its message id).
    ``record``: the dispatch record the report is based on (the run ignores the report if
    the record has changed since: claimed by another executor meanwhile)."""
    from undying.persistence import RunNotFound

    msg = EffectLost(id=f"lost:{effect_id}:{attempt}", effect_id=effect_id, attempt=attempt,
                     started=started, reason=reason[:300], record=record)
    try:
        store.deliver(run_id, message_bytes(msg, run_id))
    except RunNotFound:
        pass
