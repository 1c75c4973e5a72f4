"""Step deltas: what changed between two states, in plain data.

The cost of a step must grow with the step, not with the run. States are
updated copy-on-write (``model_copy(update=...)``, ``[*old, new]``,
``{**old, k: v}``), so an unchanged value keeps its identity. The diff
therefore compares by identity and dumps only what is new: an appended
message is written once, never the conversation it joins.

Nested models are diffed field by field too, so a change deep in a large
sub-model (a sub-agent ledger of thousands of children) writes only itself.

Ops, each a small list so msgpack keeps them compact; ``field`` is a name, or
a dotted path into nested models ("delegation.done"):
  ["a", field, [items...]]          append to a list field
  ["m", field, {key: value}, [gone]] merge into a dict field, drop keys
  ["s", field, value]               set a field
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

Op = list[Any]


def _dump(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, list):
        return [_dump(v) for v in value]
    if isinstance(value, dict):
        return {k: _dump(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [_dump(v) for v in value]
    # enums and other scalars: let pydantic's JSON mode decide via a tiny wrapper
    if hasattr(value, "value") and not isinstance(value, (str, int, float, bool)):
        return value.value
    return value


_MISSING = object()


def diff(old: BaseModel, new: BaseModel, prefix: str = "") -> list[Op]:
    """The ops that turn ``old`` into ``new``, for fields of one model class."""
    if type(old) is not type(new):
        raise TypeError(f"cannot diff {type(old).__name__} against {type(new).__name__}")
    ops: list[Op] = []
    for field in type(new).model_fields:
        a = getattr(old, field)
        b = getattr(new, field)
        if a is b:
            continue
        name = prefix + field
        if isinstance(a, BaseModel) and type(a) is type(b):
            ops.extend(diff(a, b, name + "."))
            continue
        if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(b) >= len(a):
            # a C-level prefix compare: identity short-circuits each element
            if b[: len(a)] == a:
                if len(b) > len(a):
                    ops.append(["a", name, [_dump(v) for v in b[len(a):]]])
                continue
        if isinstance(a, dict) and isinstance(b, dict):
            changed = {k: _dump(v) for k, v in b.items() if a.get(k, _MISSING) is not v}
            gone = [k for k in a if k not in b]
            if changed or gone:
                ops.append(["m", name, changed, gone])
            continue
        dumped_b = _dump(b)
        if dumped_b != _dump(a):
            ops.append(["s", name, dumped_b])
    return ops


def apply(data: dict[str, Any], ops: list[Op]) -> dict[str, Any]:
    """Apply ops to a plain-data state in place and return it."""
    root = data
    for op in ops:
        kind, path = op[0], op[1]
        data = root
        *parents, name = path.split(".") if isinstance(path, str) else [path]
        for p in parents:
            nxt = data.get(p)
            if not isinstance(nxt, dict):
                nxt = data[p] = {}
            data = nxt
        if kind == "a":
            data.setdefault(name, []).extend(op[2])
        elif kind == "m":
            target = data.setdefault(name, {})
            target.update(op[2])
            for key in op[3]:
                target.pop(key, None)
        elif kind == "s":
            data[name] = op[2]
        else:
            raise ValueError(f"unknown delta op {kind!r} on field {path!r}")
    return root
