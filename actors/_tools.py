"""Tools: typed Python functions with a declared side-effect class.

``@tool`` reads a function's signature into a pydantic model; its JSON schema
goes to the model, and arguments are validated before the function runs, so
bad arguments from a model become an error message it sees on its next
turn, never a crashed actor.

Side-effect classes decide what happens when a run restarts with a call
pending: ``pure`` and ``idempotent`` run again; ``keyed`` runs again with the
same idempotency key (``ctx.key``, derived from run id and step); an
``at_most_once`` call with a committed intent and no result is in doubt and
is never re-run blindly.
"""

from __future__ import annotations

import asyncio
import inspect
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, get_type_hints

from pydantic import BaseModel, ConfigDict, ValidationError, create_model

from ._state import SideEffect

SIDE_EFFECTS: tuple[SideEffect, ...] = ("pure", "idempotent", "keyed", "at_most_once")


@dataclass(frozen=True)
class ToolContext:
    """What a tool may know about the call: never a secret value, only references."""

    run_id: str
    call_id: str
    key: str  # idempotency key: the same on every retry of this call
    attempt: int = 1
    config: dict[str, Any] = field(default_factory=dict)


class ToolArgumentsError(ValueError):
    pass


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    fn: Callable[..., Any]
    args_model: type[BaseModel]
    side_effect: SideEffect = "idempotent"
    context_param: str | None = None
    # None: never; "always"; or a rule on the validated arguments (True: ask someone first)
    approval: str | Callable[[dict[str, Any]], bool] | None = None
    # for at-most-once tools: did an in-doubt call happen? (args, ctx) -> ("done", output),
    # ("not_done", None) or None (cannot tell: a person decides)
    reconcile: Callable[..., Any] | None = None

    def needs_approval(self, arguments: dict[str, Any]) -> bool:
        if self.approval is None:
            return False
        if self.approval == "always":
            return True
        if callable(self.approval):
            return bool(self.approval(self.validate(arguments)))
        raise ValueError(f"tool {self.name!r}: approval must be None, 'always' or a callable")

    def schema(self) -> dict[str, Any]:
        params = self.args_model.model_json_schema()
        params.pop("title", None)
        return {"name": self.name, "description": self.description, "parameters": params}

    def validate(self, arguments: dict[str, Any]) -> dict[str, Any]:
        try:
            parsed = self.args_model.model_validate(arguments)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'arguments'}: {e['msg']}"
                for e in exc.errors()
            )
            raise ToolArgumentsError(f"bad arguments for tool {self.name!r}: {problems}") from None
        return {k: getattr(parsed, k) for k in type(parsed).model_fields}

    async def invoke(self, arguments: dict[str, Any], ctx: ToolContext) -> str:
        kwargs = self.validate(arguments)
        if self.context_param:
            kwargs[self.context_param] = ctx
        if inspect.iscoroutinefunction(self.fn):
            out = await self.fn(**kwargs)
        else:
            out = await asyncio.to_thread(self.fn, **kwargs)
        return out if isinstance(out, str) else json.dumps(out, default=str)


def tool(fn: Callable[..., Any] | None = None, *, name: str | None = None,
         side_effect: SideEffect = "idempotent", description: str | None = None,
         approval: str | Callable[[dict[str, Any]], bool] | None = None,
         reconcile: Callable[..., Any] | None = None) -> Any:
    """Turn a typed function into a `Tool`. A parameter typed `ToolContext` gets the call's context.

    ``approval``: "always", or a function of the (validated) arguments that says whether
    this call needs someone's approval; the run then waits, holding no process, until
    `undying approve` or `undying reject`. An approval is for the exact arguments shown.

    ``reconcile``: for an ``at_most_once`` tool, a function ``(arguments, ctx)`` (sync or
    async) that says whether a call left in doubt (its executor died after it began)
    happened: ``("done", output)``, ``("not_done", None)`` (it is dispatched again, with
    the same key), or None (it cannot tell; a person decides with `undying resolve`).
    """
    if side_effect not in SIDE_EFFECTS:
        raise ValueError(f"side_effect must be one of {SIDE_EFFECTS}, not {side_effect!r}")
    if approval is not None and approval != "always" and not callable(approval):
        raise ValueError(f"approval must be None, 'always' or a callable, not {approval!r}")

    def wrap(f: Callable[..., Any]) -> Tool:
        hints = get_type_hints(f)
        fields: dict[str, Any] = {}
        ctx_param = None
        for pname, param in inspect.signature(f).parameters.items():
            ann = hints.get(pname, Any)
            if ann is ToolContext:
                ctx_param = pname
                continue
            default = ... if param.default is inspect.Parameter.empty else param.default
            fields[pname] = (ann, default)
        model = create_model(  # type: ignore[call-overload]
            f"{f.__name__}_args", __config__=ConfigDict(extra="forbid"), **fields)
        doc = inspect.getdoc(f) or ""
        return Tool(name=name or f.__name__, description=description or doc.split("\n\n")[0],
                    fn=f, args_model=model, side_effect=side_effect, context_param=ctx_param,
                    approval=approval, reconcile=reconcile)

    return wrap(fn) if fn is not None else wrap


# Schemas of the tools `decide` handles itself (see _decide.BUILTIN_TOOLS).
BUILTIN_SCHEMAS: dict[str, dict[str, Any]] = {
    "remember": {
        "name": "remember",
        "description": "Store a note in the run's memory under a key.",
        "parameters": {"type": "object", "properties": {
            "key": {"type": "string"}, "value": {"type": "string"}},
            "required": ["key", "value"], "additionalProperties": False},
    },
    "set_plan": {
        "name": "set_plan",
        "description": "Record the plan: the sub-questions to answer, in order.",
        "parameters": {"type": "object", "properties": {
            "steps": {"type": "array", "items": {"type": "string"}}},
            "required": ["steps"], "additionalProperties": False},
    },
}


# The schema of `delegate`, offered to agents that have a sub-agent (see _decide._delegate).
DELEGATE_SCHEMA: dict[str, Any] = {
    "name": "delegate",
    "description": (
        "Hand sub-tasks to sub-agents that run concurrently, each with its own budget. "
        "Returns when all of them, any one, or the first K have finished: their answers."),
    "parameters": {"type": "object", "properties": {
        "tasks": {"type": "array", "items": {"type": "string"}, "minItems": 1,
                  "description": "one task per sub-agent"},
        "wait": {"anyOf": [{"enum": ["all", "any"]}, {"type": "integer", "minimum": 1}],
                 "description": "all (default), any, or how many finished answers to wait for"},
        "cancel_rest": {"type": "boolean",
                        "description": "cancel the sub-agents still running once enough "
                                       "answers are in (default true)"}},
        "required": ["tasks"], "additionalProperties": False},
}
