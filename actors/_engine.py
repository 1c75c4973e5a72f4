"""The run engine: one activation of one run, with no Ray in it.

Activation (start, crash-resume and re-activation after passivation are one
path): take the run's lease with a new epoch, load the checkpoint, re-send the
outbox, and after an activation that died, re-send the calls no executor
claimed and reconcile children that ended. Then for each inbox message:
dedup, decide, commit, and only then relay the step's messages and dispatch
its calls. When the inbox is empty the host passivates the run (the store
refuses if a message arrived meanwhile, and the host goes on). A crash before
a commit redelivers the message; a crash after it resumes from the new state.

Hosts (`ray_host.RunHost`) and the in-process runner (`inline.host_inline`)
are thin adapters around this class; tests drive it against any store.
"""

from __future__ import annotations

import collections
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from undying.persistence import (
    CheckpointStore,
    Commit,
    CorruptCheckpoint,
    InboxEntry,
    NeedsUpgrade,
    RunExists,
    RunNotFound,
    UndyingError,
    apply_delta,
    diff_states,
    encode,
    pack,
    unpack,
    validate,
)

from ._agent import Agent, AgentNotFound, load_agent
from ._decide import RETRY, TERMINAL, decide, end_of_run
from ._executor import EffectRequest, message_bytes, rec_started, report_lost
from ._retries import describe_retries
from ._state import (
    Budgets,
    CallModel,
    CallTool,
    ChildResult,
    Context,
    Effect,
    EffectLost,
    Envelope,
    Message,
    ModelFailed,
    ModelReply,
    ModelRetry,
    Reconcile,
    RunState,
    SendMessage,
    SetTimer,
    Spawn,
    Start,
    StepEvent,
    Timer,
)
from ._telemetry import committed, recorder_for


def new_run_id() -> str:
    return f"run-{uuid.uuid4().hex[:12]}"


def encode_message(msg: Message, run_id: str = "?") -> bytes:
    return message_bytes(msg, run_id)


def create_run(store: CheckpointStore, agent: Agent, task: str, *, run_id: str | None = None,
               parent_id: str | None = None) -> str:
    """Store a new root run and its first message, queued for activation."""
    ctx = agent.context()
    if agent.budgets.max_wall_s is not None:
        ctx = ctx.model_copy(update={
            "deadline_ms": ctx.created_ms + int(agent.budgets.max_wall_s * 1000)})
    return create_run_from(store, ctx, task, run_id=run_id or new_run_id(), parent_id=parent_id)


def create_run_from(store: CheckpointStore, ctx: Context, task: str, *, run_id: str,
                    parent_id: str | None = None) -> str:
    state = RunState(run_id=run_id, parent_id=parent_id, context=ctx)
    store.create(run_id, encode("snapshot", state, run_id=run_id), agent=ctx.agent_ref,
                 parent=parent_id or "",
                 first_message=encode_message(Start(id=f"start:{run_id}", task=task), run_id))
    return run_id


def cap_budgets(own: Budgets, caps: Budgets) -> Budgets:
    """Field by field the smaller: a child never gets more than its parent had left."""
    out: dict[str, Any] = {}
    for name in Budgets.model_fields:
        a, b = getattr(own, name), getattr(caps, name)
        out[name] = b if a is None else a if b is None else min(a, b)
    return Budgets(**out)


def spawn_child(store: Any, child_id: str, spawn: Spawn) -> None:
    """Create the child run a parent's committed spawn asks for; a re-sent spawn is a no-op."""
    try:
        agent = load_agent(spawn.agent_ref, spawn.agent_version)
        ctx = agent.context()
    except AgentNotFound as exc:
        # the child cannot exist here: its parent learns it as a child that failed
        msg = ChildResult(id=f"result:{child_id}", child_id=child_id, status="failed",
                          error=f"cannot start sub-agent: {exc}")
        store.deliver(spawn.parent_id, encode_message(msg, spawn.parent_id))
        return
    # the child's own wall-time budget counts from its creation, and never past its parent's
    deadline = spawn.deadline_ms
    if agent.budgets.max_wall_s is not None:
        own = ctx.created_ms + int(agent.budgets.max_wall_s * 1000)
        deadline = own if deadline is None else min(deadline, own)
    update: dict[str, Any] = {"budgets": cap_budgets(agent.budgets, spawn.budgets),
                              "depth": spawn.depth, "deadline_ms": deadline}
    if spawn.model is not None:
        update["model"] = spawn.model
        if ctx.subagent_ref is not None:  # and down the tree
            update["subagent_model"] = spawn.model
    ctx = ctx.model_copy(update=update)
    try:
        create_run_from(store, ctx, spawn.task, run_id=child_id, parent_id=spawn.parent_id)
    except RunExists:
        pass  # a spawn re-sent after a crash finds the child that exists


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
    except NeedsUpgrade:
        raise  # written by a newer undying: not corrupt, this node is old
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


def relay(store: Any, run_id: str, message_id: str, envelope: bytes) -> bool:
    """Deliver one committed outbox entry, then mark it relayed. False: try again later.

    A spawn creates the child run; anything else goes to the recipient's inbox
    (which queues the recipient if it is passivated). Recipients dedup by
    message id, so re-sending after a crash is harmless.
    """
    try:
        data = unpack("outbox", envelope, run_id=run_id)
        if not isinstance(data, dict) or not isinstance(data.get("to"), str) or "m" not in data:
            raise CorruptCheckpoint(run_id, f"outbox entry {message_id} has no recipient")
        msg = validate("message", Envelope, data["m"], run_id=run_id).message
    except CorruptCheckpoint as exc:
        store.quarantine(run_id, f"outbox entry {message_id}: {exc.reason}")
        raise
    try:
        if isinstance(msg, Spawn):
            spawn_child(store, data["to"], msg)
        else:
            store.deliver(data["to"], encode_message(msg, run_id))
    except RunNotFound:
        pass  # the recipient was deleted: nobody is left to tell
    except UndyingError:
        return False  # store down: stays in the outbox, re-sent later
    store.mark_relayed(run_id, message_id)
    return True


def end_run(store: Any, run_id: str, status: str, reason: str) -> RunState:
    """End a run from outside its host (the supervisor's crash-loop guard, an operator).

    It takes a new epoch first, so any incarnation still alive is fenced and
    cannot write after this; then it commits the terminal state like any step
    and relays what that sends (the parent's result, cancels to children).
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
    outbox = outbox_entries(run_id, end_of_run(state, new))
    store.commit(run_id, Commit(epoch=epoch, step=new.step, status=new.status, delta=delta,
                                events=(encode("event", event, run_id=run_id),), outbox=outbox))
    for mid, env in (*loaded.outbox, *outbox):
        relay(store, run_id, mid, env)
    release = getattr(store, "release_lease", None)
    if release is not None:
        release(run_id, epoch, done=True)
    return new


Dispatch = Callable[[list[EffectRequest]], None]


@dataclass(frozen=True)
class Warm:
    """What a host keeps of a run it passivated (see `RunEngine.activate`)."""

    epoch: int
    step: int
    state: RunState
    seen: set[str]
    journal_bytes: int
    snapshot_bytes: int
    read_cursor: str
    agent: Agent
    sent: int = 0  # messages of its conversation this host's executor has seen


class RunEngine:
    """One activation of one run. ``dispatch`` sends model and tool calls to an executor."""

    def __init__(self, run_id: str, store: Any, *, dispatch: Dispatch,
                 compact_ratio: float = 2.0,
                 lost: Callable[[str], bool] | None = None,
                 on_applied: Callable[[Message], None] | None = None,
                 on_spawn: Callable[[str], None] | None = None,
                 after_commit: Callable[[RunState], None] | None = None,
                 ship_tails: bool = False) -> None:
        self.run_id = run_id
        self.store = store
        self.dispatch = dispatch
        # compact to a snapshot when the journal since it reaches this multiple of its size
        self.compact_ratio = compact_ratio
        # which executors' claims count as lost on a recovering activation (in-process only:
        # on a cluster, the supervisor and executors' next incarnations decide that)
        self.lost = lost
        self.on_applied = on_applied
        self.on_spawn = on_spawn
        # called between a commit and its relays and dispatches (tests pause here to kill)
        self.after_commit = after_commit
        self.epoch = 0
        self.state: RunState | None = None
        self.agent: Agent | None = None
        self.seen: set[str] = set()
        self.read_cursor = "0-0"
        self.journal_bytes = 0
        self.snapshot_bytes = 0
        self.queue: collections.deque[tuple[Message, str | None, float]] = collections.deque()
        self.steps = 0
        self.warm_hit = False
        # how much of the conversation this host's executor has seen (see _requests)
        self.sent = 0
        self.ship_tails = ship_tails
        self.metrics = recorder_for(store)  # metrics: in process, flushed to Redis each second

    # -- activation ---------------------------------------------------------

    def activate(self, epoch: int, clean: bool = True, *, warm: Warm | None = None,
                 step: int | None = None) -> RunState:
        """Load and resume, under an epoch the caller took with the run's lease.

        ``warm``: what this process kept of the run when it passivated it. It is used
        instead of a reload when nobody took the run since (the epoch this activation took
        is the very next one, and the checkpoint is at the same step): the cost of a step
        then grows with the step, not with the run, however often it passivates.
        """
        self.epoch = epoch
        if (warm is not None and clean and warm.epoch == epoch - 1
                and (step is None or warm.step == step)):
            self.state, self.seen, self.agent = warm.state, warm.seen, warm.agent
            self.journal_bytes, self.snapshot_bytes = warm.journal_bytes, warm.snapshot_bytes
            self.read_cursor = warm.read_cursor
            self.sent = warm.sent
            self.warm_hit = True
            self.pull_inbox()
            return self.state
        state, loaded = load_state(self.store, self.run_id)
        self.state = state
        self.seen = set(loaded.seen)
        self.journal_bytes = loaded.journal_bytes
        self.snapshot_bytes = loaded.snapshot_bytes
        self.read_cursor = state.inbox_cursor
        for mid, env in loaded.outbox:
            relay(self.store, self.run_id, mid, env)
        if state.status in TERMINAL:
            return state
        ctx = state.context
        self.agent = load_agent(ctx.agent_ref, ctx.agent_version)
        if not clean:
            self._recover(state)
        self.pull_inbox()
        return state

    def _recover(self, state: RunState) -> None:
        """After an activation that died: re-send calls no executor claimed (a claim names
        the one executor that may run that attempt), and ask children that ended."""
        records = self.store.fx_records(self.run_id)
        resend = []
        for eid, p in sorted(state.pending.items()):
            rec = records.get(eid, "")
            if rec == f"{p.attempt}|q":
                resend.append(CallModel(effect_id=eid) if p.kind == "model"
                              else CallTool(effect_id=eid))
            elif rec[len(str(p.attempt)):].startswith(("|c|", "|s|")) and self.lost is not None \
                    and self.lost(rec.split("|", 2)[2]):
                report_lost(self.store, self.run_id, eid, p.attempt, started=rec_started(rec), record=rec,
                            reason="its executor died with the run's last activation")
        if resend:
            self.dispatch(self._requests(state, resend))
        self._reconcile_children(state)

    def _reconcile_children(self, state: RunState) -> None:
        """A child that ended while its result could not reach us is asked directly."""
        for child in sorted(state.delegation.pending):
            try:
                info = self.store.info(child)
            except RunNotFound:
                continue
            if info.status not in TERMINAL:
                continue
            try:
                cs, _ = load_state(self.store, child)
            except UndyingError:
                continue
            msg = ChildResult(id=f"result:{child}", child_id=child, status=cs.status,
                              answer=cs.result, error=cs.error,
                              tokens=cs.usage.tokens + cs.delegation.tokens,
                              steps=cs.step + cs.delegation.steps,
                              cost_usd=cs.usage.cost_usd + cs.delegation.cost_usd)
            self.store.deliver(self.run_id, encode_message(msg, self.run_id))

    def keep(self) -> Warm | None:
        """What to keep of a run just passivated, for its next activation here."""
        s = self.state
        if s is None or s.status in TERMINAL or self.agent is None:
            return None
        return Warm(self.epoch, s.step, s, self.seen, self.journal_bytes, self.snapshot_bytes,
                    self.read_cursor, self.agent, self.sent)

    def pull_inbox(self) -> int:
        """Queue inbox entries not yet read."""
        n = 0
        while True:
            entries = self.store.read_inbox(self.run_id, self.read_cursor, 100)
            n += self.feed(entries)
            if len(entries) < 100:
                return n

    def feed(self, entries: Sequence[InboxEntry]) -> int:
        """Queue inbox entries read by the caller (in order, after ``read_cursor``)."""
        for entry in entries:
            self.read_cursor = entry.entry_id
            try:
                env = unpack("message", entry.data, run_id=self.run_id)
                msg = validate("message", Envelope, env, run_id=self.run_id).message
            except CorruptCheckpoint as exc:
                self.store.quarantine(self.run_id, f"inbox entry {entry.entry_id}: {exc.reason}")
                raise
            self.queue.append((msg, entry.entry_id, time.perf_counter()))
        return len(entries)

    # -- the loop -------------------------------------------------------------

    def drain(self) -> RunState:
        """Apply every message that is there, then return (the caller passivates)."""
        assert self.state is not None
        while True:
            while self.queue and self.state.status not in TERMINAL:
                msg, entry_id, t0 = self.queue.popleft()
                self.step(msg, entry_id, t0)
            if self.state.status in TERMINAL or self.pull_inbox() == 0:
                return self.state

    def step(self, msg: Message, entry_id: str | None, t0: float) -> None:
        assert self.state is not None
        if entry_id is not None and msg.id in self.seen:
            return  # a redelivered message: applied before
        if isinstance(msg, EffectLost) and self._stale(msg):
            return  # the dispatch it calls lost was claimed by another executor since
        old = self.state
        new, effects = decide(old, msg)
        if new is not old:
            if entry_id is not None:
                new = new.model_copy(update={"inbox_cursor": entry_id})
            self._commit(new, effects, msg.type, entry_id and msg.id,
                         (time.perf_counter() - t0) * 1000, msg)
        self._drop_dispatches(old, new, msg)
        if self.on_applied is not None:
            self.on_applied(msg)

    def _stale(self, msg: EffectLost) -> bool:
        """A loss report races a re-send of the same dispatch (a restart re-sends what nobody
        claimed): if the record it saw has changed since and shows the same attempt claimed
        by another executor, that one is running it, and dispatching it again would run it
        twice. A report that saw nothing, or whose record is unchanged, stands."""
        if not msg.record:
            return False
        rec = self.store.fx_records(self.run_id).get(msg.effect_id, "")
        return rec != msg.record and rec.startswith((f"{msg.attempt}|c|", f"{msg.attempt}|s|"))

    def _drop_dispatches(self, old: RunState, new: RunState, msg: Message) -> None:
        """Forget the dispatch records of calls the run no longer waits for without a
        result having dropped them (one marked in doubt, or a lost-call report about a call
        that is not pending any more): otherwise they would be reported lost forever."""
        result_for = getattr(msg, "effect_id", None) if msg.type != "effect_lost" else None
        gone = [e for e in old.pending if e not in new.pending and e != result_for]
        if msg.type == "effect_lost" and msg.effect_id not in new.pending:  # type: ignore[union-attr]
            gone.append(msg.effect_id)  # type: ignore[union-attr]
        if gone and new.status not in TERMINAL:  # a terminal commit drops them all itself
            self.store.fx_drop(self.run_id, sorted(set(gone)))

    def _commit(self, new: RunState, effects: list[Effect], kind: str, seen_id: str | None,
                duration_ms: float, msg: Message | None = None) -> None:
        assert self.state is not None
        rid = self.run_id
        ops = diff_states(self.state, new)
        delta = pack("delta", {"step": new.step, "ops": ops}, run_id=rid)
        snapshot = b""
        if self.journal_bytes + len(delta) >= self.compact_ratio * max(self.snapshot_bytes, 1):
            snapshot = encode("snapshot", new, run_id=rid)
        outbox = outbox_entries(rid, effects)
        calls = [e for e in effects if isinstance(e, (CallModel, CallTool))]
        event = StepEvent(step=new.step, kind=kind, status=new.status, epoch=self.epoch,
                          at_ms=int(time.time() * 1000), duration_ms=round(duration_ms, 3),
                          delta_bytes=0 if snapshot else len(delta),
                          snapshot_bytes=len(snapshot),
                          summary=_summary(new, kind, self.state, msg))
        t_commit = time.perf_counter()
        # the delta goes along with a snapshot too: the run's history keeps every step's delta
        res = self.store.commit(rid, Commit(
            epoch=self.epoch, step=new.step, status=new.status, delta=delta, kind=kind,
            snapshot=snapshot, events=(encode("event", event, run_id=rid),),
            outbox=outbox, seen=(seen_id,) if seen_id else (),
            effects=tuple((e.effect_id, new.pending[e.effect_id].attempt) for e in calls),
            timers=tuple((e.timer_id, e.at_ms) for e in effects if isinstance(e, SetTimer)),
            approvals=_approvals(self.state, new)))
        committed(self.metrics, time.perf_counter() - t_commit, len(delta), len(snapshot), res,
                  self.state, new, kind, effects)  # metrics
        self.journal_bytes, self.snapshot_bytes = res.journal_bytes, res.snapshot_bytes
        self.state = new
        self.steps += 1
        if seen_id:
            self.seen.add(seen_id)
        if self.after_commit is not None:
            self.after_commit(new)
        for mid, env in outbox:
            relay(self.store, rid, mid, env)
        if self.on_spawn is not None:
            for e in effects:
                if isinstance(e, SendMessage) and isinstance(e.message, Spawn):
                    self.on_spawn(e.to)
        reconciles = [e for e in effects if isinstance(e, Reconcile)]
        if calls or reconciles:
            self.dispatch(self._requests(new, [*calls, *reconciles]))

    def relay_outbox(self) -> None:
        """Re-send what the store still holds in the outbox (before passivating)."""
        for mid, env in self.store.load(self.run_id).outbox:
            relay(self.store, self.run_id, mid, env)

    # -- effects ---------------------------------------------------------------

    def _requests(self, state: RunState, calls: Sequence[Effect]) -> list[EffectRequest]:
        assert self.agent is not None
        ctx = state.context
        out = []
        schemas: tuple[dict[str, Any], ...] | None = None
        for e in calls:
            if isinstance(e, Reconcile):
                # no dispatch record: if it is lost, the call simply stays in doubt
                entry = state.journal[e.effect_id]
                out.append(EffectRequest(
                    run_id=self.run_id, effect_id=e.effect_id, attempt=entry.attempt,
                    kind="reconcile", agent_ref=ctx.agent_ref, agent_version=ctx.agent_version,
                    tool=entry.tool, arguments=entry.arguments, key=entry.key))
                continue
            p = state.pending[e.effect_id]  # type: ignore[union-attr]
            if isinstance(e, CallModel):
                if schemas is None:
                    schemas = tuple(self.agent.tool_schemas())
                # the executor keeps the conversation: send only what it has not seen (the
                # conversation only grows), unless this activation does not know what it saw
                prefix = min(self.sent, len(state.conversation)) if self.ship_tails else 0
                out.append(EffectRequest(
                    run_id=self.run_id, effect_id=e.effect_id, attempt=p.attempt, kind="model",
                    agent_ref=ctx.agent_ref, agent_version=ctx.agent_version, spec=ctx.model,
                    messages=state.conversation[prefix:], prefix=prefix, tools=schemas,
                    tries=p.tries, slot=p.slot))
                self.sent = len(state.conversation)
            elif isinstance(e, CallTool):
                entry = state.journal[e.effect_id]
                approved = (entry.approval or {})
                out.append(EffectRequest(
                    run_id=self.run_id, effect_id=e.effect_id, attempt=p.attempt, kind="tool",
                    agent_ref=ctx.agent_ref, agent_version=ctx.agent_version, tool=entry.tool,
                    arguments=entry.arguments, key=entry.key,
                    approved_hash=approved.get("args_hash", "")
                    if approved.get("decision") == "approved" else ""))
        return out


def _approvals(old: RunState, new: RunState) -> tuple[tuple[str, bool], ...]:
    """Calls that started or stopped waiting for someone's decision in this step."""
    if old.journal is new.journal and old.status == new.status:
        return ()
    out = []
    ended = new.status in TERMINAL
    for cid, e in new.journal.items():
        was = old.journal.get(cid)
        before = was is not None and was.status == "awaiting_approval"
        now = e.status == "awaiting_approval" and not ended
        if before != now:
            out.append((cid, now))
    return tuple(out)


def _summary(s: RunState, kind: str, old: RunState | None = None,
             msg: Message | None = None) -> str:
    retried = _retried(old, msg)
    if s.status == "finished":
        return f"finished, {retried}"[:300] if retried else "finished"
    if s.status in TERMINAL:
        if retried:
            return f"{s.status}: {(s.error or '')[:150]}; {retried}"[:300]
        return f"{s.status}: {s.error or ''}"[:300]
    if isinstance(msg, ModelRetry):
        return _backoff(msg)[:300]
    if isinstance(msg, Timer) and msg.timer_id.startswith(RETRY):
        eid = msg.timer_id[len(RETRY):].rpartition(":")[0]
        p = s.pending.get(eid)
        if p is not None:
            return f"back-off over: model call {eid} dispatched again (attempt {p.attempt})"
    last = s.conversation[-1] if s.conversation else None
    if kind == "model_reply":
        last = next((m for m in reversed(s.conversation) if m.role == "assistant"), None)
    if kind == "model_reply" and last is not None:
        names = [c.name for c in last.tool_calls]
        tail = f", {retried}" if retried else ""
        if "delegate" in names:
            return (f"model: {', '.join(names)} ({s.delegation.spawned} sub-agents so far)"
                    f"{tail}")[:300]
        return f"model: {', '.join(names) or 'reply'}{tail}"[:300]
    if kind == "model_failed" and retried:
        return f"model reply unusable, the model was told; {retried}"[:300]
    if kind == "tool_result" and s.status == "waiting":  # before the general tool case
        waiting = [e for e in s.journal.values() if e.status == "awaiting_approval"]
        if waiting:
            e = waiting[-1]
            return f"awaiting approval: {e.call_id} {e.tool} {_args(e.arguments)}"[:300]
    if kind == "tool_result" and last is not None:
        return f"tool {last.name}: {len(last.content)} chars"
    if kind == "child_result":
        d = s.delegation
        return f"sub-agent ended ({len(d.done)} done, {len(d.pending)} pending)"
    if kind == "effect_lost":
        return "a call was lost with its executor: dispatched again or marked in doubt"
    if kind == "approval":
        decided = [e for e in s.journal.values() if e.approval]
        if decided:
            e = max(decided, key=lambda x: x.approval["at_ms"])  # type: ignore[index]
            a = e.approval or {}
            return (f"{a.get('decision')} {e.call_id} ({e.tool}) by {a.get('by')}, args "
                    f"{a.get('args_hash')}" + (f": {a['reason']}" if a.get("reason") else ""))[:300]
    if kind == "start":
        return f"task: {s.task[:200]}"
    return kind


def _retried(old: RunState | None, msg: Message | None) -> str:
    """What a model call's answer took, for its step's history line: every retry since the
    call was first dispatched (back-offs on a timer included) and the time waited in all.
    "" when it took one attempt."""
    if not isinstance(msg, ModelReply | ModelFailed) or old is None:
        return ""
    p = old.pending.get(msg.effect_id)
    records = [*(p.retries if p is not None else ()), *msg.retries]
    if not records:
        return ""
    waited = sum(float(r.get("waited_s") or 0.0) for r in records if r.get("kind") != "failover")
    return f"after {describe_retries(records)}; waited {waited:.1f} s"


def _backoff(msg: ModelRetry) -> str:
    until = time.strftime("%H:%M:%S", time.gmtime(msg.at_ms / 1000))
    why = msg.reason + (f", Retry-After {msg.retry_after_s:g} s"
                        if msg.retry_after_s is not None else "")
    done = f"after {msg.attempts} attempt{'s' if msg.attempts != 1 else ''}"
    return (f"model call {msg.effect_id} backs off {msg.wait_s:.1f} s ({why}; {done}): "
            f"passivated until {until} UTC")


def _args(arguments: dict[str, Any]) -> str:
    import json

    return json.dumps(arguments, sort_keys=True)[:150]

