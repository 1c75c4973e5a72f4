"""Batch jobs: one root run per line of a JSONL file, resumable by running the same command again.

Run ids derive from the batch id and the line number, so a second invocation
finds the runs the first one started: finished ones are not re-run (their
results are written if they are missing from the output), unfinished ones are
resumed from their checkpoints (or simply left to the supervisor, which is
already bringing them back). Sub-agents' ids derive from their roots' ids, so
the whole batch is every run whose id starts with the batch id.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from undying.actors import Agent
from undying.persistence import TERMINAL, RunExists, RunNotFound


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
    finished: int = 0
    failed: int = 0
    already_done: int = 0
    started: int = 0
    resumed: int = 0
    running: int = 0  # roots active on a host right now
    waiting: int = 0  # roots in flight, passivated (waiting for calls or sub-agents)
    subagents_in_flight: int = 0
    subagents_peak: int = 0
    steps_per_s: float = 0.0
    seconds: float = 0.0

    def line(self) -> str:
        done = self.finished + self.failed + self.already_done
        return (f"{done}/{self.items} done  {self.running} running  {self.waiting} waiting  "
                f"{self.failed} failed  {self.subagents_in_flight} sub-agents in flight  "
                f"{self.steps_per_s:.0f} steps/s")


def batch_id_for(questions: Path, out: Path) -> str:
    digest = hashlib.sha1(f"{questions.name}|{out.name}".encode()).hexdigest()
    return f"b{digest[:8]}"


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
        items.append(BatchItem(line=n, run_id=f"{batch_id}-{n:05d}", task=task,
                               key=str(key) if key is not None else None))
    return items, bad


def _written(out: Path) -> set[str]:
    done: set[str] = set()
    if out.exists():
        for raw in out.read_text().splitlines():
            try:
                done.add(json.loads(raw)["run_id"])
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
    return done


def run_batch(ud: Any, agent: Agent, questions: Path, out: Path, *, concurrency: int = 8,
              progress: TextIO | None = sys.stderr, poll_s: float = 0.25,
              on_tick: Callable[[BatchReport], None] | None = None) -> BatchReport:
    batch_id = batch_id_for(questions, out)
    items, bad = parse_questions(questions.read_text(), batch_id)
    report = BatchReport(batch_id=batch_id, items=len(items), bad_lines=bad)
    for n, why in bad:
        print(f"{questions.name}:{n}: skipped: {why}", file=progress or sys.stderr)
    written = _written(out)
    todo = [it for it in items if it.run_id not in written]
    report.already_done = len(items) - len(todo)
    in_flight: dict[str, tuple[BatchItem, float]] = {}
    t0 = time.monotonic()
    steps0 = ud.store.counters().get("steps_total", 0)
    with out.open("a") as sink:
        while todo or in_flight:
            while todo and len(in_flight) < concurrency:
                it = todo.pop(0)
                _launch(ud, agent, it, report)
                in_flight[it.run_id] = (it, time.monotonic())
            for rid in list(in_flight):
                info = ud.info(rid)
                if info.status in TERMINAL:
                    it, started = in_flight.pop(rid)
                    _write(ud, sink, it, time.monotonic() - started)
                    if info.status == "finished":
                        report.finished += 1
                    else:
                        report.failed += 1
            _census(ud, report, batch_id, steps0, t0)
            if progress is not None:
                print(f"\r{report.line()}   ", end="", file=progress, flush=True)
            if on_tick is not None:
                on_tick(report)
            if in_flight:
                time.sleep(poll_s)
    _census(ud, report, batch_id, steps0, t0)
    if progress is not None:
        print(f"\r{report.line()}   ", file=progress)
    return report


def _census(ud: Any, report: BatchReport, batch_id: str, steps0: int, t0: float) -> None:
    census = getattr(ud.store, "census", None)
    if census is not None:
        c = census(batch_id)
        report.running = c["running"][0]
        report.waiting = c["waiting"][0] + c["pending"][0]
        report.subagents_in_flight = sum(c[s][1] for s in ("pending", "running", "waiting"))
        report.subagents_peak = max(report.subagents_peak, report.subagents_in_flight)
    report.seconds = time.monotonic() - t0
    steps = ud.store.counters().get("steps_total", 0) - steps0
    report.steps_per_s = steps / max(1e-6, report.seconds)


def _launch(ud: Any, agent: Agent, it: BatchItem, report: BatchReport) -> None:
    try:
        ud.start(agent, it.task, run_id=it.run_id)
        report.started += 1
    except RunExists:
        # started by an earlier invocation: finished ones are only written, the rest resumed
        if ud.info(it.run_id).status not in TERMINAL:
            ud.resume(it.run_id)
            report.resumed += 1


def _write(ud: Any, sink: TextIO, it: BatchItem, duration_s: float) -> None:
    try:
        res = ud.wait(it.run_id, timeout=5)
        restarts = sum(1 for e in ud.history(it.run_id) if e.kind == "restart")
        subagents = len(ud.state(it.run_id).delegation.done)
    except RunNotFound:
        return
    row = {"run_id": it.run_id, "line": it.line, "id": it.key, "status": res.status,
           "answer": res.answer, "error": res.error, "steps": res.steps, "tokens": res.tokens,
           "subagents": subagents, "duration_s": round(duration_s, 3), "restarts": restarts}
    sink.write(json.dumps(row) + "\n")
    sink.flush()
