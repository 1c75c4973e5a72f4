"""The agent loop as a pure function: ``decide(state, message) -> (state, effects)``.

No I/O, no clock, no randomness: the same state and message always give the
same result, so a resumed run is just a loaded state, and the loop is tested
without Ray or Redis. Effects name what to do (call the model, call a tool);
the adapter performs them after the step's checkpoint is committed, and their
results come back as messages.

Duplicates are harmless by construction: a result is applied only while its
effect is pending, so a redelivered result finds nothing to apply.
"""

from __future__ import annotations

import json
from typing import Any

from ._state import (
    CallModel,
    CallTool,
    Cancel,
    ChatMessage,
    ChildResult,
    Effect,
    JournalEntry,
    MarkInDoubt,
    Message,
    ModelFailed,
    ModelReply,
    PendingEffect,
    RunState,
    SendMessage,
    Start,
    ToolCallRequest,
    ToolResult,
    Usage,
)

TERMINAL = frozenset({"finished", "failed", "cancelled", "quarantined"})

# Tools decide handles itself: their effect is a change of state, so they
# need no journal entry and no executor.
BUILTIN_TOOLS = frozenset({"remember", "set_plan"})


def decide(state: RunState, msg: Message) -> tuple[RunState, list[Effect]]:
    new, effects = _decide(state, msg)
    return new, [*effects, *notify_parent(state, new)]


def notify_parent(old: RunState, new: RunState) -> list[Effect]:
    """A child that just ended tells its parent; the result travels with the final
    checkpoint, in its outbox."""
    if new.status in TERMINAL and old.status not in TERMINAL and new.parent_id:
        return [SendMessage(to=new.parent_id, message=ChildResult(
            id=f"result:{new.run_id}", child_id=new.run_id, status=new.status,
            answer=new.result, error=new.error))]
    return []


def _decide(state: RunState, msg: Message) -> tuple[RunState, list[Effect]]:
    if state.status in TERMINAL:
        return state, []
    if isinstance(msg, Start):
        return _start(state, msg)
    if isinstance(msg, Cancel):
        return _advance(state, status="cancelled", pending={}, error=msg.reason), []
    if isinstance(msg, ModelReply):
        if msg.effect_id not in state.pending:
            return state, []
        return _model_reply(state, msg)
    if isinstance(msg, ModelFailed):
        if msg.effect_id not in state.pending:
            return state, []
        pending = {k: v for k, v in state.pending.items() if k != msg.effect_id}
        return _advance(state, status="failed", pending=pending,
                        error=f"model call failed: {msg.error}"), []
    if isinstance(msg, ToolResult):
        if msg.effect_id not in state.pending:
            return state, []
        return _tool_result(state, msg)
    if isinstance(msg, ChildResult):
        return _child_result(state, msg)
    raise TypeError(f"run {state.run_id}: no rule for message {type(msg).__name__}")


def recover(state: RunState) -> tuple[RunState, list[Effect]]:
    """Effects to perform again after a restart: whatever was pending with no result.

    A model call or an idempotent or keyed tool call is performed again (a
    keyed one with its recorded key). An at-most-once call whose intent was
    committed may or may not have happened: it is marked in doubt and never
    re-run blindly.
    """
    if state.status in TERMINAL:
        return state, []
    effects: list[Effect] = []
    for eid, p in sorted(state.pending.items()):
        if p.kind == "model":
            effects.append(CallModel(effect_id=eid))
            continue
        entry = state.journal[eid]
        if entry.side_effect == "at_most_once":
            effects.append(MarkInDoubt(effect_id=eid))
        else:
            effects.append(CallTool(effect_id=eid))
    return state, effects


def mark_in_doubt(state: RunState, call_id: str) -> RunState:
    entry = state.journal[call_id]
    journal = {**state.journal, call_id: entry.model_copy(update={"status": "in_doubt"})}
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
    reason = None
    if s.step > b.max_steps:
        reason = f"budget exceeded: steps {s.step} > {b.max_steps}"
    elif s.usage.tokens > b.max_tokens:
        reason = f"budget exceeded: tokens {s.usage.tokens} > {b.max_tokens}"
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
    return _call_model(state, task=msg.task, conversation=tuple(convo))


def _model_reply(state: RunState, msg: ModelReply) -> tuple[RunState, list[Effect]]:
    step = state.step + 1
    pending = {k: v for k, v in state.pending.items() if k != msg.effect_id}
    u = state.usage
    usage = Usage(model_calls=u.model_calls + 1, tool_calls=u.tool_calls,
                  tokens_in=u.tokens_in + msg.tokens_in, tokens_out=u.tokens_out + msg.tokens_out)
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
    effects: list[Effect] = []
    errors = 0
    tools = state.context.tools
    for i, tc in enumerate(reply.tool_calls):
        info = tools.get(tc.name)
        if info is None:
            errors += 1
            known = ", ".join(sorted(tools)) or "none"
            convo.append(_tool_msg(tc, f"error: unknown tool {tc.name!r}; available: {known}"))
        elif info.builtin:
            out, memory, plan = _builtin(tc, memory, plan)
            convo.append(_tool_msg(tc, out))
        else:
            call_id = f"t{step}.{i}"
            journal[call_id] = JournalEntry(
                call_id=call_id, model_call_id=tc.id, tool=tc.name, arguments=tc.arguments,
                key=f"{state.run_id}:{step}:{i}", side_effect=info.side_effect, step=step)
            pending[call_id] = PendingEffect(effect_id=call_id, kind="tool", step=step)
            effects.append(CallTool(effect_id=call_id))
    usage = usage.model_copy(update={"tool_calls": usage.tool_calls + len(effects)})
    model_errors = state.model_errors + (1 if errors else 0)
    update = dict(conversation=tuple(convo), journal=journal, memory=memory, plan=plan,
                  usage=usage, model_errors=model_errors)
    if model_errors > state.context.budgets.max_model_errors:
        return _advance(state, status="failed", pending={},
                        error=f"model made {model_errors} malformed turns", **update), []
    if effects:
        new = _advance(state, status="running", pending=pending, **update)
        return new, ([] if new.status in TERMINAL else effects)
    # only builtins or errors: their results are already in the conversation
    return _call_model(state, pending=pending, **update)


def _model_error(state: RunState, convo: list[ChatMessage], pending: dict[str, PendingEffect],
                 usage: Usage, text: str) -> tuple[RunState, list[Effect]]:
    errors = state.model_errors + 1
    convo = [*convo, ChatMessage(role="user", content=f"error: {text}")]
    if errors > state.context.budgets.max_model_errors:
        return _advance(state, status="failed", conversation=tuple(convo), pending={},
                        usage=usage, model_errors=errors,
                        error=f"model made {errors} malformed turns, last: {text}"), []
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
    if any(p.kind == "tool" for p in pending.values()):
        return _advance(state, journal=journal, pending=pending, conversation=convo), []
    return _call_model(state, journal=journal, pending=pending, conversation=convo)


def _child_result(state: RunState, msg: ChildResult) -> tuple[RunState, list[Effect]]:
    d = state.delegation
    if msg.child_id in d.done:  # applied once: a re-sent result finds it done
        return state, []
    delegation = d.model_copy(update={
        "pending": {k: v for k, v in d.pending.items() if k != msg.child_id},
        "done": {**d.done, msg.child_id: msg.status},
        "results": {**d.results, msg.child_id: msg.answer or msg.error or ""},
    })
    return _advance(state, delegation=delegation), []


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
