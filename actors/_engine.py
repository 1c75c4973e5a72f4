"""The run engine: one run's step loop, with no Ray in it.

Activation (start, crash-resume and, later, re-activation after passivation
are one path): claim a new epoch, load the checkpoint, re-send the outbox,
re-dispatch pending effects by their side-effect class, read the inbox from
the cursor the checkpoint consumed. Then for each message: dedup, decide,
commit, and only then perform the effects. A crash before a commit
redelivers the message (it is in the inbox, or its effect is still pending);
a crash after it resumes from the new state.

The Ray actor (`ray_actor.RunActor`) is a thin adapter around this class;
tests drive it directly against any `CheckpointStore`.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from typing import Any

from undying.persistence import (
    CheckpointStore,
    Commit,
    CorruptCheckpoint,
    Fenced,
    UndyingError,
    apply_delta,
    diff_states,
    encode,
    pack,
    plain,
    unpack,
    validate,
)

from ._agent import Agent, load_agent
from ._decide import TERMINAL, decide, mark_in_doubt, notify_parent, recover
from ._models import Model, ModelRequest, build_model
from ._state import (
    CallModel,
    CallTool,
    ChatMessage,
    Effect,
    Envelope,
    MarkInDoubt,
    Message,
    ModelFailed,
    ModelReply,
    RunState,
    SendMessage,
    Start,
    StepEvent,
    ToolResult,
)
from ._tools import ToolArgumentsError, ToolContext


def new_run_id() -> str:
    return f"run-{uuid.uuid4().hex[:12]}"


def encode_message(msg: Message, run_id: str = "?") -> bytes:
    return encode("message", Envelope(message=msg), run_id=run_id)


def create_run(store: CheckpointStore, agent: Agent, task: str, *, run_id: str | None = None,
               parent_id: str | None = None) -> str:
    """Store a new run and its first message. Nothing runs until it is activated."""
    run_id = run_id or new_run_id()
    state = RunState(run_id=run_id, parent_id=parent_id, context=agent.context())
    store.create(run_id, encode("snapshot", state, run_id=run_id), agent=agent.ref,
                 parent=parent_id or "",
                 first_message=encode_message(Start(id=f"start:{run_id}", task=task), run_id))
    return run_id


def load_state(store: CheckpointStore, run_id: str) -> tuple[RunState, Any]:
    """Fold snapshot + journal into a state. A defect quarantines the run."""
    loaded = store.load(run_id)
    try:
        data = unpack("snapshot", loaded.snapshot, run_id=run_id)
        if not isinstance(data, dict):
            raise CorruptCheckpoint(run_id, "snapshot is not a map")
        for raw in loaded.deltas:
            rec = unpack("delta", raw, run_id=run_id)
            if not isinstance(rec, dict) or not isinstance(rec.get("ops"), list):
                raise CorruptCheckpoint(run_id, "delta record has no ops")
            try:
                apply_delta(data, rec["ops"])
            except (ValueError, TypeError, IndexError, AttributeError, KeyError) as exc:
                raise CorruptCheckpoint(run_id, f"delta of step {rec.get('step')}: {exc}") from None
        state = validate("snapshot", RunState, data, run_id=run_id)
        if state.step != loaded.step or state.run_id != run_id:
            raise CorruptCheckpoint(
                run_id, f"state is at step {state.step} of {state.run_id!r}, "
                        f"index says step {loaded.step} of {run_id!r}")
    except CorruptCheckpoint as exc:
        store.quarantine(run_id, exc.reason)
        raise
    return state, loaded


def outbox_entries(run_id: str, effects: list[Effect]) -> tuple[tuple[str, bytes], ...]:
    """The outbox records of a step's messages to other runs: (message id, envelope)."""
    return tuple(
        (f"{run_id}>{e.to}:{e.message.id}",
         pack("outbox", {"to": e.to, "m": Envelope(message=e.message).model_dump(mode="json")},
              run_id=run_id))
        for e in effects if isinstance(e, SendMessage))


def end_run(store: CheckpointStore, run_id: str, status: str, reason: str) -> RunState:
    """End a run from outside its actor (the supervisor's crash-loop guard, an operator).

    It takes a new epoch first, so any incarnation still alive is fenced and
    cannot write after this; then it commits the terminal state like any step.
    """
    epoch = store.claim_epoch(run_id)
    state, loaded = load_state(store, run_id)
    if state.status in TERMINAL:
        return state
    new = state.model_copy(update={"step": state.step + 1, "status": status, "error": reason,
                                   "pending": {}})
    ops = diff_states(state, new)
    delta = pack("delta", {"step": new.step, "ops": ops}, run_id=run_id)
    event = StepEvent(step=new.step, kind=status, status=new.status, epoch=epoch,
                      at_ms=int(time.time() * 1000), delta_bytes=len(delta),
                      summary=f"{status}: {reason}"[:300])
    store.commit(run_id, Commit(epoch=epoch, step=new.step, status=new.status, delta=delta,
                                events=(encode("event", event, run_id=run_id),),
                                outbox=outbox_entries(run_id, notify_parent(state, new))))
    release = getattr(store, "release_lease", None)
    if release is not None:
        release(run_id, epoch, done=True)
    return new


class RunEngine:
    def __init__(self, run_id: str, store: CheckpointStore, *, effect_concurrency: int = 8,
                 compact_ratio: float = 2.0, ledger: Any = None,
                 model_factory: Callable[[Any], Model] | None = None,
                 lease_ttl_s: float | None = None, owner: str = "") -> None:
        self.run_id = run_id
        self.store = store
        self.effect_concurrency = effect_concurrency
        # compact to a snapshot when the journal since it reaches this multiple of its size
        self.compact_ratio = compact_ratio
        self.ledger = ledger if ledger is not None else store
        self.model_factory = model_factory or build_model
        self.epoch = 0
        self.state: RunState | None = None
        self.agent: Agent | None = None
        self.model: Model | None = None
        self.seen: set[str] = set()
        self.read_cursor = "0-0"
        self.journal_bytes = 0
        self.snapshot_bytes = 0
        self.queue: asyncio.Queue[tuple[Message, str | None, float, asyncio.Future[None] | None]]
        self.tasks: set[asyncio.Task[None]] = set()
        self.sem: asyncio.Semaphore
        self.fenced: Fenced | None = None
        # liveness: a lease renewed every ttl/3 by the current epoch only
        self.lease_ttl_s = lease_ttl_s
        self.owner = owner
        self.stop_reason: str | None = None
        self.lease_task: asyncio.Task[None] | None = None

    # -- activation ---------------------------------------------------------

    async def activate(self, epoch: int | None = None) -> RunState:
        """Load and resume. ``epoch``: one the launcher already claimed for this incarnation."""
        self.queue = asyncio.Queue()
        self.sem = asyncio.Semaphore(self.effect_concurrency)
        self.epoch = epoch if epoch is not None else self.store.claim_epoch(self.run_id)
        if self.lease_ttl_s:
            self._renew()  # before any work: a superseded epoch stops here
            self.lease_task = asyncio.get_running_loop().create_task(self._keep_lease())
        state, loaded = load_state(self.store, self.run_id)
        self.state = state
        self.seen = set(loaded.seen)
        self.journal_bytes = loaded.journal_bytes
        self.snapshot_bytes = loaded.snapshot_bytes
        self.read_cursor = state.inbox_cursor
        ctx = state.context
        self.agent = load_agent(ctx.agent_ref, ctx.agent_version)
        self.model = self.model_factory(ctx.model)
        for mid, env in loaded.outbox:
            self._relay(mid, env)
        _, effects = recover(state)
        for e in effects:
            if isinstance(e, MarkInDoubt):
                self._commit(mark_in_doubt(self.state, e.effect_id), [], "in_doubt", None, 0.0)
            else:
                self._perform(e)
        self.pull_inbox()
        return self.state

    def pull_inbox(self) -> int:
        """Queue inbox entries not yet read. Called on activation and on every wake-up."""
        n = 0
        while True:
            entries = self.store.read_inbox(self.run_id, self.read_cursor, 100)
            for entry in entries:
                self.read_cursor = entry.entry_id
                try:
                    env = unpack("message", entry.data, run_id=self.run_id)
                    msg = validate("message", Envelope, env, run_id=self.run_id).message
                except CorruptCheckpoint as exc:
                    self.store.quarantine(self.run_id, f"inbox entry {entry.entry_id}: {exc.reason}")
                    raise
                self.queue.put_nowait((msg, entry.entry_id, time.perf_counter(), None))
                n += 1
            if len(entries) < 100:
                return n

    # -- the loop -------------------------------------------------------------

    async def run(self) -> RunState:
        """Activate, then handle messages until the run ends. Raises `Fenced` if superseded."""
        if self.state is None:
            await self.activate()
        assert self.state is not None
        try:
            while self.state.status not in TERMINAL and self.stop_reason is None:
                msg, entry_id, t0, done = await self.queue.get()
                if msg is None:
                    continue  # a stop request: the loop condition decides
                try:
                    self.step(msg, entry_id, t0)
                finally:
                    if done is not None and not done.done():
                        done.set_result(None)
        finally:
            for t in list(self.tasks):
                t.cancel()
            if self.lease_task is not None:
                self.lease_task.cancel()
        if self.fenced is not None:
            raise self.fenced
        if self.lease_ttl_s and self.state.status in TERMINAL:
            self.store.release_lease(self.run_id, self.epoch, done=True)  # type: ignore[attr-defined]
        return self.state

    def request_stop(self, reason: str) -> None:
        """Stop after the current step (graceful drain, or superseded)."""
        if self.stop_reason is None:
            self.stop_reason = reason
        self.queue.put_nowait((None, None, 0.0, None))  # type: ignore[arg-type]

    def _renew(self) -> None:
        assert self.lease_ttl_s is not None
        self.store.renew_lease(  # type: ignore[attr-defined]
            self.run_id, self.epoch, self.owner or f"epoch {self.epoch}",
            int(self.lease_ttl_s * 1000))

    async def _keep_lease(self) -> None:
        assert self.lease_ttl_s is not None
        while True:
            await asyncio.sleep(self.lease_ttl_s / 3)
            try:
                await asyncio.to_thread(self._renew)
            except Fenced as exc:
                self.fenced = exc
                self.request_stop("fenced")
                return
            except UndyingError:
                continue  # store down: keep trying; the commit path will wait for it too

    def step(self, msg: Message, entry_id: str | None, t0: float) -> None:
        assert self.state is not None
        if entry_id is not None and msg.id in self.seen:
            return  # a redelivered message: applied before
        new, effects = decide(self.state, msg)
        if new is self.state:
            return  # nothing to apply (a late or duplicate result)
        if entry_id is not None:
            new = new.model_copy(update={"inbox_cursor": entry_id})
        self._commit(new, effects, msg.type, entry_id and msg.id,
                     (time.perf_counter() - t0) * 1000)

    def _commit(self, new: RunState, effects: list[Effect], kind: str, seen_id: str | None,
                duration_ms: float) -> None:
        assert self.state is not None
        rid = self.run_id
        ops = diff_states(self.state, new)
        delta = pack("delta", {"step": new.step, "ops": ops}, run_id=rid)
        snapshot = b""
        if self.journal_bytes + len(delta) >= self.compact_ratio * max(self.snapshot_bytes, 1):
            snapshot = encode("snapshot", new, run_id=rid)
        outbox = outbox_entries(rid, effects)
        event = StepEvent(step=new.step, kind=kind, status=new.status, epoch=self.epoch,
                          at_ms=int(time.time() * 1000), duration_ms=round(duration_ms, 3),
                          delta_bytes=0 if snapshot else len(delta),
                          snapshot_bytes=len(snapshot), summary=_summary(new, kind))
        try:
            res = self.store.commit(rid, Commit(
                epoch=self.epoch, step=new.step, status=new.status, delta=b"" if snapshot else delta,
                snapshot=snapshot, events=(encode("event", event, run_id=rid),),
                outbox=outbox, seen=(seen_id,) if seen_id else ()))
        except Fenced as exc:
            self.fenced = exc
            raise
        self.journal_bytes, self.snapshot_bytes = res.journal_bytes, res.snapshot_bytes
        self.state = new
        if seen_id:
            self.seen.add(seen_id)
        for mid, env in outbox:
            self._relay(mid, env)
        for e in effects:
            if not isinstance(e, SendMessage):
                self._perform(e)

    def _relay(self, message_id: str, envelope: bytes) -> None:
        try:
            data = unpack("outbox", envelope, run_id=self.run_id)
            if not isinstance(data, dict) or not isinstance(data.get("to"), str) or "m" not in data:
                raise CorruptCheckpoint(self.run_id, f"outbox entry {message_id} has no recipient")
            msg = validate("message", Envelope, data["m"], run_id=self.run_id)
        except CorruptCheckpoint as exc:
            self.store.quarantine(self.run_id, f"outbox entry {message_id}: {exc.reason}")
            raise
        try:
            self.store.send(data["to"], encode("message", msg, run_id=self.run_id))
        except UndyingError:
            return  # recipient unknown or store down: stays in the outbox, re-sent next activation
        self.store.mark_relayed(self.run_id, message_id)

    # -- effects ---------------------------------------------------------------

    def _perform(self, e: Effect) -> None:
        if isinstance(e, CallModel):
            coro = self._call_model(e.effect_id)
        elif isinstance(e, CallTool):
            coro = self._call_tool(e.effect_id)
        else:
            return
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _submit(self, msg: Message, t0: float) -> None:
        """Hand a result to the loop and wait until its step is committed.

        Holding the effect slot until then means that with concurrency 1 no
        effect starts before the previous one's result is durable.
        """
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.queue.put_nowait((msg, None, t0, fut))
        await fut

    async def _call_model(self, eid: str) -> None:
        async with self.sem:
            assert self.state is not None and self.agent is not None and self.model is not None
            t0 = time.perf_counter()
            req = ModelRequest(messages=self.state.conversation, tools=self.agent.tool_schemas(),
                               run_id=self.run_id, effect_id=eid)
            msg: Message
            try:
                resp = await self.model.complete(req)
                # whatever a provider sent must be storable, or the step would redo forever
                reply = ChatMessage.model_validate(plain(resp.message.model_dump(mode="json")))
                msg = ModelReply(id=f"reply:{eid}", effect_id=eid, message=reply,
                                 tokens_in=resp.tokens_in, tokens_out=resp.tokens_out)
            except Exception as exc:  # a provider fault is data for the loop, not a crash
                msg = ModelFailed(id=f"failed:{eid}", effect_id=eid,
                                  error=f"{type(exc).__name__}: {exc}")
            await self._submit(msg, t0)

    async def _call_tool(self, eid: str) -> None:
        async with self.sem:
            assert self.state is not None and self.agent is not None
            entry = self.state.journal[eid]
            t0 = time.perf_counter()
            tool = self.agent.tools.get(entry.tool)
            ctx = ToolContext(run_id=self.run_id, call_id=eid, key=entry.key,
                              config=self.agent.config)
            msg: ToolResult
            if tool is None:
                msg = ToolResult(id=f"tool:{eid}", effect_id=eid,
                                 error=f"tool {entry.tool!r} is not installed on this node")
            else:
                try:
                    tool.validate(entry.arguments)
                    self.ledger.ledger_record(self.run_id, entry.tool, entry.key)
                    out = await tool.invoke(entry.arguments, ctx)
                    msg = ToolResult(id=f"tool:{eid}", effect_id=eid, output=plain(out))
                except ToolArgumentsError as exc:
                    msg = ToolResult(id=f"tool:{eid}", effect_id=eid, error=str(exc))
                except Exception as exc:
                    msg = ToolResult(id=f"tool:{eid}", effect_id=eid,
                                     error=f"{type(exc).__name__}: {exc}")
            await self._submit(msg, t0)


def _summary(s: RunState, kind: str) -> str:
    if s.status == "finished":
        return "finished"
    if s.status in TERMINAL:
        return f"{s.status}: {s.error or ''}"[:300]
    last = s.conversation[-1] if s.conversation else None
    if kind == "model_reply" and last is not None:
        names = [c.name for c in last.tool_calls]
        return f"model: {', '.join(names) or 'reply'}"[:300]
    if kind == "tool_result" and last is not None:
        return f"tool {last.name}: {len(last.content)} chars"
    if kind == "start":
        return f"task: {s.task[:200]}"
    return kind
