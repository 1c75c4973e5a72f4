"""The error hierarchy. Each message names the run and says what to do.

A user reading a traceback should know whether to retry, fix the input or
call someone: `Fenced` means another incarnation owns the run (stop, do not
retry); `CorruptCheckpoint` means a stored record cannot be read (the run is
quarantined; call someone); `StoreUnavailable` means Redis is unreachable
(retry).
"""

from __future__ import annotations


class UndyingError(Exception):
    """Base of every error undying raises on purpose."""


class RunNotFound(UndyingError):
    def __init__(self, run_id: str) -> None:
        super().__init__(f"run {run_id!r} does not exist (check the id with `undying status`)")
        self.run_id = run_id


class RunExists(UndyingError):
    def __init__(self, run_id: str) -> None:
        super().__init__(f"run {run_id!r} already exists; resume it or pick another id")
        self.run_id = run_id


class Fenced(UndyingError):
    """A commit from an older incarnation. The writer must stop: another owns the run."""

    def __init__(self, run_id: str, epoch: int, current: int) -> None:
        super().__init__(
            f"run {run_id!r}: commit with epoch {epoch} refused, the run now has epoch "
            f"{current}; this actor is a zombie and stops"
        )
        self.run_id = run_id
        self.epoch = epoch
        self.current = current


class StepConflict(UndyingError):
    """A commit whose step is not the next one: two writers raced within one epoch."""

    def __init__(self, run_id: str, step: int, stored: int) -> None:
        super().__init__(
            f"run {run_id!r}: commit of step {step} refused, stored step is {stored}"
        )
        self.run_id = run_id
        self.step = step
        self.stored = stored


class CorruptCheckpoint(UndyingError):
    """A stored record failed to decode. The run is quarantined; nothing else stops."""

    def __init__(self, run_id: str, reason: str) -> None:
        super().__init__(
            f"run {run_id!r}: stored record cannot be read ({reason}); the run is quarantined, "
            f"inspect it with `undying history {run_id}`"
        )
        self.run_id = run_id
        self.reason = reason


class NeedsUpgrade(CorruptCheckpoint):
    """A record written by a newer undying: nothing is wrong with it, this reader is old.
    The run is not quarantined; upgrade undying on every node."""

    def __init__(self, run_id: str, reason: str) -> None:
        UndyingError.__init__(self, f"run {run_id!r}: {reason}")
        self.run_id = run_id
        self.reason = reason


class RecordTooLarge(UndyingError):
    def __init__(self, run_id: str, size: int, limit: int) -> None:
        super().__init__(
            f"run {run_id!r}: record of {size} bytes exceeds the limit of {limit} bytes; "
            "store large tool outputs by reference"
        )
        self.run_id = run_id
        self.size = size
        self.limit = limit


class RecordUnencodable(UndyingError):
    def __init__(self, run_id: str, kind: str, reason: str) -> None:
        super().__init__(f"run {run_id!r}: a {kind} record cannot be encoded ({reason})")
        self.run_id = run_id
        self.kind = kind
        self.reason = reason


class Quarantined(UndyingError):
    def __init__(self, run_id: str, reason: str) -> None:
        super().__init__(f"run {run_id!r} is quarantined: {reason}")
        self.run_id = run_id
        self.reason = reason


class StoreUnavailable(UndyingError):
    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"Redis at {url} is unavailable ({reason}); retry when it is back")
        self.url = url
        self.reason = reason
