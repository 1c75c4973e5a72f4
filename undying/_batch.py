"""Batch jobs: one root run per line of a JSONL file, resumable by running the same command again.

Run ids derive from the batch id and the line number, so a second invocation
finds the runs the first one started: finished ones are not re-run (their
results are written if they are missing from the output), unfinished ones are
resumed from their checkpoints (or simply left to the supervisor, which is
already bringing them back).
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
    items: int = 0
    bad_lines: list[tuple[int, str]] = field(default_factory=list)
    finished: int = 0
    failed: int = 0
    already_done: int = 0
    started: int = 0
    resumed: int = 0


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
              progress: TextIO | None = sys.stderr, poll_s: float = 0.2,
              on_tick: Callable[[BatchReport], None] | None = None) -> BatchReport:
    batch_id = batch_id_for(questions, out)
    items, bad = parse_questions(questions.read_text(), batch_id)
    report = BatchReport(items=len(items), bad_lines=bad)
    for n, why in bad:
        print(f"{questions.name}:{n}: skipped: {why}", file=progress or sys.stderr)
    written = _written(out)
    todo = [it for it in items if it.run_id not in written]
    report.already_done = len(items) - len(todo)
    in_flight: dict[str, tuple[BatchItem, float]] = {}
    t0 = time.monotonic()
    steps_at_start = None
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
            steps = ud.store.counters().get("steps_total", 0)
            steps_at_start = steps if steps_at_start is None else steps_at_start
            if progress is not None:
                rate = (steps - steps_at_start) / max(1e-6, time.monotonic() - t0)
                done = report.finished + report.failed + report.already_done
                print(f"\r{done}/{report.items} done  {len(in_flight)} running  "
                      f"{report.failed} failed  {rate:.0f} steps/s", end="", file=progress)
            if on_tick is not None:
                on_tick(report)
            if in_flight:
                time.sleep(poll_s)
    if progress is not None:
        print(file=progress)
    return report


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
    except RunNotFound:
        return
    row = {"run_id": it.run_id, "line": it.line, "id": it.key, "status": res.status,
           "answer": res.answer, "error": res.error, "steps": res.steps, "tokens": res.tokens,
           "duration_s": round(duration_s, 3), "restarts": restarts}
    sink.write(json.dumps(row) + "\n")
    sink.flush()
