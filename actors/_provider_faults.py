"""Fault rules for `provider_server`: which request gets which fault, deterministically.

A rule is a dict: ``{"kind": "429", "retry_after": 1, "every": 3}`` (every third
matching request), ``{"kind": "503", "first": 2}`` (the first two),
``{"kind": "slow", "delay": 0.5, "prob": 0.2}`` (seeded). Optional ``path`` and
``model`` narrow which requests a rule counts; ``after`` skips the first N of
them; ``times`` caps how often it fires. The first rule that fires wins.

Kinds: an HTTP status (``"429"``, ``"500"``, ``"503"``, ``"401"`` …, with an
error body in the request's wire format and, for 429/503, ``Retry-After``);
``slow`` (answer after ``delay`` s); ``timeout`` (never answer; hold the
connection until the client gives up); ``reset`` (headers and half the body,
then close); ``close`` (close without answering); ``malformed`` (a 200 whose
body is not JSON); ``bad_args`` (a tool call whose arguments are not JSON, or
with ``"shape": "wrong_shape"`` JSON that is not an object); ``unknown_tool``
(a tool call naming a tool that was not offered); ``empty`` (no content, no
tool calls).
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, fields
from typing import Any

KINDS = frozenset({"slow", "timeout", "reset", "close", "malformed", "bad_args", "unknown_tool",
                   "empty"})


@dataclass
class FaultRule:
    kind: str
    first: int | None = None
    every: int | None = None
    prob: float | None = None
    after: int = 0
    times: int | None = None
    path: str | None = None
    model: str | None = None
    retry_after: float | None = None
    retry_after_format: str = "seconds"  # or "date" (an HTTP-date) or "ms" (retry-after-ms)
    delay: float = 0.0
    shape: str = "not_json"  # bad_args: "not_json" or "wrong_shape"
    tool: str = "frobnicate"  # unknown_tool: the name sent
    body: str | None = None  # malformed: the body sent (default: the real one, cut in half)
    seen: int = 0
    fired: int = 0

    @classmethod
    def parse(cls, raw: dict[str, Any]) -> FaultRule:
        known = {f.name for f in fields(cls)} - {"seen", "fired"}
        unknown = set(raw) - known
        if unknown:
            raise ValueError(f"fault rule {raw}: unknown keys {sorted(unknown)}; known: {sorted(known)}")
        rule = cls(**{**raw, "kind": str(raw.get("kind", ""))})
        if rule.kind not in KINDS and not (rule.kind.isdigit() and 400 <= int(rule.kind) < 600):
            raise ValueError(f"fault rule {raw}: kind must be an HTTP status or one of {sorted(KINDS)}")
        if rule.retry_after_format not in ("seconds", "date", "ms"):
            raise ValueError(f"fault rule {raw}: retry_after_format must be seconds, date or ms")
        if rule.shape not in ("not_json", "wrong_shape"):
            raise ValueError(f"fault rule {raw}: shape must be not_json or wrong_shape")
        return rule

    @property
    def status(self) -> int | None:
        return int(self.kind) if self.kind.isdigit() else None


class FaultPlan:
    def __init__(self, rules: list[dict[str, Any]] | None = None, seed: int = 0) -> None:
        self.rules = [FaultRule.parse(r) for r in rules or []]
        self.seed = seed
        self.rng = random.Random(seed)

    def pick(self, path: str, model: str) -> FaultRule | None:
        chosen = None
        for rule in self.rules:
            if (rule.path and rule.path != path) or (rule.model and rule.model != model):
                continue
            rule.seen += 1
            n = rule.seen - rule.after
            fires = n >= 1
            if rule.first is not None:
                fires = fires and n <= rule.first
            if rule.every is not None:
                fires = fires and n % rule.every == 0
            if rule.prob is not None:
                fires = fires and self.rng.random() < rule.prob  # drawn per match: replayable
            if rule.times is not None:
                fires = fires and rule.fired < rule.times
            if fires and chosen is None:
                rule.fired += 1
                chosen = rule
        return chosen


class SlidingWindow:
    """At most ``limit`` accepted requests in any ``window_s``; the rest are told when to return."""

    def __init__(self, limit: int, window_s: float = 1.0) -> None:
        self.limit = limit
        self.window_s = window_s
        self.accepted: deque[float] = deque()

    def admit(self, now: float) -> float | None:
        """None if admitted, else seconds until a slot frees (the Retry-After)."""
        while self.accepted and self.accepted[0] <= now - self.window_s:
            self.accepted.popleft()
        if len(self.accepted) >= self.limit:
            return self.accepted[0] + self.window_s - now
        self.accepted.append(now)
        return None


def max_in_window(times: list[float], window_s: float = 1.0) -> int:
    """The most of ``times`` (sorted) that fall within any half-open window of ``window_s``."""
    best = lo = 0
    for hi, t in enumerate(times):
        while times[lo] <= t - window_s:
            lo += 1
        best = max(best, hi - lo + 1)
    return best
