"""The supervisor's restart policy, driven on a fake clock: no Ray, no Redis, milliseconds."""

from __future__ import annotations

from dataclasses import FrozenInstanceError, dataclass
from typing import TypeAlias

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from undying.supervisor._policy import (
    ActorDied,
    Adopt,
    Command,
    Event,
    LeaseExpired,
    MarkFailed,
    NodeLost,
    Policy,
    Restart,
    RestartFailed,
    RestartSucceeded,
    RunFinished,
    RunStarted,
    RunView,
    ScheduleTick,
    SupervisorView,
    Tick,
    handle,
)

NO_BACKOFF = Policy(backoff_base_s=0.0)


class Sim:
    """Feeds events through ``handle`` on a fake clock, the way the supervisor actor would."""

    def __init__(self, policy: Policy | None = None, now: float = 100.0) -> None:
        self.view = SupervisorView(policy or Policy())
        self.now = now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def send(self, event: Event) -> list[Command]:
        self.view, commands = handle(self.view, event, self.now)
        return commands

    def run(self, run_id: str) -> RunView:
        return self.view.runs[run_id]

    def crash_and_restart(self, run_id: str, node_id: str = "n2", epoch: int = 2) -> Restart:
        """Kill the run, let any back-off elapse, and return the Restart that followed."""
        commands = self.send(ActorDied(run_id, "boom"))
        if commands and isinstance(commands[0], ScheduleTick):
            self.now = commands[0].at
            commands = self.send(Tick())
        (restart,) = commands
        assert isinstance(restart, Restart)
        self.send(RestartSucceeded(run_id, node_id, epoch))
        return restart


def started(*runs: tuple[str, str], policy: Policy | None = None) -> Sim:
    sim = Sim(policy)
    for run_id, node_id in runs:
        assert sim.send(RunStarted(run_id, node_id)) == []
    return sim


# --- each event kind ----------------------------------------------------------------------


def test_run_started_adds_a_running_run() -> None:
    sim = started(("r1", "n1"))
    assert sim.run("r1") == RunView("r1", "running", "n1")


def test_repeated_run_started_moves_a_running_run_only() -> None:
    sim = started(("r1", "n1"))
    assert sim.send(RunStarted("r1", "n3")) == []
    assert sim.run("r1").node_id == "n3"
    sim.send(LeaseExpired("r1"))
    before = sim.view
    assert sim.send(RunStarted("r1", "n4")) == []
    assert sim.view is before  # a restart in flight is not disturbed


def test_lease_expired_restarts_immediately_from_running() -> None:
    sim = started(("r1", "n1"))
    assert sim.send(LeaseExpired("r1")) == [Restart("r1", frozenset(), attempt=1)]
    run = sim.run("r1")
    assert (run.state, run.node_id, run.last_error, run.restarts) == (
        "restarting",
        None,
        "lease expired",
        (100.0,),
    )


def test_actor_died_restarts_and_records_the_reason() -> None:
    sim = started(("r1", "n1"))
    assert sim.send(ActorDied("r1", "OOM")) == [Restart("r1", frozenset(), attempt=1)]
    assert sim.run("r1").last_error == "OOM"


def test_restart_succeeded_returns_the_run_to_running_on_the_new_node() -> None:
    sim = started(("r1", "n1"))
    sim.send(NodeLost("n1"))
    sim.advance(0.2)
    assert sim.send(RestartSucceeded("r1", "n2", epoch=2)) == []
    run = sim.run("r1")
    assert (run.state, run.node_id, run.epoch, run.avoid_nodes) == ("running", "n2", 2, frozenset())
    assert run.restarts == (100.0,)  # the window survives a clean restart


def test_restart_failed_counts_as_a_crash_and_backs_off() -> None:
    sim = started(("r1", "n1"))
    sim.send(ActorDied("r1", "boom"))
    sim.advance(0.1)
    assert sim.send(RestartFailed("r1", "no capacity")) == [ScheduleTick(100.6)]
    run = sim.run("r1")
    assert (run.state, run.next_restart_at) == ("backing_off", 100.6)
    assert run.last_error == "restart failed: no capacity"


def test_stray_restart_replies_are_ignored() -> None:
    sim = started(("r1", "n1"))
    before = sim.view
    assert sim.send(RestartFailed("r1", "late")) == []
    assert sim.send(RestartSucceeded("r1", "n9", epoch=0)) == []
    assert sim.view is before


def test_tick_fires_a_back_off_restart_only_when_due() -> None:
    sim = started(("r1", "n1"))
    sim.crash_and_restart("r1")
    assert sim.send(ActorDied("r1", "boom")) == [ScheduleTick(100.5)]
    sim.advance(0.4)
    assert sim.send(Tick()) == [ScheduleTick(100.5)]  # re-requested, in case it was dropped
    assert sim.run("r1").state == "backing_off"
    sim.advance(0.2)
    assert sim.send(Tick()) == [Restart("r1", frozenset(), attempt=2)]
    assert sim.run("r1").next_restart_at is None
    assert sim.send(Tick()) == []


def test_tick_with_nothing_due_changes_nothing() -> None:
    sim = started(("r1", "n1"))
    before = sim.view
    assert sim.send(Tick()) == []
    assert sim.view == before


def test_run_finished_removes_the_run_in_every_state() -> None:
    sim = started(("running", "n1"), ("restarting", "n1"), ("backing_off", "n1"), ("done", "n1"))
    sim.send(ActorDied("restarting", "boom"))
    sim.crash_and_restart("backing_off")
    sim.send(ActorDied("backing_off", "boom"))
    sim.view = SupervisorView(Policy(max_restarts=0), sim.view.runs)
    sim.send(ActorDied("done", "boom"))
    assert {r.state for r in sim.view.runs.values()} == {
        "running",
        "restarting",
        "backing_off",
        "done",
    }
    for run_id in ["running", "restarting", "backing_off", "done"]:
        assert sim.send(RunFinished(run_id, "finished")) == []
    assert dict(sim.view.runs) == {}
    sim.advance(100)
    assert sim.send(Tick()) == []  # the removed run's back-off does not fire


def test_adopt_with_a_live_lease_resumes_supervision() -> None:
    sim = Sim()
    assert sim.send(Adopt("r1", "n1", lease_expires_at=105.0, epoch=3)) == []
    assert sim.run("r1") == RunView("r1", "running", "n1", epoch=3)
    assert sim.send(NodeLost("n1")) == [Restart("r1", frozenset({"n1"}), attempt=1)]


def test_adopt_with_an_expired_lease_restarts_the_run() -> None:
    sim = Sim()
    assert sim.send(Adopt("r1", "n1", lease_expires_at=99.0)) == [
        Restart("r1", frozenset(), attempt=1)
    ]


def test_adopt_restores_the_window_so_the_guard_survives_a_supervisor_restart() -> None:
    sim = Sim(Policy(max_restarts=2))
    recent = (10.0, 95.0, 99.0)  # 10.0 is outside the window and is dropped
    assert sim.send(Adopt("r1", "n1", 200.0, recent_restarts=recent)) == []
    assert sim.run("r1").restarts == (95.0, 99.0)
    (failed,) = sim.send(LeaseExpired("r1"))
    assert failed == MarkFailed("r1", "run r1 failed: 3 crashes in 60s, last: lease expired")


def test_adopt_never_overrides_the_live_view() -> None:
    sim = started(("r1", "n1"))
    sim.send(ActorDied("r1", "boom"))
    before = sim.view
    assert sim.send(Adopt("r1", "n5", lease_expires_at=0.0)) == []
    assert sim.view is before


# --- crash-loop guard ---------------------------------------------------------------------


def test_crash_loop_ends_in_mark_failed_with_the_reason() -> None:
    sim = started(("r1", "n1"), policy=NO_BACKOFF)
    for attempt in range(1, 6):
        assert sim.crash_and_restart("r1", epoch=attempt + 1).attempt == attempt
        sim.advance(1.0)
    assert sim.send(ActorDied("r1", "KeyError: 'tool'")) == [
        MarkFailed("r1", "run r1 failed: 6 crashes in 60s, last: KeyError: 'tool'")
    ]
    assert sim.run("r1").state == "done"
    before = sim.view
    for signal in [LeaseExpired("r1"), ActorDied("r1", "x"), NodeLost("n2"), Tick()]:
        assert sim.send(signal) == []
    assert sim.view is before
    assert sim.send(RunFinished("r1", "failed")) == []
    assert "r1" not in sim.view.runs


def test_crash_loop_with_back_off_also_ends_in_mark_failed() -> None:
    sim = started(("r1", "n1"))
    for _ in range(5):
        sim.crash_and_restart("r1")
    (failed,) = sim.send(ActorDied("r1", "poison"))
    assert failed == MarkFailed("r1", "run r1 failed: 6 crashes in 60s, last: poison")


def test_repeated_failed_restarts_end_in_mark_failed() -> None:
    sim = started(("r1", "n1"), policy=NO_BACKOFF)
    sim.send(NodeLost("n1"))
    for attempt in range(2, 6):
        assert sim.send(RestartFailed("r1", "no node")) == [
            Restart("r1", frozenset({"n1"}), attempt=attempt)
        ]
    assert sim.send(RestartFailed("r1", "no node")) == [
        MarkFailed("r1", "run r1 failed: 6 crashes in 60s, last: restart failed: no node")
    ]


def test_the_window_slides_so_spaced_crashes_never_fail_the_run() -> None:
    sim = started(("r1", "n1"))
    for epoch in range(2, 52):
        sim.advance(60.0)  # a restart exactly window_s ago no longer counts
        assert sim.send(ActorDied("r1", "flaky")) == [Restart("r1", frozenset(), attempt=1)]
        sim.send(RestartSucceeded("r1", "n1", epoch))
    assert sim.run("r1").state == "running"


def test_crashes_just_inside_the_window_still_count() -> None:
    sim = started(("r1", "n1"), policy=Policy(max_restarts=1, backoff_base_s=0.0))
    sim.crash_and_restart("r1")
    sim.advance(59.9)
    (failed,) = sim.send(ActorDied("r1", "boom"))
    assert isinstance(failed, MarkFailed)


def test_max_restarts_zero_fails_on_the_first_crash() -> None:
    sim = started(("r1", "n1"), policy=Policy(max_restarts=0, window_s=10.0))
    assert sim.send(ActorDied("r1", "boom")) == [
        MarkFailed("r1", "run r1 failed: 1 crashes in 10s, last: boom")
    ]


# --- back-off -----------------------------------------------------------------------------


def test_back_off_delays_start_immediate_then_grow_and_cap() -> None:
    policy = Policy(max_restarts=10, window_s=1000.0, backoff_max_s=3.0)
    sim = started(("r1", "n1"), policy=policy)
    delays = []
    for epoch in range(2, 12):
        crash_at = sim.now
        commands = sim.send(ActorDied("r1", "boom"))
        if isinstance(commands[0], ScheduleTick):
            sim.now = commands[0].at
            commands = sim.send(Tick())
        assert isinstance(commands[0], Restart)
        delays.append(round(sim.now - crash_at, 9))
        sim.send(RestartSucceeded("r1", "n1", epoch))
    assert delays == [0.0, 0.5, 1.0, 2.0, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0]


def test_back_off_rule() -> None:
    policy = Policy()
    assert [policy.backoff_s(n) for n in range(8)] == [0, 0.5, 1, 2, 4, 8, 16, 30]
    assert Policy(backoff_base_s=0.0).backoff_s(4) == 0.0
    assert Policy(max_restarts=10_000).backoff_s(5_000) == 30.0  # no float overflow


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_restarts": -1},
        {"window_s": 0.0},
        {"backoff_base_s": -1.0},
        {"backoff_max_s": -1.0},
        {"backoff_factor": 0.5},
    ],
)
def test_policy_rejects_nonsense(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        Policy(**kwargs)  # type: ignore[arg-type]


def test_back_off_restarts_fire_in_due_order_on_one_tick() -> None:
    sim = started(("a", "n1"), ("b", "n1"), policy=Policy(backoff_base_s=1.0))
    sim.crash_and_restart("b")
    sim.crash_and_restart("a")
    assert sim.send(ActorDied("a", "boom")) == [ScheduleTick(101.0)]
    assert sim.send(ActorDied("b", "boom")) == [ScheduleTick(101.0)]
    sim.advance(5)
    assert sim.send(Tick()) == [
        Restart("a", frozenset(), attempt=2),
        Restart("b", frozenset(), attempt=2),
    ]


# --- node loss and duplicate signals ------------------------------------------------------


def test_node_lost_restarts_exactly_the_runs_on_that_node_avoiding_it() -> None:
    sim = started(("r1", "n1"), ("r2", "n1"), ("r3", "n2"))
    assert sim.send(NodeLost("n1")) == [
        Restart("r1", frozenset({"n1"}), attempt=1),
        Restart("r2", frozenset({"n1"}), attempt=1),
    ]
    assert sim.run("r3").state == "running"
    assert sim.send(NodeLost("n9")) == []


def test_a_failed_restart_after_node_loss_still_avoids_the_node() -> None:
    sim = started(("r1", "n1"))
    sim.send(NodeLost("n1"))
    assert sim.send(RestartFailed("r1", "timeout")) == [ScheduleTick(100.5)]
    sim.advance(1)
    assert sim.send(Tick()) == [Restart("r1", frozenset({"n1"}), attempt=2)]


def test_duplicate_death_signals_produce_one_restart() -> None:
    sim = started(("r1", "n1"))
    assert len(sim.send(LeaseExpired("r1"))) == 1
    for duplicate in [ActorDied("r1", "actor died"), LeaseExpired("r1"), NodeLost("n1")]:
        assert sim.send(duplicate) == []
    sim.send(RestartFailed("r1", "boom"))  # now backing off
    for duplicate in [ActorDied("r1", "actor died"), LeaseExpired("r1")]:
        assert sim.send(duplicate) == []


def test_a_late_signal_about_a_replaced_incarnation_is_ignored() -> None:
    sim = started(("r1", "n1"))
    sim.send(ActorDied("r1", "boom", epoch=1))
    sim.send(RestartSucceeded("r1", "n2", epoch=2))
    before = sim.view
    assert sim.send(LeaseExpired("r1", epoch=1)) == []
    assert sim.view is before
    assert sim.send(LeaseExpired("r1", epoch=2)) != []


@pytest.mark.parametrize(
    "event",
    [
        LeaseExpired("ghost"),
        ActorDied("ghost", "x"),
        RestartSucceeded("ghost", "n1", 2),
        RestartFailed("ghost", "x"),
        RunFinished("ghost", "finished"),
        NodeLost("n9"),
    ],
)
def test_signals_about_unknown_runs_are_ignored(event: Event) -> None:
    sim = started(("r1", "n1"))
    before = sim.view
    assert sim.send(event) == []
    assert sim.view is before


def test_handle_is_pure() -> None:
    sim = started(("r1", "n1"))
    before = sim.view
    snapshot = dict(before.runs)
    after, _ = handle(before, NodeLost("n1"), 200.0)
    assert dict(before.runs) == snapshot and after is not before
    with pytest.raises(FrozenInstanceError):
        before.runs["r1"].state = "done"  # type: ignore[misc]
    with pytest.raises(TypeError):
        before.runs["x"] = snapshot["r1"]  # type: ignore[index]


# --- properties ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    """Test-only step: the adapter answers the oldest Restart in flight, as a real one does."""

    ok: bool
    node_id: str


@dataclass(frozen=True)
class TimerFires:
    """Test-only step: the adapter's timer for the earliest requested Tick goes off."""


Step: TypeAlias = Event | Answer | TimerFires

RUNS = st.sampled_from(["a", "a", "b"])  # mostly one run, so that it loops
NODES = st.sampled_from(["n1", "n2"])
EPOCHS = st.none() | st.integers(0, 3)
# Deaths, answers and timers are weighted up so that crash loops, what the guard is for, are
# common; stray replies and removal stay in so that the policy must shrug them off.
STEPS = st.lists(
    st.tuples(
        # Time passes in fractions of the window: its edges are where the guard can slip.
        st.sampled_from([0.0, 0.05, 0.3, 0.6, 0.99, 1.0, 2.0]) | st.floats(0, 2),
        st.one_of(
            st.builds(LeaseExpired, RUNS, EPOCHS),
            st.builds(ActorDied, RUNS, st.just("boom"), EPOCHS),
            st.builds(NodeLost, NODES),
            st.builds(Answer, st.booleans(), NODES),
            st.builds(Answer, st.booleans(), NODES),
            st.just(TimerFires()),
            st.just(TimerFires()),
            st.builds(RestartSucceeded, RUNS, NODES, st.integers(0, 3)),
            st.builds(RestartFailed, RUNS, st.just("stray")),
            st.just(Tick()),
            st.builds(RunStarted, RUNS, NODES),
            st.builds(Adopt, RUNS, NODES, st.floats(0, 400)),
            st.builds(RunFinished, RUNS, st.sampled_from(["finished", "failed", "cancelled"])),
        ),
    ),
    max_size=60,
)
POLICIES = st.builds(
    Policy,
    max_restarts=st.integers(0, 3),
    window_s=st.sampled_from([5.0, 10.0, 30.0]) | st.floats(1, 30),
    backoff_base_s=st.sampled_from([0.0, 0.5, 2.0]),
    backoff_factor=st.sampled_from([1.0, 2.0, 3.0]),
    backoff_max_s=st.sampled_from([0.0, 1.0, 10.0]),
)


@settings(max_examples=400, deadline=None)
@given(policy=POLICIES, steps=STEPS)
def test_guard_holds_for_any_sequence_of_events(
    policy: Policy, steps: list[tuple[float, Step]]
) -> None:
    """(a) <= max_restarts restarts in any window, (b) one Restart outstanding per run,
    (c) no Restart after MarkFailed. A run's life ends when RunFinished removes it."""
    runs = {r: RunView(r, "running", "n1") for r in ["a", "b"]}
    view, now = SupervisorView(policy, runs), 0.0
    issued: dict[str, list[float]] = {}
    outstanding: list[str] = []  # oldest first
    failed: set[str] = set()
    requested_ticks: set[float] = set()
    epoch = 10
    for fraction, step in steps:
        now += fraction * policy.window_s
        event: Event
        if isinstance(step, Answer):
            if not outstanding:
                continue
            epoch += 1
            run_id = outstanding[0]
            ok = RestartSucceeded(run_id, step.node_id, epoch)
            event = ok if step.ok else RestartFailed(run_id, "no capacity")
        elif isinstance(step, TimerFires):
            now = min([t for t in requested_ticks if t >= now], default=now)
            event = Tick()
        else:
            event = step
        prior = view.runs.get(getattr(event, "run_id", ""))
        view, commands = handle(view, event, now)
        if isinstance(event, RestartSucceeded | RestartFailed) and event.run_id in outstanding:
            outstanding.remove(event.run_id)  # the adapter's reply to the Restart in flight
        if isinstance(event, RunFinished) and prior is not None:
            issued.pop(event.run_id, None)
            failed.discard(event.run_id)
            if event.run_id in outstanding:
                outstanding.remove(event.run_id)
        for command in commands:
            if isinstance(command, Restart):
                run_id = command.run_id
                assert run_id not in failed, "Restart after MarkFailed"
                assert run_id not in outstanding, "two Restarts outstanding"
                outstanding.append(run_id)
                times = issued.setdefault(run_id, [])
                times.append(now)
                in_window = sum(t > now - policy.window_s for t in times)
                assert in_window <= policy.max_restarts
                assert command.attempt == len(view.runs[run_id].restarts) <= policy.max_restarts
            elif isinstance(command, MarkFailed):
                assert command.run_id not in failed
                failed.add(command.run_id)
            else:
                requested_ticks.add(command.at)
        for run_id, run in view.runs.items():
            assert (run.state == "restarting") == (run_id in outstanding)
            assert (run.state == "done") == (run_id in failed)
            if run.state == "backing_off":
                # Liveness: the back-off is timed, and a Tick at or past it always fires it.
                assert run.next_restart_at in requested_ticks
                assert not (isinstance(event, Tick) and run.next_restart_at <= now)
        assert failed <= set(view.runs) and set(outstanding) <= set(view.runs)
