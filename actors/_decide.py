"""The agent loop as a pure function: ``decide(state, message) -> (state, effects)``.

No I/O, no clock, no randomness: the same state and message always give the
same result, so a resumed run is just a loaded state, and the loop is tested
without Ray or Redis. Effects name what to do (call the model, call a tool,
send a message to another run, set a timer); the adapter performs them after
the step's checkpoint is committed, and their results come back as messages.

Duplicates are harmless by construction: a result is applied only while its
effect is pending (and only for the attempt that is pending), a child's
result only while the child is pending, so a redelivered message finds
nothing to apply.

Back-off: a model call whose next attempt must wait long (a Retry-After, the
rate limiter's queue) comes back as `ModelRetry`; the call stays pending,
marked as backing off, and a durable timer dispatches it again as its next
attempt. Nothing is out meanwhile, so the run passivates holding nothing;
cancel, budgets and the deadline apply as to any waiting run.

Delegation: the ``delegate`` builtin opens a group of children. Each child is
a `Spawn` message in this run's outbox, committed with the step, and its id
derives from this run's id and step, so a re-sent spawn finds the child that
exists. The group resolves when all, any or the first K of its children
finished (or every child ended), and its result becomes the tool message the
model sees. A run that ends for any reason cancels its children still
running and tells its parent.
"""

from __future__ import annotations

import json
from typing import Any

from ._state import (
    Approval,
    Budgets,
    CallModel,
    CallTool,
    Cancel,
    ChatMessage,
    ChildResult,
    Delegation,
    DelegationGroup,
    Effect,
    EffectLost,
    JournalEntry,
    Message,
    ModelFailed,
    ModelReply,
    ModelRetry,
    PendingEffect,
    Reconcile,
    Resolve,
    RunState,
    SendMessage,
    SetTimer,
    Spawn,
    Start,
    Timer,
    ToolCallRequest,
    ToolResult,
    Usage,
    args_hash,
)

TERMINAL = frozenset({"finished", "failed", "cancelled", "quarantined"})

# Tools decide handles itself: their effect is a change of state (and, for
# `delegate`, messages to new runs), so they need no journal entry and no executor.
BUILTIN_TOOLS = frozenset({"remember", "set_plan", "delegate"})

DEADLINE = "deadline"
RETRY = "retry:"  # a back-off timer: "retry:<effect id>:<attempt>"


def retry_timer(effect_id: str, attempt: int) -> str:
    """The timer that ends a back-off of one dispatch (unique per attempt: a timer's message
    id derives from it, and a call may back off more than once)."""
    return f"{RETRY}{effect_id}:{attempt}"


def decide(state: RunState, msg: Message) -> tuple[RunState, list[Effect]]:
    new, effects = _decide(state, msg)
    return new, [*effects, *end_of_run(state, new)]


def end_of_run(old: RunState, new: RunState) -> list[Effect]:
    """A run that just ended cancels its children still running and tells its parent.

    Both travel with the final checkpoint, in its outbox, so neither is lost
    nor sent twice whatever dies after the commit.
    """
    if new.status not in TERMINAL or old.status in TERMINAL:
        return []
    why = f"parent {new.run_id} {new.status}"
    out: list[Effect] = [SendMessage(to=child, message=Cancel(id=f"cancel:{child}", reason=why))
                         for child in sorted(new.delegation.pending)]
    if new.parent_id:
        d = new.delegation
        out.append(SendMessage(to=new.parent_id, message=ChildResult(
            id=f"result:{new.run_id}", child_id=new.run_id, status=new.status,
            answer=new.result, error=new.error, tokens=new.usage.tokens + d.tokens,
            steps=new.step + d.steps, cost_usd=new.usage.cost_usd + d.cost_usd)))
    return out


def _decide(state: RunState, msg: Message) -> tuple[RunState, list[Effect]]:
    if state.status in TERMINAL:
        return state, []
    if isinstance(msg, Start):
        return _start(state, msg)
    if isinstance(msg, Cancel):
        return _advance(state, status="cancelled", pending={}, error=msg.reason), []
    if isinstance(msg, ModelReply):
        if not _is_pending(state, msg.effect_id):
            return state, []
        return _model_reply(state, msg)
    if isinstance(msg, ModelFailed):
        if not _is_pending(state, msg.effect_id):
            return state, []
        pending = {k: v for k, v in state.pending.items() if k != msg.effect_id}
        usage = state.usage.model_copy(update={"retries": state.usage.retries + len(msg.retries)})
        if msg.malformed:
            return _model_error(state, list(state.conversation), pending, usage,
                                f"your last reply could not be used: {msg.error}")
        return _advance(state, status="failed", pending=pending, usage=usage,
                        error=f"model call failed: {msg.error}"), []
    if isinstance(msg, ModelRetry):
        return _model_retry(state, msg)
    if isinstance(msg, ToolResult):
        if not _is_pending(state, msg.effect_id):
            return state, []
        if msg.needs_approval:
            return _await_approval(state, msg)
        return _tool_result(state, msg)
    if isinstance(msg, Approval):
        return _approval(state, msg)
    if isinstance(msg, Resolve):
        return _resolve(state, msg)
    if isinstance(msg, ChildResult):
        return _child_result(state, msg)
    if isinstance(msg, EffectLost):
        return _effect_lost(state, msg)
    if isinstance(msg, Timer):
        return _timer(state, msg)
    if isinstance(msg, Spawn):
        return state, []  # a spawn creates a run when relayed; it is never a run's input
    raise TypeError(f"run {state.run_id}: no rule for message {type(msg).__name__}")


def _is_pending(state: RunState, effect_id: str) -> bool:
    return effect_id in state.pending


def recover(state: RunState) -> tuple[RunState, list[Effect]]:
    """Every effect the run is waiting for, to dispatch again after a crash.

    The adapter re-sends only those no executor has claimed: a claimed call
    may be running, and comes back either as its result or as `EffectLost`,
    whose rule decides by side-effect class what to do.
    """
    if state.status in TERMINAL:
        return state, []
    effects: list[Effect] = []
    for eid, p in sorted(state.pending.items()):
        if p.backing_off:
            continue  # nothing is out: its timer dispatches it
        effects.append(CallModel(effect_id=eid) if p.kind == "model" else CallTool(effect_id=eid))
    return state, effects


def mark_in_doubt(state: RunState, call_id: str) -> RunState:
    entry = state.journal[call_id]
    p = state.pending.get(call_id)
    journal = {**state.journal, call_id: entry.model_copy(update={
        "status": "in_doubt", "attempt": p.attempt if p is not None else entry.attempt})}
    pending = {k: v for k, v in state.pending.items() if k != call_id}
    return state.model_copy(update={
        "step": state.step + 1, "journal": journal, "pending": pending, "status": "waiting",
        "error": f"tool call {call_id} ({entry.tool}, key {entry.key}) is in doubt: it may "
                 "or may not have run; reconcile it before the run goes on",
    })


# -- rules ------------------------------------------------------------------------


def _advance(state: RunState, **update: Any) -> RunState:
    new = state.model_copy(update={"step": state.step + 1, **update})
    return _check_budgets(new)


def _check_budgets(s: RunState) -> RunState:
    if s.status in TERMINAL:
        return s
    b = s.context.budgets
    tokens = s.usage.tokens + s.delegation.tokens  # the run's own and its subtree's
    cost = s.usage.cost_usd + s.delegation.cost_usd
    reason = None
    if b.max_cost_usd is not None and cost > b.max_cost_usd:
        reason = f"budget exceeded: cost ${cost:.4f} > ${b.max_cost_usd:.4f}"
    elif s.step > b.max_steps:
        reason = f"budget exceeded: steps {s.step} > {b.max_steps}"
    elif tokens > b.max_tokens:
        reason = f"budget exceeded: tokens {tokens} > {b.max_tokens}"
    elif s.usage.tool_calls > b.max_tool_calls:
        reason = f"budget exceeded: tool calls {s.usage.tool_calls} > {b.max_tool_calls}"
    if reason is None:
        return s
    return s.model_copy(update={"status": "failed", "error": reason, "pending": {}})


def _call_model(state: RunState, **update: Any) -> tuple[RunState, list[Effect]]:
    step = state.step + 1
    eid = f"m{step}"
    pending = {**update.pop("pending", state.pending),
               eid: PendingEffect(effect_id=eid, kind="model", step=step)}
    new = _advance(state, status="running", pending=pending, **update)
    if new.status in TERMINAL:
        return new, []
    return new, [CallModel(effect_id=eid)]


def _start(state: RunState, msg: Start) -> tuple[RunState, list[Effect]]:
    if state.conversation:  # already started: a duplicate start
        return state, []
    convo = []
    if state.context.instructions:
        convo.append(ChatMessage(role="system", content=state.context.instructions))
    convo.append(ChatMessage(role="user", content=msg.task))
    new, effects = _call_model(state, task=msg.task, conversation=tuple(convo))
    deadline = state.context.deadline_ms
    if deadline is not None and new.status not in TERMINAL:
        effects.append(SetTimer(timer_id=DEADLINE, at_ms=deadline))
    return new, effects


def _waiting_for_children(d: Delegation) -> bool:
    return any(not g.resolved for g in d.groups.values())


def _model_reply(state: RunState, msg: ModelReply) -> tuple[RunState, list[Effect]]:
    step = state.step + 1
    pending = {k: v for k, v in state.pending.items() if k != msg.effect_id}
    u = state.usage
    usage = Usage(model_calls=u.model_calls + 1, tool_calls=u.tool_calls,
                  tokens_in=u.tokens_in + msg.tokens_in, tokens_out=u.tokens_out + msg.tokens_out,
                  cost_usd=u.cost_usd + msg.cost_usd, retries=u.retries + len(msg.retries))
    reply = msg.message
    convo = [*state.conversation, reply]

    if not reply.tool_calls:
        if not reply.content.strip():
            return _model_error(state, convo, pending, usage,
                                "your reply was empty: answer the task or call a tool")
        return _advance(state, status="finished", conversation=tuple(convo), pending=pending,
                        usage=usage, result=reply.content), []

    journal = dict(state.journal)
    memory = state.memory
    plan = state.plan
    delegation = state.delegation
    calls: list[Effect] = []
    spawns: list[Effect] = []
    errors = 0
    last_error = ""
    tools = state.context.tools
    for i, tc in enumerate(reply.tool_calls):
        info = tools.get(tc.name)
        if info is None:
            errors += 1
            known = ", ".join(sorted(tools)) or "none"
            last_error = f"unknown tool {tc.name!r}; available: {known}"
            convo.append(_tool_msg(tc, f"error: {last_error}"))
        elif info.builtin and tc.name == "delegate":
            problem, delegation, more = _delegate(state, delegation, tc, step, i, usage)
            if problem is not None:
                convo.append(_tool_msg(tc, problem))
            spawns.extend(more)
        elif info.builtin:
            out, memory, plan = _builtin(tc, memory, plan)
            convo.append(_tool_msg(tc, out))
        else:
            call_id = f"t{step}.{i}"
            journal[call_id] = JournalEntry(
                call_id=call_id, model_call_id=tc.id, tool=tc.name, arguments=tc.arguments,
                key=f"{state.run_id}:{step}:{i}", side_effect=info.side_effect, step=step)
            pending[call_id] = PendingEffect(effect_id=call_id, kind="tool", step=step)
            calls.append(CallTool(effect_id=call_id))
    usage = usage.model_copy(update={"tool_calls": usage.tool_calls + len(calls)})
    model_errors = state.model_errors + (1 if errors else 0)
    update = dict(conversation=tuple(convo), journal=journal, memory=memory, plan=plan,
                  usage=usage, model_errors=model_errors, delegation=delegation)
    if model_errors > state.context.budgets.max_model_errors:
        return _advance(state, status="failed", pending={},
                        error=_too_many_errors(state, model_errors, last_error), **update), []
    if calls or _waiting_for_children(delegation):
        new = _advance(state, status="running", pending=pending, **update)
        return new, ([] if new.status in TERMINAL else [*calls, *spawns])
    # only builtins or errors: their results are already in the conversation
    return _call_model(state, pending=pending, **update)


def _child_caps(state: RunState, spawned: int, usage: Usage) -> Budgets:
    """What a child may use at most: what this run has left (a child cannot exceed it)."""
    b = state.context.budgets
    cost_left = (None if b.max_cost_usd is None else
                 b.max_cost_usd - usage.cost_usd - state.delegation.cost_usd)
    return b.model_copy(update={
        "max_cost_usd": cost_left,
        "max_steps": b.max_steps - state.step,
        "max_tokens": b.max_tokens - usage.tokens - state.delegation.tokens,
        "max_tool_calls": b.max_tool_calls - usage.tool_calls,
        "max_children": max(0, b.max_children - spawned),
    })


def _delegate(state: RunState, d: Delegation, tc: ToolCallRequest, step: int,
              index: int, usage: Usage) -> tuple[str | None, Delegation, list[Effect]]:
    """Open a delegation group: (error for the model, or None; new ledger; spawn messages)."""
    ctx, b = state.context, state.context.budgets
    args = tc.arguments
    tasks = args.get("tasks")
    if (not isinstance(tasks, list) or not tasks
            or not all(isinstance(t, str) and t.strip() for t in tasks)):
        return "error: delegate needs 'tasks', a non-empty list of non-empty strings", d, []
    wait = args.get("wait", "all")
    if wait == "all":
        need = len(tasks)
    elif wait == "any":
        need = 1
    elif isinstance(wait, int) and not isinstance(wait, bool) and 1 <= wait <= len(tasks):
        need = wait
    else:
        return (f"error: delegate's 'wait' must be 'all', 'any' or a number from 1 to "
                f"{len(tasks)}, not {wait!r}"), d, []
    cancel_rest = args.get("cancel_rest", True)
    if not isinstance(cancel_rest, bool):
        return "error: delegate's 'cancel_rest' must be true or false", d, []
    if ctx.subagent_ref is None:
        return "error: this agent has no sub-agent to delegate to", d, []
    if ctx.depth + 1 > b.max_depth:
        return (f"error: delegation depth limit reached (this run is at depth {ctx.depth}, "
                f"at most {b.max_depth}); answer from what you have"), d, []
    if d.spawned + len(tasks) > b.max_children:
        return (f"error: fan-out budget: {d.spawned} sub-agents spawned of at most "
                f"{b.max_children}; {len(tasks)} more is too many"), d, []
    caps = _child_caps(state, d.spawned + len(tasks), usage)
    if caps.max_steps < 2 or caps.max_tokens < 1:
        return ("error: not enough budget left to delegate "
                f"({caps.max_steps} steps, {caps.max_tokens} tokens)"), d, []
    first = d.spawned
    children = tuple(f"{state.run_id}.{step}-{first + j}" for j in range(len(tasks)))
    group = DelegationGroup(call_id=tc.id, children=children, tasks=tuple(tasks), need=need,
                            cancel_rest=cancel_rest)
    spawns: list[Effect] = [
        SendMessage(to=cid, message=Spawn(
            id=f"spawn:{cid}", task=task, parent_id=state.run_id, agent_ref=ctx.subagent_ref,
            agent_version=ctx.subagent_version, budgets=caps, depth=ctx.depth + 1,
            deadline_ms=ctx.deadline_ms, model=ctx.subagent_model))
        for cid, task in zip(children, tasks, strict=True)]
    gid = f"d{step}.{index}"
    d = d.model_copy(update={
        "pending": {**d.pending, **dict(zip(children, tasks, strict=True))},
        "groups": {**d.groups, gid: group},
        "group_of": {**d.group_of, **dict.fromkeys(children, gid)},
        "spawned": d.spawned + len(tasks),
    })
    return None, d, spawns


def _too_many_errors(state: RunState, errors: int, last: str) -> str:
    limit = state.context.budgets.max_model_errors
    return f"budget exceeded: malformed model turns {errors} > {limit}, last: {last}"


def _model_error(state: RunState, convo: list[ChatMessage], pending: dict[str, PendingEffect],
                 usage: Usage, text: str) -> tuple[RunState, list[Effect]]:
    errors = state.model_errors + 1
    convo = [*convo, ChatMessage(role="user", content=f"error: {text}")]
    if errors > state.context.budgets.max_model_errors:
        return _advance(state, status="failed", conversation=tuple(convo), pending={},
                        usage=usage, model_errors=errors,
                        error=_too_many_errors(state, errors, text)), []
    return _call_model(state, conversation=tuple(convo), pending=pending, usage=usage,
                       model_errors=errors)


def _tool_result(state: RunState, msg: ToolResult) -> tuple[RunState, list[Effect]]:
    entry = state.journal[msg.effect_id]
    done = entry.model_copy(update={
        "status": "error" if msg.error else "done",
        "result": None if msg.error else msg.output,
        "error": msg.error,
    })
    journal = {**state.journal, msg.effect_id: done}
    pending = {k: v for k, v in state.pending.items() if k != msg.effect_id}
    tc = ToolCallRequest(id=entry.model_call_id, name=entry.tool, arguments=entry.arguments)
    content = f"error: {msg.error}" if msg.error else msg.output
    convo = (*state.conversation, _tool_msg(tc, content))
    if any(p.kind == "tool" for p in pending.values()) or _waiting_for_children(state.delegation):
        return _advance(state, journal=journal, pending=pending, conversation=convo), []
    return _call_model(state, journal=journal, pending=pending, conversation=convo)


def _resolve(state: RunState, msg: Resolve) -> tuple[RunState, list[Effect]]:
    """Settle an in-doubt call: done (its output goes to the model), failed, or retry."""
    eid = msg.call_id
    entry = state.journal.get(eid)
    if entry is None or entry.status != "in_doubt":
        return state, []  # a duplicate, or a call that is not in doubt
    record = {"outcome": msg.outcome, "by": msg.by, "at_ms": msg.at_ms, "reason": msg.reason}
    others = [e for e in state.journal.values() if e.status == "in_doubt" and e.call_id != eid]
    error = state.error if others else None
    if msg.outcome == "retry":
        attempt = entry.attempt + 1
        journal = {**state.journal, eid: entry.model_copy(update={
            "status": "intent", "attempt": attempt, "resolution": record})}
        pending = {**state.pending, eid: PendingEffect(effect_id=eid, kind="tool",
                                                       step=entry.step, attempt=attempt)}
        new = _advance(state, status="running", error=error, journal=journal, pending=pending)
        return new, ([] if new.status in TERMINAL else [CallTool(effect_id=eid)])
    done = msg.outcome == "done"
    why = f"in doubt, settled as failed by {msg.by}" + (f": {msg.reason}" if msg.reason else "")
    journal = {**state.journal, eid: entry.model_copy(update={
        "status": "done" if done else "error", "result": msg.output if done else None,
        "error": None if done else why, "resolution": record})}
    tc = ToolCallRequest(id=entry.model_call_id, name=entry.tool, arguments=entry.arguments)
    convo = (*state.conversation, _tool_msg(tc, msg.output if done else f"error: {why}"))
    if (any(p.kind == "tool" for p in state.pending.values()) or others
            or _waiting_for_children(state.delegation)):
        status = "waiting" if others else "running"
        return _advance(state, status=status, error=error, journal=journal,
                        conversation=convo), []
    return _call_model(state, error=error, journal=journal, conversation=convo)


def _await_approval(state: RunState, msg: ToolResult) -> tuple[RunState, list[Effect]]:
    """The tool did not run: record the request and wait (passivated) for a decision."""
    eid = msg.effect_id
    entry = state.journal[eid].model_copy(update={"status": "awaiting_approval"})
    return _advance(state, status="waiting", journal={**state.journal, eid: entry}), []


def _approval(state: RunState, msg: Approval) -> tuple[RunState, list[Effect]]:
    eid = msg.call_id
    entry = state.journal.get(eid)
    p = state.pending.get(eid)
    if entry is None or p is None or entry.status != "awaiting_approval":
        return state, []  # a duplicate, or a call that is not waiting
    if msg.args_hash != args_hash(entry.arguments):
        return state, []  # approves other arguments: it does not carry over to these
    record = {"decision": "approved" if msg.approved else "rejected", "by": msg.by,
              "at_ms": msg.at_ms, "args_hash": msg.args_hash, "reason": msg.reason}
    if msg.approved:
        entry = entry.model_copy(update={"status": "intent", "approval": record})
        pending = {**state.pending, eid: p.model_copy(update={"attempt": p.attempt + 1})}
        new = _advance(state, status="running", journal={**state.journal, eid: entry},
                       pending=pending)
        return new, ([] if new.status in TERMINAL else [CallTool(effect_id=eid)])
    why = f"rejected by {msg.by}" + (f": {msg.reason}" if msg.reason else "")
    entry = entry.model_copy(update={"status": "error", "error": why, "approval": record})
    pending = {k: v for k, v in state.pending.items() if k != eid}
    tc = ToolCallRequest(id=entry.model_call_id, name=entry.tool, arguments=entry.arguments)
    update = dict(journal={**state.journal, eid: entry}, pending=pending,
                  conversation=(*state.conversation,
                                _tool_msg(tc, f"error: the call was {why}; do not retry it")))
    if any(q.kind == "tool" for q in pending.values()) or _waiting_for_children(state.delegation):
        return _advance(state, status="running", **update), []
    return _call_model(state, **update)


def _child_result(state: RunState, msg: ChildResult) -> tuple[RunState, list[Effect]]:
    d = state.delegation
    child = msg.child_id
    if child in d.done or child not in d.pending:  # applied once; a stranger's result is ignored
        return state, []
    text = (msg.answer or "") if msg.status == "finished" else (msg.error or msg.status)
    d = d.model_copy(update={
        "pending": {k: v for k, v in d.pending.items() if k != child},
        "done": {**d.done, child: msg.status},
        "results": {**d.results, child: text},
        "order": (*d.order, child),
        "tokens": d.tokens + msg.tokens,
        "steps": d.steps + msg.steps,
        "cost_usd": d.cost_usd + msg.cost_usd,
    })
    convo = state.conversation
    effects: list[Effect] = []
    resolved_now = False
    gid = d.group_of.get(child)
    g = d.groups.get(gid) if gid is not None else None
    if gid is not None and g is not None and not g.resolved:
        # counted as results come, beside the group (whose lists of thousands of children
        # and tasks are then not rewritten): O(1) per result, stored as one small entry;
        # the report below walks the group once, when it resolves
        n_ended = d.ended.get(gid, 0) + 1
        n_finished = d.finished.get(gid, 0) + (msg.status == "finished")
        d = d.model_copy(update={"ended": {**d.ended, gid: n_ended},
                                 "finished": {**d.finished, gid: n_finished}})
        if n_finished >= g.need or n_ended == len(g.children):
            members = set(g.children)
            ended = [c for c in d.order if c in members]
            finished = [c for c in ended if d.done[c] == "finished"]
            report = finished[: g.need] if len(finished) >= g.need else ended
            rest = [c for c in g.children if c not in d.done]
            tasks = dict(zip(g.children, g.tasks, strict=True))
            content = json.dumps({
                "results": [{"run_id": c, "task": tasks[c], "status": d.done[c],
                             ("answer" if d.done[c] == "finished" else "error"): d.results[c]}
                            for c in report],
                "cancelled": rest if g.cancel_rest else [],
                "still_running": [] if g.cancel_rest else rest,
            })
            convo = (*convo, ChatMessage(role="tool", content=content, tool_call_id=g.call_id,
                                         name="delegate"))
            g = g.model_copy(update={"resolved": True})
            resolved_now = True
            if g.cancel_rest:
                why = f"parent {state.run_id} has the {g.need} result(s) it waited for"
                effects += [SendMessage(to=c, message=Cancel(id=f"cancel:{c}", reason=why))
                            for c in rest]
            d = d.model_copy(update={"groups": {**d.groups, gid: g}})
    if (resolved_now and not _waiting_for_children(d)
            and not any(p.kind == "tool" for p in state.pending.values())):
        new, more = _call_model(state, delegation=d, conversation=convo)
        return new, ([] if new.status in TERMINAL else [*effects, *more])
    new = _advance(state, delegation=d, conversation=convo)
    return new, ([] if new.status in TERMINAL else effects)


def _effect_lost(state: RunState, msg: EffectLost) -> tuple[RunState, list[Effect]]:
    eid = msg.effect_id
    p = state.pending.get(eid)
    if p is None or p.attempt != msg.attempt or p.backing_off:
        return state, []  # already answered, or already dispatched again, or not out at all
    what = "model" if p.kind == "model" else f"tool {state.journal[eid].tool!r}"
    lost = msg.attempt - p.backoffs  # dispatches that ended in a back-off were not lost
    if lost >= state.context.budgets.max_effect_attempts:
        return _advance(state, status="failed", pending={}, error=(
            f"the {what} call {eid} was lost {lost} times (its executor died each "
            f"time); last: {msg.reason or 'no reason given'}")), []
    if p.kind == "tool" and msg.started and state.journal[eid].side_effect == "at_most_once":
        info = state.context.tools.get(state.journal[eid].tool)
        # its reconcile hook may know whether it happened; if not, a person decides
        return mark_in_doubt(state, eid), ([Reconcile(effect_id=eid)]
                                           if info is not None and info.reconcile else [])
    pending = {**state.pending, eid: p.model_copy(update={"attempt": p.attempt + 1})}
    effect: Effect = CallModel(effect_id=eid) if p.kind == "model" else CallTool(effect_id=eid)
    new = _advance(state, pending=pending)
    return new, ([] if new.status in TERMINAL else [effect])


def _timer(state: RunState, msg: Timer) -> tuple[RunState, list[Effect]]:
    if msg.timer_id == DEADLINE:
        limit = state.context.budgets.max_wall_s
        return _advance(state, status="failed", pending={},
                        error=f"budget exceeded: wall time of {limit}s"), []
    if msg.timer_id.startswith(RETRY):
        return _retry_due(state, msg.timer_id)
    return state, []


def _model_retry(state: RunState, msg: ModelRetry) -> tuple[RunState, list[Effect]]:
    """A model call backs off on a durable timer: record why and until when, and wait
    holding nothing (no dispatch is out, so nothing can report it lost or send it early)."""
    eid = msg.effect_id
    p = state.pending.get(eid)
    if p is None or p.kind != "model" or p.attempt != msg.attempt or p.backing_off:
        return state, []  # answered, dispatched again since, or already backing off
    failed = sum(1 for r in msg.retries if r.get("kind") != "rate_limit")
    usage = state.usage.model_copy(update={"retries": state.usage.retries + failed})
    deadline = state.context.deadline_ms
    if deadline is not None and msg.at_ms >= deadline:
        # it could not be answered in time: fail now rather than hold the run to the end
        return _advance(state, status="failed", pending={}, usage=usage, error=(
            f"budget exceeded: wall time of {state.context.budgets.max_wall_s}s (model call "
            f"{eid} would have to wait {msg.wait_s:g} s for its next attempt: {msg.reason})")), []
    waiting = p.model_copy(update={"retry_at_ms": msg.at_ms, "tries": msg.attempts,
                                   "slot": msg.slot, "retries": (*p.retries, *msg.retries)})
    new = _advance(state, status="waiting", pending={**state.pending, eid: waiting}, usage=usage)
    if new.status in TERMINAL:
        return new, []
    return new, [SetTimer(timer_id=retry_timer(eid, p.attempt), at_ms=msg.at_ms)]


def _retry_due(state: RunState, timer_id: str) -> tuple[RunState, list[Effect]]:
    """A back-off is over: dispatch the call again, as its next attempt."""
    eid, _, attempt = timer_id[len(RETRY):].rpartition(":")
    p = state.pending.get(eid)
    if p is None or not p.backing_off or str(p.attempt) != attempt:
        return state, []  # cancelled, failed, answered, or a timer of an earlier back-off
    again = p.model_copy(update={"attempt": p.attempt + 1, "retry_at_ms": None,
                                 "backoffs": p.backoffs + 1})
    new = _advance(state, status="running", pending={**state.pending, eid: again})
    return new, ([] if new.status in TERMINAL else [CallModel(effect_id=eid)])


def _tool_msg(tc: ToolCallRequest, content: str) -> ChatMessage:
    return ChatMessage(role="tool", content=content, tool_call_id=tc.id, name=tc.name)


def _builtin(tc: ToolCallRequest, memory: dict[str, str],
             plan: tuple[str, ...]) -> tuple[str, dict[str, str], tuple[str, ...]]:
    args = tc.arguments
    if tc.name == "remember":
        key, value = args.get("key"), args.get("value")
        if not isinstance(key, str) or not isinstance(value, str):
            return "error: remember needs string arguments 'key' and 'value'", memory, plan
        return f"remembered {key}", {**memory, key: value}, plan
    if tc.name == "set_plan":
        steps = args.get("steps")
        if not isinstance(steps, list) or not all(isinstance(x, str) for x in steps):
            return "error: set_plan needs 'steps', a list of strings", memory, plan
        return json.dumps({"plan": steps}), memory, tuple(steps)
    return f"error: no builtin {tc.name!r}", memory, plan
