"""What the engine and the executors record about each step and call (run-health metrics).

Each function here is one call at the place it measures, so the engine and the
executor stay as they are; values go to the process's `Recorder` (in memory,
flushed to Redis about once a second: no Redis round trip per step). The
catalogue of metrics is `undying.persistence.metrics.CATALOG`.
"""

from __future__ import annotations

from typing import Any

from undying.persistence.metrics import NULL, Recorder, recorder_for

__all__ = ["NULL", "committed", "model_call", "recorder_for", "tool_call"]


def committed(rec: Recorder, seconds: float, delta_bytes: int, snapshot_bytes: int, res: Any,
              old: Any, new: Any, kind: str, effects: list[Any]) -> None:
    """One committed step: its latency and size, a recovery it ends, its fan-out, and a
    tool call it found in doubt."""
    if rec is NULL:
        return
    rec.observe("undying_commit_seconds", seconds)
    if snapshot_bytes:
        rec.observe("undying_checkpoint_bytes", snapshot_bytes, kind="snapshot")
    else:
        rec.observe("undying_checkpoint_bytes", delta_bytes, kind="delta")
    recovered = getattr(res, "recovered_ms", -1)
    if recovered is not None and recovered >= 0:
        rec.observe("undying_recovery_seconds", recovered / 1000)
    spawns = sum(1 for e in effects if getattr(getattr(e, "message", None), "type", "") == "spawn")
    if spawns:
        rec.observe("undying_delegation_fanout", spawns)
    if kind == "effect_lost" and old is not None:
        for cid, entry in new.journal.items():
            was = old.journal.get(cid)
            if entry.status == "in_doubt" and (was is None or was.status != "in_doubt"):
                rec.inc("undying_tool_calls_in_doubt_total", tool=entry.tool)


def _rate_limited(records: Any) -> int:
    return sum(1 for r in records or () if getattr(r, "status", None) == 429
               or getattr(r, "kind", "") == "http_429")


def model_call(rec: Recorder, spec: Any, seconds: float, resp: Any = None,
               exc: BaseException | None = None) -> None:
    """One model call (its retries included), by the provider and model that answered."""
    if rec is NULL:
        return
    provider = str(getattr(resp, "provider", "") or getattr(spec, "provider", "") or "unknown")
    model = str(getattr(resp, "model", "") or getattr(spec, "name", "") or "unknown")
    labels = {"provider": provider, "model": model}
    retries = getattr(resp if exc is None else exc, "retries", ()) or ()
    for r in retries:
        rec.inc("undying_model_retries_total", kind=str(getattr(r, "kind", "error")), **labels)
    limited = _rate_limited(retries)
    rec.observe("undying_model_call_seconds", seconds, **labels)
    if exc is None:
        rec.inc("undying_model_calls_total", outcome="ok", **labels)
        rec.inc("undying_model_tokens_total", getattr(resp, "tokens_in", 0) or 0,
                direction="in", **labels)
        rec.inc("undying_model_tokens_total", getattr(resp, "tokens_out", 0) or 0,
                direction="out", **labels)
        cost = float(getattr(resp, "cost_usd", 0.0) or 0.0)
        if cost:
            rec.inc("undying_model_cost_usd_total", cost, **labels)
    else:
        kind = str(getattr(exc, "kind", "") or type(exc).__name__)
        outcome = "malformed" if kind == "malformed" else "error"
        rec.inc("undying_model_calls_total", outcome=outcome, **labels)
        rec.inc("undying_model_errors_total", kind=kind[:40], **labels)
        if getattr(exc, "status", None) == 429:
            limited += 1
    if limited:
        rec.inc("undying_model_rate_limited_total", limited, **labels)


def tool_call(rec: Recorder, tool: str, seconds: float, outcome: str) -> None:
    if rec is NULL:
        return
    rec.inc("undying_tool_calls_total", tool=tool, outcome=outcome)
    if outcome in ("ok", "error"):  # the tool ran
        rec.observe("undying_tool_call_seconds", seconds, tool=tool)
