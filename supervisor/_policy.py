"""The supervisor's restart policy as a pure state machine.

``handle(view, event, now) -> (view, commands)`` is the whole policy: the supervisor actor
(the adapter) turns Ray death signals, lease expiries and timers into ``Event`` values, and
carries out the returned ``Command`` values (claim an epoch and start an actor, persist a
failure, arm a timer). Nothing here touches Ray, Redis or the clock; ``now`` is injected.

Rebuilding the view: the supervisor is a detached actor that Ray restarts when it dies, and
this view is the only state it holds, so it must be rebuildable from Redis. On start the
adapter feeds one ``Adopt`` per non-terminal run in the run index, with the node and expiry
of the run's lease, into an empty ``SupervisorView``. A run whose lease already expired is
treated as crashed. Restart times are the one thing Redis does not hold unless the adapter
records them (for example beside each epoch claim); it passes them in
``Adopt.recent_restarts``. Without them an adopted run gets a fresh budget of
``max_restarts``, so a crash loop is still bounded, just by one budget per supervisor life.

Timers: ``ScheduleTick(at)`` asks for a ``Tick`` at or after ``at``. Ticks are idempotent and
may arrive at any time, so an adapter may keep only its earliest timer: every Tick re-requests
the earliest back-off still pending.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Literal, TypeAlias

__all__ = [
    "ActorDied",
    "Adopt",
    "Command",
    "Event",
    "FinishStatus",
    "Forget",
    "LeaseExpired",
    "MarkFailed",
    "NodeLost",
    "Policy",
    "Restart",
    "RestartFailed",
    "RestartSucceeded",
    "RunFinished",
    "RunStarted",
    "RunState",
    "RunView",
    "ScheduleTick",
    "SupervisorView",
    "Tick",
    "handle",
]

RunState: TypeAlias = Literal["running", "restarting", "backing_off", "done"]
FinishStatus: TypeAlias = Literal["finished", "failed", "cancelled", "quarantined"]


@dataclass(frozen=True)
class Policy:
    """Restart intensity (OTP): at most ``max_restarts`` restarts per run in ``window_s``.

    Back-off rule, with n = restarts of this run already inside the window:
    delay = 0 when n == 0, else min(backoff_max_s, backoff_base_s * backoff_factor**(n - 1)).
    The first restart after a quiet period is immediate because recovery must stay under a
    second; only repeated crashes inside the window wait (defaults: 0, 0.5, 1, 2, 4 s).
    ``backoff_base_s=0`` disables back-off altogether.
    """

    max_restarts: int = 5
    window_s: float = 60.0
    backoff_base_s: float = 0.5
    backoff_factor: float = 2.0
    backoff_max_s: float = 30.0

    def __post_init__(self) -> None:
        if self.max_restarts < 0:
            raise ValueError(f"max_restarts must be >= 0, got {self.max_restarts}")
        if not self.window_s > 0:
            raise ValueError(f"window_s must be > 0, got {self.window_s}")
        if self.backoff_base_s < 0 or self.backoff_max_s < 0:
            raise ValueError("backoff_base_s and backoff_max_s must be >= 0")
        if self.backoff_factor < 1:
            raise ValueError(f"backoff_factor must be >= 1, got {self.backoff_factor}")

    def backoff_s(self, restarts_in_window: int) -> float:
        """Delay before the next restart, given how many restarts the window already holds."""
        if restarts_in_window <= 0 or self.backoff_base_s == 0:
            return 0.0
        try:
            delay = self.backoff_base_s * self.backoff_factor ** (restarts_in_window - 1)
        except OverflowError:
            return self.backoff_max_s
        return min(self.backoff_max_s, delay)


@dataclass(frozen=True)
class RunStarted:
    run_id: str
    node_id: str
    epoch: int | None = None


@dataclass(frozen=True)
class LeaseExpired:
    run_id: str
    # The incarnation whose lease expired, when known: a signal about an older epoch than
    # the one the view knows is about an actor already replaced, and must not restart again.
    epoch: int | None = None


@dataclass(frozen=True)
class ActorDied:
    run_id: str
    reason: str
    epoch: int | None = None


@dataclass(frozen=True)
class NodeLost:
    node_id: str


@dataclass(frozen=True)
class RestartSucceeded:
    run_id: str
    node_id: str
    epoch: int


@dataclass(frozen=True)
class RestartFailed:
    run_id: str
    reason: str


@dataclass(frozen=True)
class RunFinished:
    run_id: str
    status: FinishStatus


@dataclass(frozen=True)
class Tick:
    pass


@dataclass(frozen=True)
class Forget:
    """The incident is over: drop a running run from the view (its restart times stay in
    Redis and come back with the next `Adopt`). Ignored in any other state."""

    run_id: str


@dataclass(frozen=True)
class Adopt:
    run_id: str
    node_id: str
    lease_expires_at: float
    epoch: int | None = None
    recent_restarts: tuple[float, ...] = ()


Event: TypeAlias = (
    RunStarted
    | LeaseExpired
    | ActorDied
    | NodeLost
    | RestartSucceeded
    | RestartFailed
    | RunFinished
    | Tick
    | Adopt
    | Forget
)


@dataclass(frozen=True)
class Restart:
    """Claim a new epoch and start an actor from the latest checkpoint, off ``avoid_nodes``.

    ``attempt`` is this restart's 1-based position in the run's current window.
    """

    run_id: str
    avoid_nodes: frozenset[str]
    attempt: int


@dataclass(frozen=True)
class MarkFailed:
    run_id: str
    reason: str


@dataclass(frozen=True)
class ScheduleTick:
    at: float


Command: TypeAlias = Restart | MarkFailed | ScheduleTick


@dataclass(frozen=True)
class RunView:
    """What the supervisor knows about one run.

    Invariant: exactly the runs in state ``restarting`` have one Restart outstanding, so a
    second death signal for the same incarnation finds ``restarting`` and is dropped.
    ``done`` means MarkFailed was issued; the run stays until the adapter confirms with
    RunFinished so that late death signals cannot revive it.
    """

    run_id: str
    state: RunState
    node_id: str | None  # None while no live incarnation is known
    epoch: int | None = None
    restarts: tuple[float, ...] = ()  # times restarts were issued, oldest first
    last_error: str | None = None
    next_restart_at: float | None = None  # set only while backing_off
    avoid_nodes: frozenset[str] = frozenset()  # nodes lost under this run since it last ran


@dataclass(frozen=True)
class SupervisorView:
    policy: Policy = field(default_factory=Policy)
    runs: Mapping[str, RunView] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # A read-only copy keeps the view immutable even if the caller's dict changes later.
        object.__setattr__(self, "runs", MappingProxyType(dict(self.runs)))


Result: TypeAlias = tuple[SupervisorView, list[Command]]


def handle(view: SupervisorView, event: Event, now: float) -> Result:
    """Apply one event at time ``now``; return the new view and the commands to carry out."""
    match event:
        case RunStarted() | Adopt():
            return _on_start(view, event, now)
        case LeaseExpired():
            return _on_death(view, event.run_id, event.epoch, "lease expired", now)
        case ActorDied():
            return _on_death(view, event.run_id, event.epoch, event.reason, now)
        case NodeLost():
            return _on_node_lost(view, event.node_id, now)
        case RestartSucceeded():
            return _on_restart_succeeded(view, event)
        case RestartFailed():
            run = view.runs.get(event.run_id)
            # Only the reply to our outstanding Restart counts; anything else is a stray.
            if run is None or run.state != "restarting":
                return view, []
            return _crash(view, run, f"restart failed: {event.reason}", run.avoid_nodes, now)
        case RunFinished():
            if event.run_id not in view.runs:
                return view, []
            runs = dict(view.runs)
            del runs[event.run_id]
            return replace(view, runs=runs), []
        case Tick():
            return _on_tick(view, now)
        case Forget():
            run = view.runs.get(event.run_id)
            if run is None or run.state != "running":
                return view, []
            runs = dict(view.runs)
            del runs[event.run_id]
            return replace(view, runs=runs), []
    raise TypeError(f"not a supervisor event: {event!r}")


def _put(view: SupervisorView, run: RunView) -> SupervisorView:
    return replace(view, runs={**view.runs, run.run_id: run})


def _in_window(times: tuple[float, ...], now: float, window_s: float) -> tuple[float, ...]:
    # Half-open (now - window, now]: a restart exactly window_s ago no longer counts.
    return tuple(t for t in times if t > now - window_s)


def _on_start(view: SupervisorView, event: RunStarted | Adopt, now: float) -> Result:
    known = view.runs.get(event.run_id)
    if known is not None:
        # The live view is fresher than Redis, so a late Adopt never overrides it. A repeated
        # RunStarted may move a running run (re-activation elsewhere) but must not disturb a
        # restart in flight or revive a failed run.
        if isinstance(event, RunStarted) and known.state == "running":
            epoch = event.epoch if event.epoch is not None else known.epoch
            return _put(view, replace(known, node_id=event.node_id, epoch=epoch)), []
        return view, []
    if isinstance(event, RunStarted):
        return _put(view, RunView(event.run_id, "running", event.node_id, event.epoch)), []
    restarts = _in_window(event.recent_restarts, now, view.policy.window_s)
    run = RunView(event.run_id, "running", event.node_id, event.epoch, tuple(sorted(restarts)))
    if event.lease_expires_at <= now:
        # The run died while no supervisor was watching; nothing else will report it.
        return _crash(
            view, run, "lease expired before the supervisor adopted the run", frozenset(), now
        )
    return _put(view, run), []


def _on_death(
    view: SupervisorView, run_id: str, epoch: int | None, reason: str, now: float
) -> Result:
    run = view.runs.get(run_id)
    # Only a running run can die: restarting/backing_off already handle this death, and done
    # is final. That is what collapses LeaseExpired + ActorDied for one death into one restart.
    if run is None or run.state != "running":
        return view, []
    if epoch is not None and run.epoch is not None and epoch < run.epoch:
        return view, []
    # A single actor death says nothing against its node, so nothing is avoided.
    return _crash(view, run, reason, frozenset(), now)


def _on_node_lost(view: SupervisorView, node_id: str, now: float) -> Result:
    commands: list[Command] = []
    for run_id in sorted(view.runs):
        run = view.runs[run_id]
        if run.state == "running" and run.node_id == node_id:
            view, more = _crash(view, run, f"node {node_id} lost", frozenset({node_id}), now)
            commands.extend(more)
    return view, commands


def _on_restart_succeeded(view: SupervisorView, event: RestartSucceeded) -> Result:
    run = view.runs.get(event.run_id)
    # Only the reply to our outstanding Restart counts; anything else is a stray.
    if run is None or run.state != "restarting":
        return view, []
    # The window is kept: a run that restarts cleanly and then crashes again is exactly the
    # crash loop the guard is for.
    fresh = replace(run, state="running", node_id=event.node_id, epoch=event.epoch)
    return _put(view, replace(fresh, avoid_nodes=frozenset())), []


def _crash(
    view: SupervisorView, run: RunView, reason: str, avoid: frozenset[str], now: float
) -> Result:
    """Decide what a crash of ``run`` at ``now`` leads to: restart now, later, or give up."""
    policy = view.policy
    recent = _in_window(run.restarts, now, policy.window_s)
    run = replace(run, node_id=None, restarts=recent, last_error=reason, avoid_nodes=avoid)
    if len(recent) >= policy.max_restarts:
        message = (
            f"run {run.run_id} failed: {len(recent) + 1} crashes in {policy.window_s:g}s, "
            f"last: {reason}"
        )
        return _put(view, replace(run, state="done")), [MarkFailed(run.run_id, message)]
    delay = policy.backoff_s(len(recent))
    if delay <= 0:
        return _restart_now(view, run, now)
    # The guard was checked at crash time, and a restart fired later can only see fewer
    # restarts in its window, so firing on the Tick never exceeds max_restarts.
    due = now + delay
    return _put(view, replace(run, state="backing_off", next_restart_at=due)), [ScheduleTick(due)]


def _restart_now(view: SupervisorView, run: RunView, now: float) -> Result:
    restarts = (*_in_window(run.restarts, now, view.policy.window_s), now)
    started = replace(run, state="restarting", restarts=restarts, next_restart_at=None)
    return _put(view, started), [Restart(run.run_id, run.avoid_nodes, attempt=len(restarts))]


def _on_tick(view: SupervisorView, now: float) -> Result:
    waiting = {r.run_id: r.next_restart_at for r in view.runs.values() if r.state == "backing_off"}
    commands: list[Command] = []
    for at, run_id in sorted((at, run_id) for run_id, at in waiting.items() if at is not None):
        if at > now:
            # Re-request the earliest pending back-off: the adapter may have dropped it.
            commands.append(ScheduleTick(at))
            break
        view, more = _restart_now(view, view.runs[run_id], now)
        commands.extend(more)
    return view, commands
