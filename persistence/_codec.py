"""Codec: msgpack of pydantic models, a schema version in every record.

Every stored record is a msgpack map ``{"v": version, "k": kind, "d": data}``
where ``data`` holds plain types only (``model_dump(mode="json")``). There is
no pickle anywhere: decoding never executes code, and a record that does not
fit its schema is refused with `CorruptCheckpoint` naming the run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import msgpack
from pydantic import BaseModel, ValidationError

from ._errors import CorruptCheckpoint, NeedsUpgrade, RecordTooLarge, RecordUnencodable

SCHEMA_VERSION = 2
MAX_RECORD_BYTES = 32 << 20

M = TypeVar("M", bound=BaseModel)

# (kind, version) -> function that lifts data of that version to version + 1.
# Released versions keep a golden file under tests/golden so a migration that
# breaks old data fails a test, not a user.
MIGRATIONS: dict[tuple[str, int], Callable[[dict[str, Any]], dict[str, Any]]] = {}


def _v1_to_v2(data: Any) -> Any:
    """v2 only adds fields, all with defaults (delegation groups, dispatch attempts, costs,
    retries, depth and deadline, new message kinds), and lets delta ops name dotted paths
    into nested models. A v1 record reads as it is; a v1 reader refuses a v2 record and says
    to upgrade, rather than misreading it."""
    return data


for _kind in ("snapshot", "delta", "event", "message", "outbox"):
    MIGRATIONS[(_kind, 1)] = _v1_to_v2


def pack(kind: str, data: Any, *, run_id: str = "?", limit: int = MAX_RECORD_BYTES) -> bytes:
    """Encode plain data (already JSON-shaped) as a versioned record."""
    try:
        out: bytes = msgpack.packb({"v": SCHEMA_VERSION, "k": kind, "d": data}, use_bin_type=True)
    except (OverflowError, UnicodeEncodeError, TypeError, ValueError) as exc:
        raise RecordUnencodable(run_id, kind, str(exc)) from None
    if len(out) > limit:
        raise RecordTooLarge(run_id, len(out), limit)
    return out


def encode(kind: str, record: BaseModel, *, run_id: str = "?", limit: int = MAX_RECORD_BYTES) -> bytes:
    return pack(kind, record.model_dump(mode="json"), run_id=run_id, limit=limit)


def plain(value: Any) -> Any:
    """Make JSON-shaped data from outside (a model, a tool) storable as msgpack.

    Integers beyond 64 bits become strings and unpaired surrogates are
    replaced, so one odd value from a provider cannot make a step
    unstorable (which would redo that step forever).
    """
    if isinstance(value, str):
        try:
            value.encode("utf-8")
            return value
        except UnicodeEncodeError:
            return value.encode("utf-8", "replace").decode("utf-8")
    if isinstance(value, bool) or value is None or isinstance(value, float):
        return value
    if isinstance(value, int):
        return value if -(2**63) <= value < 2**64 else str(value)
    if isinstance(value, dict):
        return {plain(k) if isinstance(k, str) else str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return str(value)


def unpack(kind: str, raw: bytes, *, run_id: str, limit: int = MAX_RECORD_BYTES) -> Any:
    """Decode a record's plain data, migrating old versions. Any defect is `CorruptCheckpoint`."""
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        raise CorruptCheckpoint(run_id, f"{kind} record is {type(raw).__name__}, not bytes")
    if len(raw) > limit:
        raise CorruptCheckpoint(run_id, f"{kind} record of {len(raw)} bytes exceeds {limit}")
    try:
        envelope = msgpack.unpackb(
            raw, raw=False, strict_map_key=True, use_list=True
        )
    except Exception as exc:  # msgpack raises several unrelated types on bad input
        raise CorruptCheckpoint(run_id, f"{kind} record is not valid msgpack: {exc}") from None
    if not isinstance(envelope, dict) or set(envelope) != {"v", "k", "d"}:
        raise CorruptCheckpoint(run_id, f"{kind} record has no version envelope")
    version, got_kind, data = envelope["v"], envelope["k"], envelope["d"]
    if got_kind != kind:
        raise CorruptCheckpoint(run_id, f"expected a {kind} record, found {got_kind!r}")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CorruptCheckpoint(run_id, f"{kind} record has an invalid version {version!r}")
    if version > SCHEMA_VERSION:
        raise NeedsUpgrade(
            run_id,
            f"{kind} record has schema v{version}, this undying reads up to "
            f"v{SCHEMA_VERSION}: upgrade undying on every node",
        )
    while version < SCHEMA_VERSION:
        migrate = MIGRATIONS.get((kind, version))
        if migrate is None:
            raise CorruptCheckpoint(run_id, f"no migration for {kind} v{version}")
        try:
            data = migrate(data)
        except Exception as exc:
            raise CorruptCheckpoint(run_id, f"migration of {kind} v{version} failed: {exc}") from None
        version += 1
    return data


def decode(kind: str, model: type[M], raw: bytes, *, run_id: str, limit: int = MAX_RECORD_BYTES) -> M:
    data = unpack(kind, raw, run_id=run_id, limit=limit)
    return validate(kind, model, data, run_id=run_id)


def validate(kind: str, model: type[M], data: Any, *, run_id: str) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "<root>"
        raise CorruptCheckpoint(
            run_id, f"{kind} record fails its schema at {where}: {first.get('msg')}"
        ) from None
    except (TypeError, ValueError, RecursionError) as exc:
        raise CorruptCheckpoint(run_id, f"{kind} record fails its schema: {exc}") from None
