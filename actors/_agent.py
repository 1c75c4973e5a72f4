"""Agents: model configuration, instructions, tools and budgets, found by importable name.

A checkpoint refers to its agent as ``"package.module:attribute"`` plus a
version, never by pickled code: any node with the package installed imports
it and resumes the run. Define agents at module level in an importable module.
"""

from __future__ import annotations

import importlib
import sys
import time
from collections.abc import Iterable
from typing import Any

from undying.persistence import UndyingError

from ._state import Budgets, Context, ModelSpec, SecretRef, ToolInfo
from ._tools import BUILTIN_SCHEMAS, DELEGATE_SCHEMA, Tool


class AgentNotFound(UndyingError):
    pass


class Agent:
    def __init__(self, name: str, *, version: str = "1", instructions: str = "",
                 model: ModelSpec | str = "scripted:research", tools: Iterable[Tool] = (),
                 budgets: Budgets | None = None, config: dict[str, Any] | None = None,
                 secrets: dict[str, SecretRef] | None = None, memory: bool = True,
                 subagent: Agent | str | None = None, subagent_model: ModelSpec | str | None = None,
                 ref: str | None = None) -> None:
        """``subagent``: the agent the builtin ``delegate`` tool spawns (an `Agent` defined
        at module level, or its importable name); None means this agent cannot delegate.
        ``subagent_model``: run sub-agents on this model instead of their own."""
        self.name = name
        self.version = version
        self.instructions = instructions
        self.model = parse_model_spec(model) if isinstance(model, str) else model
        self.tools: dict[str, Tool] = {}
        for t in tools:
            if not isinstance(t, Tool):
                raise TypeError(f"agent {name!r}: {t!r} is not a tool; decorate it with @tool")
            if t.name in self.tools or t.name in BUILTIN_SCHEMAS or t.name == "delegate":
                raise ValueError(f"agent {name!r}: two tools are named {t.name!r}")
            self.tools[t.name] = t
        self.memory = memory
        self.subagent = subagent
        self.subagent_model = (parse_model_spec(subagent_model) if isinstance(subagent_model, str)
                               else subagent_model)
        self.budgets = budgets or Budgets()
        self.config = dict(config or {})
        self.secrets = dict(secrets or {})
        self._ref = ref
        # where it was defined, to find its importable name later
        self._module = sys._getframe(1).f_globals.get("__name__", "")

    @property
    def ref(self) -> str:
        if self._ref:
            return self._ref
        mod = sys.modules.get(self._module)
        name = self._module
        if name == "__main__" and mod is not None:
            # `python -m package.module` runs it as __main__; its import name is on the spec
            spec = getattr(mod, "__spec__", None)
            name = spec.name if spec is not None else ""
        if mod is not None and name and name != "__main__":
            for attr, value in vars(mod).items():
                if value is self:
                    self._ref = f"{name}:{attr}"
                    return self._ref
        raise AgentNotFound(
            f"agent {self.name!r} has no importable name: define it at module level in an "
            "importable module (not __main__), or pass ref='package.module:attribute'"
        )

    def _builtins(self) -> list[str]:
        names = list(BUILTIN_SCHEMAS) if self.memory else []
        if self.subagent is not None:
            names.append("delegate")
        return names

    def tool_infos(self) -> dict[str, ToolInfo]:
        infos = {n: ToolInfo(name=n, side_effect=t.side_effect, reconcile=t.reconcile is not None)
                 for n, t in self.tools.items()}
        for n in self._builtins():
            infos[n] = ToolInfo(name=n, side_effect="pure", builtin=True)
        return infos

    def tool_schemas(self) -> list[dict[str, Any]]:
        out = [t.schema() for t in self.tools.values()]
        out.extend(DELEGATE_SCHEMA if n == "delegate" else BUILTIN_SCHEMAS[n]
                   for n in self._builtins())
        return out

    def subagent_ref(self) -> tuple[str | None, str | None]:
        sub = self.subagent
        if sub is None:
            return None, None
        if isinstance(sub, Agent):
            return sub.ref, sub.version
        return sub, None

    def context(self) -> Context:
        sub_ref, sub_version = self.subagent_ref()
        return Context(agent_ref=self.ref, agent_version=self.version,
                       instructions=self.instructions, model=self.model,
                       tools=self.tool_infos(), budgets=self.budgets, config=self.config,
                       secrets=self.secrets, created_ms=int(time.time() * 1000),
                       subagent_ref=sub_ref, subagent_version=sub_version,
                       subagent_model=self.subagent_model)


def parse_model_spec(text: str) -> ModelSpec:
    provider, _, name = text.partition(":")
    return ModelSpec(provider=provider, name=name or "default")


def load_agent(ref: str, version: str | None = None) -> Agent:
    module_name, _, attr = ref.partition(":")
    if not module_name or not attr:
        raise AgentNotFound(f"agent reference {ref!r} is not of the form 'module:attribute'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise AgentNotFound(
            f"agent {ref!r}: cannot import {module_name} ({exc}); install it on every node"
        ) from None
    agent = getattr(module, attr, None)
    if not isinstance(agent, Agent):
        raise AgentNotFound(f"agent {ref!r}: {attr} in {module_name} is not an Agent")
    if version is not None and agent.version != version:
        raise AgentNotFound(
            f"agent {ref!r}: the checkpoint was written by version {version}, the installed "
            f"agent is version {agent.version}; install the matching version to resume"
        )
    return agent
