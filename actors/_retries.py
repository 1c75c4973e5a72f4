"""What a run's model calls took: the retries behind each reply, read back and shown.

An HTTP provider retries transient failures itself (429 with Retry-After, 5xx,
timeouts, resets, a body that is not JSON) and returns the failed attempts as
small plain records (`_models.RetryRecord.to_dict`). They travel on the
`ModelReply` / `ModelFailed` message into the run's inbox, and `decide` counts
them in ``state.usage.retries``. A wait too long to sleep (a long Retry-After,
the rate limiter's queue) ends a dispatch with `ModelRetry`: its records are
kept with the pending call while the run waits on a timer, passivated, and the
step that applies the answer shows them all (`_engine._summary`). This module reads them back per call
(`model_calls`) and words them for a step summary or a CLI (`describe_retries`);
it has no say in what the engine stores.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from undying.persistence import unpack, validate

from ._state import Envelope, ModelFailed, ModelReply, ModelRetry


def describe_retries(retries: Iterable[Mapping[str, Any]]) -> str:
    """One line for the retries of one model call; "" when there were none.

    ``2 retries: http_429 (Retry-After 0.5 s, waited 0.52 s); timeout (waited 0.08 s)``
    """
    parts = []
    for r in retries:
        kind = str(r.get("kind") or "error")
        notes = []
        if r.get("retry_after_s") is not None:
            notes.append(f"Retry-After {float(r['retry_after_s']):g} s")
        if r.get("waited_s") is not None and kind != "failover":
            notes.append(f"waited {float(r['waited_s']):.2f} s"
                         + (" passivated" if r.get("passivated") else ""))
        if kind == "failover" and r.get("model"):
            notes.append(f"from {r['model']}")
        parts.append(kind + (f" ({', '.join(notes)})" if notes else ""))
    if not parts:
        return ""
    return f"{len(parts)} {'retry' if len(parts) == 1 else 'retries'}: " + "; ".join(parts)


@dataclass(frozen=True)
class ModelCall:
    """One answered model call as the run's inbox holds it."""

    effect_id: str
    attempt: int
    outcome: str  # "reply", "failed", or "backoff" (it waited on a timer, passivated)
    retries: tuple[dict[str, Any], ...]
    error: str | None = None
    malformed: bool = False  # the provider answered, unusably; the model was told why

    def describe(self) -> str:
        head = f"{self.effect_id}#{self.attempt} {self.outcome}"
        more = describe_retries(self.retries)
        if self.error:
            head += f" ({'malformed: ' if self.malformed else ''}{self.error[:120]})"
        return f"{head}, {more}" if more else head


def model_calls(store: Any, run_id: str) -> list[ModelCall]:
    """Every model reply, failure and back-off in the run's inbox, in arrival order (a
    reply delivered twice appears twice: the run applied it once)."""
    out: list[ModelCall] = []
    after = "0-0"
    while True:
        batch = store.read_inbox(run_id, after, 500)
        for entry in batch:
            env = validate("message", Envelope, unpack("message", entry.data, run_id=run_id),
                           run_id=run_id)
            msg = env.message
            if isinstance(msg, ModelReply | ModelFailed | ModelRetry):
                attempt = msg.id.rsplit(":", 1)[-1]
                outcome = ("reply" if isinstance(msg, ModelReply) else
                           "backoff" if isinstance(msg, ModelRetry) else "failed")
                out.append(ModelCall(
                    effect_id=msg.effect_id, attempt=int(attempt) if attempt.isdigit() else 1,
                    outcome=outcome,
                    retries=tuple(dict(r) for r in msg.retries),
                    error=msg.error if isinstance(msg, ModelFailed) else None,
                    malformed=isinstance(msg, ModelFailed) and msg.malformed))
        if len(batch) < 500:
            return out
        after = batch[-1].entry_id
