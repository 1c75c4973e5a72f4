"""Batch jobs: one root run per line of a JSONL file, resumable by running the same command again.

Identity. The batch id is a hash of the absolute paths of the question file and
the results file, so two batches never share runs because their files have the
same names. A line's run id is the batch id, the line number and a hash of the
line's JSON: a second invocation finds the runs the first one started, and a
line edited in between gets a run of its own while the others continue.
Finished runs are not run again (their results are written if the results file
lacks them); unfinished ones are resumed from their checkpoints (or left to the
supervisor, which is already bringing them back). Sub-agents' ids derive from
their roots' ids, so the whole batch is every run whose id starts with the
batch id.

The results file is only appended to, one whole line per write, fsynced. A
driver killed in the middle of a write can leave a cut-short last line: the
next invocation cuts it off and writes that result again. Results of lines
since edited or removed are dropped from the file, so it holds one line per
question of the current file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from undying.actors import Agent
from undying.persistence import TERMINAL, RunExists, RunNotFound, UndyingError

CENSUS_EVERY_S = 1.0  # sub-agents in flight: a scan of the run index, not every tick


@dataclass(frozen=True)
class BatchItem:
    line: int
    run_id: str
    task: str
    key: str | None = None


@dataclass
class BatchReport:
    batch_id: str = ""
    items: int = 0
    bad_lines: list[tuple[int, str]] = field(default_factory=list)
    conflicts: list[tuple[int, str]] = field(default_factory=list)
    finished: int = 0
    failed: int = 0  # runs that ended failed, cancelled or quarantined, and conflicting lines
    already_done: int = 0
    started: int = 0
    resumed: int = 0
    running: int = 0  # roots active on a host right now
    waiting: int = 0  # roots in flight, passivated (waiting for calls or sub-agents) or queued
    subagents_in_flight: int = 0
    subagents_peak: int = 0
    steps_per_s: float = 0.0
    seconds: float = 0.0

    def line(self) -> str:
        done = self.finished + self.failed + self.already_done
        return (f"{done}/{self.items} done  {self.running} running  {self.waiting} waiting  "
                f"{self.failed} failed  {self.subagents_in_flight} sub-agents in flight  "
                f"{self.steps_per_s:.0f} steps/s")


class BatchConflict(UndyingError):
    """A line's run id names a run made for another task (a hash collision, or a run id
    reused by hand): its result would be someone else's answer."""

    def __init__(self, where: str, run_id: str, stored: str, task: str) -> None:
        super().__init__(f"{where}: run {run_id} already exists for another task "
                         f"({stored[:60]!r}, not {task[:60]!r}); the line is skipped. "
                         f"Move or rename the results file to start a new batch.")
        self.run_id = run_id


def batch_id_for(questions: Path, out: Path) -> str:
    paths = f"{questions.resolve()}\0{out.resolve()}"
    return f"b{hashlib.sha1(paths.encode()).hexdigest()[:10]}"


def line_digest(obj: Any) -> str:
    """A short hash of a line's JSON value, independent of key order and spacing."""
    canonical = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha1(canonical.encode()).hexdigest()[:8]


def parse_questions(text: str, batch_id: str) -> tuple[list[BatchItem], list[tuple[int, str]]]:
    items: list[BatchItem] = []
    bad: list[tuple[int, str]] = []
    for n, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as exc:
            bad.append((n, f"invalid JSON: {exc.msg} at column {exc.colno}"))
            continue
        if not isinstance(obj, dict):
            bad.append((n, "each line must be a JSON object"))
            continue
        task = obj.get("question", obj.get("task"))
        if not isinstance(task, str) or not task.strip():
            bad.append((n, "missing field 'question' (a non-empty string)"))
            continue
        key = obj.get("id")
        items.append(BatchItem(line=n, run_id=f"{batch_id}-{n:05d}-{line_digest(obj)}", task=task,
                               key=str(key) if key is not None else None))
    return items, bad


def prepare_results(out: Path, batch_id: str, current: set[str]) -> tuple[set[str], list[str]]:
    """Repair the results file before appending to it: the run ids of this batch it already
    holds, and notes on what was changed.

    A last line without its newline is a write the driver did not finish: cut off (or, if
    it is whole JSON, given its newline). Lines of this batch whose run is no longer one of
    ``current`` (their question was edited or removed) are dropped by an atomic rewrite;
    lines of other batches, and lines that are not ours to judge, are kept as they are."""
    notes: list[str] = []
    if not out.exists():
        return set(), notes
    data = out.read_bytes()
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        if _row_id(data[cut:]) is None:
            os.truncate(out, cut)
            data = data[:cut]
            notes.append(f"{out.name}: its last line was cut short (the batch was stopped while "
                         f"writing it); removed, that result is written again")
        else:
            _append(out, b"\n")
            data += b"\n"
    kept: list[bytes] = []
    written: set[str] = set()
    stale: list[str] = []
    for raw in data.splitlines(keepends=True):
        rid = _row_id(raw)
        if rid is not None and rid.startswith(f"{batch_id}-") and rid not in current:
            stale.append(rid)
            continue
        if rid is not None:
            written.add(rid)
        kept.append(raw)
    if stale:
        tmp = out.with_name(f".{out.name}.tmp")
        with tmp.open("wb") as f:
            f.write(b"".join(kept))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
        notes.append(f"{out.name}: dropped {len(stale)} result(s) of lines edited or removed "
                     f"since they ran: {', '.join(sorted(stale))}")
    return written & current, notes


def _row_id(raw: bytes) -> str | None:
    try:
        rid = json.loads(raw)["run_id"]
    except (ValueError, KeyError, TypeError):
        return None
    return rid if isinstance(rid, str) else None


def _append(out: Path, data: bytes) -> None:
    """One result line: appended by one write, then fsynced (a crash leaves the line whole,
    or cut short at the end of the file, where `prepare_results` finds it)."""
    fd = os.open(out, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def continue_command(questions: Path, out: Path, argv: Sequence[str] | None = None) -> str:
    """The command that continues this batch: ``argv`` (the `undying` command's arguments;
    by default this process's own when it is `undying batch`) with the batch's two paths,
    and option values naming files (a model configuration), made absolute: the batch's
    identity is its files' absolute paths, and the command may be run from elsewhere."""
    if argv is None:
        argv = sys.argv[1:] if sys.argv[1:2] == ["batch"] else [
            "batch", str(questions), "--out", str(out)]
    q, o = str(questions), str(out)
    words: list[str] = []
    for w in argv:
        option, eq, value = w.partition("=") if w.startswith("--") else ("", "", w)
        after_option = bool(words) and words[-1].startswith("--")
        if value == q:
            value = str(questions.resolve())
        elif value == o:
            value = str(out.resolve())
        elif (eq or after_option) and Path(value).is_file():
            value = str(Path(value).resolve())
        words.append(f"{option}{eq}{value}")
    return shlex.join(["undying", *words])


def run_batch(ud: Any, agent: Agent, questions: Path, out: Path, *, concurrency: int = 8,
              progress: TextIO | None = sys.stderr, poll_s: float = 0.25,
              on_tick: Callable[[BatchReport], None] | None = None,
              argv: Sequence[str] | None = None) -> BatchReport:
    """Run every question not answered yet in ``out``; on Ctrl-C print the command that
    continues the batch (see `continue_command`) and let KeyboardInterrupt through."""
    batch_id = batch_id_for(questions, out)
    items, bad = parse_questions(questions.read_text(), batch_id)
    report = BatchReport(batch_id=batch_id, items=len(items), bad_lines=bad)
    say = progress or sys.stderr
    for n, why in bad:
        print(f"{questions.name}:{n}: skipped: {why}", file=say)
    written, notes = prepare_results(out, batch_id, {it.run_id for it in items})
    for note in notes:
        print(note, file=say)
    todo = [it for it in items if it.run_id not in written]
    report.already_done = len(items) - len(todo)
    try:
        _loop(ud, agent, questions, out, todo, report, concurrency, progress, poll_s, on_tick)
    except KeyboardInterrupt:
        done = report.finished + report.failed + report.already_done
        print(f"\nundying: batch stopped at {done}/{report.items} done; runs in flight keep "
              f"their checkpoints. Continue it with:\n  {continue_command(questions, out, argv)}",
              file=sys.stderr, flush=True)
        raise
    return report


def _loop(ud: Any, agent: Agent, questions: Path, out: Path, todo: list[BatchItem],
          report: BatchReport, concurrency: int, progress: TextIO | None, poll_s: float,
          on_tick: Callable[[BatchReport], None] | None) -> None:
    in_flight: dict[str, tuple[BatchItem, float]] = {}
    t0 = time.monotonic()
    steps0 = ud.store.counters().get("steps_total", 0)
    census_at = 0.0
    while todo or in_flight:
        while todo and len(in_flight) < concurrency:
            it = todo.pop(0)
            try:
                _launch(ud, agent, it, report, f"{questions.name}:{it.line}")
            except BatchConflict as exc:
                report.conflicts.append((it.line, str(exc)))
                report.failed += 1
                print(f"undying: error: {exc}", file=progress or sys.stderr)
                continue
            in_flight[it.run_id] = (it, time.monotonic())
        # roots: only this batch's in flight, one read each
        running = waiting = 0
        for rid in list(in_flight):
            status = ud.info(rid).status
            if status in TERMINAL:
                it, started = in_flight.pop(rid)
                _write(ud, out, it, time.monotonic() - started)
                if status == "finished":
                    report.finished += 1
                else:
                    report.failed += 1
            elif status == "running":
                running += 1
            else:
                waiting += 1
        report.running, report.waiting = running, waiting
        now = time.monotonic()
        if now - census_at >= CENSUS_EVERY_S or not in_flight:
            _count_subagents(ud, report)
            census_at = now
        report.seconds = now - t0
        steps = ud.store.counters().get("steps_total", 0) - steps0
        report.steps_per_s = steps / max(1e-6, report.seconds)
        if progress is not None:
            print(f"\r{report.line()}   ", end="", file=progress, flush=True)
        if on_tick is not None:
            on_tick(report)
        if in_flight:
            time.sleep(poll_s)
    if progress is not None:
        print(file=progress)


def _count_subagents(ud: Any, report: BatchReport) -> None:
    census = getattr(ud.store, "census", None)
    if census is None:
        return
    c = census(report.batch_id, statuses=("pending", "running", "waiting"))
    report.subagents_in_flight = sum(c[s][1] for s in ("pending", "running", "waiting"))
    report.subagents_peak = max(report.subagents_peak, report.subagents_in_flight)


def _launch(ud: Any, agent: Agent, it: BatchItem, report: BatchReport, where: str) -> None:
    try:
        ud.start(agent, it.task, run_id=it.run_id)
        report.started += 1
        return
    except RunExists:
        pass
    # started by an earlier invocation: finished ones are only written, the rest resumed
    stored = _stored_task(ud, it.run_id)
    if stored is not None and stored != it.task:
        raise BatchConflict(where, it.run_id, stored, it.task)
    if ud.info(it.run_id).status not in TERMINAL:
        ud.resume(it.run_id)
        report.resumed += 1


def _stored_task(ud: Any, run_id: str) -> str | None:
    """The task a run was made for: its state's, or, before its first step, its first
    message's. None if neither can be read."""
    from undying.actors._state import Envelope, Start
    from undying.persistence import decode

    try:
        task = ud.state(run_id).task
        if task:
            return str(task)
        first = ud.store.read_inbox(run_id, "0-0", 1)
        if first:
            msg = decode("message", Envelope, first[0].data, run_id=run_id).message
            if isinstance(msg, Start):
                return msg.task
    except UndyingError:
        pass
    return None


def _write(ud: Any, out: Path, it: BatchItem, duration_s: float) -> None:
    try:
        res = ud.wait(it.run_id, timeout=5)
        restarts = sum(1 for e in ud.history(it.run_id) if e.kind == "restart")
        subagents = len(ud.state(it.run_id).delegation.done)
    except RunNotFound:
        return
    row = {"run_id": it.run_id, "line": it.line, "id": it.key, "status": res.status,
           "answer": res.answer, "error": res.error, "steps": res.steps, "tokens": res.tokens,
           "subagents": subagents, "duration_s": round(duration_s, 3), "restarts": restarts}
    _append(out, (json.dumps(row) + "\n").encode())
