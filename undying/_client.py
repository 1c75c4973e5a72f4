"""The Python API: start runs, wait for them, read their status and history, resume them.

    import undying
    from undying.actors.research import agent

    ud = undying.connect()                 # embedded Redis + local Ray by default
    run = ud.start(agent, "What is a fencing token?")
    print(run.result(timeout=60).answer)

The CLI is a thin layer over this module.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from undying.actors import Agent, RunState, StepEvent, create_run, encode_message, load_state
from undying.actors._state import Approval, Cancel, Resolve, args_hash
from undying.cluster import Settings, connect_store, init_ray
from undying.persistence import TERMINAL, CheckpointStore, RunInfo, RunNotFound, UndyingError, decode

from ._observe import Observing, observe_options


class RunTimeout(UndyingError):
    pass


class ApprovalError(UndyingError):
    pass


@dataclass(frozen=True)
class PendingApproval:
    run_id: str
    call_id: str
    tool: str
    arguments: dict[str, Any]
    args_hash: str
    since_ms: int


@dataclass(frozen=True)
class RunResult:
    run_id: str
    status: str
    answer: str | None
    error: str | None
    steps: int
    tokens: int
    tool_calls: int


class Undying(Observing):
    """The Python API. Watching, history, forks, cleanup and metrics: `undying._observe`."""

    def __init__(self, settings: Settings | None = None, *, store: CheckpointStore | None = None,
                 actor_options: dict[str, Any] | None = None, supervise: bool = True,
                 policy: dict[str, Any] | None = None) -> None:
        """``supervise``: the cluster's supervisor keeps the pool of hosts and executors and
        restarts runs whose activation died. Without it, the pool is made here and a run
        whose host died waits for `resume` (or for its next message).

        ``actor_options`` go to the pool: ``hosts_per_node`` (4), ``executor_concurrency``
        (2000), ``lease_ttl_s`` (3), ``compact_ratio`` (2.0)."""
        self.settings = settings or Settings.from_env()
        self.store = store if store is not None else connect_store(self.settings)
        self.redis_url: str = getattr(self.store, "url", "")
        # UNDYING_EXPORTER_PORT / _ADDR, UNDYING_RETENTION: for the supervisor (_observe)
        self.actor_options = {**observe_options(), **dict(actor_options or {})}
        self.supervise = supervise
        self.policy = policy
        self._supervisor: Any = None
        self._pool_ready = False

    # -- runs -----------------------------------------------------------------

    def start(self, agent: Agent, task: str, *, run_id: str | None = None) -> RunHandle:
        """Store a new run; the next free host on any node activates it."""
        self.ensure_cluster()
        rid = create_run(self.store, agent, task, run_id=run_id)
        return RunHandle(self, rid)

    def resume(self, run_id: str, *, lease_wait_s: float = 4.0) -> RunHandle:
        """Queue a run for activation from its latest checkpoint.

        If a host holds the run's lease, the run is active and nothing is needed, unless
        that host died: then its lease expires within the lease TTL (3 s), and this waits
        up to ``lease_wait_s`` for that before it gives up (the run is then truly active).
        """
        info = self.store.info(run_id)
        if info.status not in TERMINAL:
            self.ensure_cluster()
            deadline = time.monotonic() + lease_wait_s
            while self.store.requeue(run_id) == "busy" and time.monotonic() < deadline:  # type: ignore[attr-defined]
                time.sleep(0.1)
        return RunHandle(self, run_id)

    def handle(self, run_id: str) -> RunHandle:
        self.store.info(run_id)  # raises RunNotFound
        return RunHandle(self, run_id)

    def cancel(self, run_id: str, reason: str = "cancelled by user") -> None:
        """Cancel a run and, through it, every sub-agent below it."""
        self.send(run_id, Cancel(id=f"cancel:{run_id}", reason=reason))

    def send(self, run_id: str, message: Any) -> str:
        """Store a message in the run's inbox; a passivated run is queued to receive it."""
        return self.store.send(run_id, encode_message(message, run_id))

    # -- approvals --------------------------------------------------------------

    def approvals(self, run_id: str | None = None) -> list[PendingApproval]:
        """Tool calls waiting for someone's decision (of one run, or of every run)."""
        rows = self.store.approvals_pending()  # type: ignore[attr-defined]
        out = []
        for rid, call_id, since in rows:
            if run_id is not None and rid != run_id:
                continue
            try:
                entry = self.state(rid).journal.get(call_id)
            except UndyingError:
                continue
            if entry is not None and entry.status == "awaiting_approval":
                out.append(PendingApproval(rid, call_id, entry.tool, dict(entry.arguments),
                                           args_hash(entry.arguments), since))
        return out

    def approve(self, run_id: str, call_id: str, *, by: str, args_hash: str | None = None) -> None:
        """Approve one waiting tool call. ``args_hash``: the hash of the arguments you
        reviewed (from `approvals`); if they are not the call's, the approval is refused."""
        self._decide(run_id, call_id, True, by, args_hash, "")

    def reject(self, run_id: str, call_id: str, *, by: str, reason: str = "",
               args_hash: str | None = None) -> None:
        """Reject one waiting tool call: the model is told, with the reason."""
        self._decide(run_id, call_id, False, by, args_hash, reason)

    def _decide(self, run_id: str, call_id: str, approved: bool, by: str,
                expected: str | None, reason: str) -> None:
        state = self.state(run_id)
        entry = state.journal.get(call_id)
        if entry is None:
            raise ApprovalError(f"run {run_id!r} has no tool call {call_id!r}")
        if entry.status != "awaiting_approval":
            raise ApprovalError(f"tool call {call_id!r} of run {run_id!r} is not waiting for "
                                f"approval (it is {entry.status})")
        actual = args_hash(entry.arguments)
        if expected is not None and expected != actual:
            raise ApprovalError(
                f"tool call {call_id!r} of run {run_id!r} asks approval for arguments "
                f"{actual}, not {expected}: an approval is for the exact arguments shown")
        attempt = state.pending[call_id].attempt if call_id in state.pending else 0
        self.send(run_id, Approval(id=f"approval:{call_id}:{attempt}", call_id=call_id,
                                   approved=approved, by=by, at_ms=int(time.time() * 1000),
                                   args_hash=actual, reason=reason))

    # -- calls in doubt -----------------------------------------------------------

    def in_doubt(self, run_id: str | None = None) -> list[tuple[str, str, str, dict[str, Any]]]:
        """At-most-once calls that may or may not have happened: (run, call, tool, arguments)."""
        runs = [run_id] if run_id is not None else [i.run_id for i in self.runs("waiting")]
        out = []
        for rid in runs:
            try:
                journal = self.state(rid).journal
            except UndyingError:
                continue
            out += [(rid, cid, e.tool, dict(e.arguments)) for cid, e in journal.items()
                    if e.status == "in_doubt"]
        return out

    def resolve(self, run_id: str, call_id: str, outcome: str, *, by: str, output: str = "",
                reason: str = "") -> None:
        """Settle a call in doubt: "done" (it happened; ``output`` is what the model sees),
        "failed" (it did not, and is not to be tried again), or "retry" (it did not: dispatch
        it again, with the same idempotency key)."""
        if outcome not in ("done", "failed", "retry"):
            raise ApprovalError(f"outcome must be done, failed or retry, not {outcome!r}")
        entry = self.state(run_id).journal.get(call_id)
        if entry is None or entry.status != "in_doubt":
            status = "missing" if entry is None else entry.status
            raise ApprovalError(f"tool call {call_id!r} of run {run_id!r} is not in doubt "
                                f"(it is {status})")
        self.send(run_id, Resolve(id=f"resolve:{call_id}:{entry.attempt}", call_id=call_id,
                                  outcome=outcome, output=output, by=by,  # type: ignore[arg-type]
                                  at_ms=int(time.time() * 1000), reason=reason))

    # -- reading ----------------------------------------------------------------

    def runs(self, status: str | None = None) -> list[RunInfo]:
        return self.store.list_runs(status)

    def info(self, run_id: str) -> RunInfo:
        return self.store.info(run_id)

    def state(self, run_id: str) -> RunState:
        return load_state(self.store, run_id)[0]

    def tree(self, run_id: str) -> list[tuple[int, RunInfo]]:
        """The run and every descendant, depth first: (depth, info)."""
        out: list[tuple[int, RunInfo]] = []

        def walk(rid: str, depth: int) -> None:
            info = self.store.info(rid)
            out.append((depth, info))
            try:
                d = self.state(rid).delegation
            except UndyingError:
                return
            for child in sorted({*d.pending, *d.done}, key=_child_order):
                try:
                    walk(child, depth + 1)
                except RunNotFound:
                    continue

        walk(run_id, 0)
        return out

    def history(self, run_id: str) -> list[StepEvent]:
        self.store.info(run_id)
        out: list[StepEvent] = []
        after = "0-0"
        while True:
            batch = self.store.read_events(run_id, after, 1000)
            out.extend(decode("event", StepEvent, e.data, run_id=run_id) for e in batch)
            if len(batch) < 1000:
                return out
            after = batch[-1].entry_id

    def watch(self, run_id: str, after: str = "0-0", timeout: float | None = None):
        """Yield (entry id, event) as the run commits steps; stop when it ends."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = 1000 if deadline is None else int(max(0.0, deadline - time.monotonic()) * 1000)
            if deadline is not None and remaining <= 0:
                raise RunTimeout(f"run {run_id!r} did not end within {timeout}s")
            batch = self.store.read_events(run_id, after, 100, block_ms=max(1, min(remaining, 1000)))
            for e in batch:
                after = e.entry_id
                ev = decode("event", StepEvent, e.data, run_id=run_id)
                yield e.entry_id, ev
                if ev.status in TERMINAL:
                    return
            if not batch and self.store.info(run_id).status in TERMINAL:
                return

    def wait(self, run_id: str, timeout: float | None = None) -> RunResult:
        if self.store.info(run_id).status not in TERMINAL:
            for _ in self.watch(run_id, timeout=timeout):
                pass
        s = self.state(run_id)
        return RunResult(run_id=run_id, status=s.status, answer=s.result, error=s.error,
                         steps=s.step, tokens=s.usage.tokens + s.delegation.tokens,
                         tool_calls=s.usage.tool_calls)

    def ledger(self, run_id: str) -> dict[str, int]:
        return self.store.ledger(run_id)  # type: ignore[attr-defined, no-any-return]

    # -- Ray ----------------------------------------------------------------------

    def ensure_cluster(self) -> None:
        """Connect to Ray and make sure the pool (and the supervisor, if supervising) exist."""
        if self._pool_ready:
            return
        if self.supervise:
            self.supervisor()
        else:
            from undying.actors.pool import ensure_pool

            init_ray(self.settings)
            ensure_pool(self.redis_url, self.settings.namespace, self.actor_options)
        self._pool_ready = True

    def supervisor(self) -> Any:
        """The cluster's supervisor actor (created on first use, then found by name)."""
        import ray

        from undying.supervisor import get_supervisor

        if self._supervisor is None:
            init_ray(self.settings)
            self._supervisor = get_supervisor(self.redis_url, self.settings.namespace,
                                              self.policy, dict(self.actor_options))
            ray.get(self._supervisor.boot.remote())
        return self._supervisor

    def actor_info(self, run_id: str) -> dict[str, Any] | None:
        """Where the run is active now (host, node, pid, epoch), or None if it holds no process."""
        owner = self.store.lease_owner(run_id)  # type: ignore[attr-defined]
        if owner is None:
            return None
        epoch, host, node, pid = (owner.split("|") + ["", "", "", "0"])[:4]
        return {"epoch": int(epoch or 0), "host": host, "node_id": node, "pid": int(pid or 0)}

    def close(self) -> None:
        close = getattr(self.store, "close", None)
        if close:
            close()


def _child_order(run_id: str) -> tuple[int, int, str]:
    """Children ids are ``<parent>.<step>-<n>``: order them by step, then n."""
    tail = run_id.rsplit(".", 1)[-1]
    step, _, n = tail.partition("-")
    try:
        return int(step), int(n), run_id
    except ValueError:
        return 1 << 30, 0, run_id


class RunHandle:
    def __init__(self, client: Undying, run_id: str) -> None:
        self.client = client
        self.run_id = run_id

    def result(self, timeout: float | None = None) -> RunResult:
        return self.client.wait(self.run_id, timeout)

    def status(self) -> RunInfo:
        return self.client.info(self.run_id)

    def history(self) -> list[StepEvent]:
        return self.client.history(self.run_id)

    def resume(self) -> RunHandle:
        return self.client.resume(self.run_id)

    def cancel(self, reason: str = "cancelled by user") -> None:
        self.client.cancel(self.run_id, reason)

    def __repr__(self) -> str:
        return f"RunHandle({self.run_id!r})"


def connect(settings: Settings | None = None, **kw: Any) -> Undying:
    return Undying(settings, **kw)
