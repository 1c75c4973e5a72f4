"""`undying batch`: bad lines skipped with their numbers; the driver killed (SIGKILL or
Ctrl-C) and re-run continues the same batch, every question answered exactly once; a
batch's identity is its files' absolute paths and each line's content; a torn results
line is repaired; the progress line counts roots and sub-agents of this batch."""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.integration._faults import ledger_of, teardown
from undying import Settings, Undying
from undying._batch import batch_id_for, parse_questions, run_batch
from undying.actors.research import agent as research_agent
from undying.actors.research import slow_lead
from undying.persistence import RedisServer

pytestmark = pytest.mark.ray

QUESTIONS = [
    "What is a fencing token?",
    "What does appendfsync always guarantee?",
    "What is full jitter?",
    "What is a transactional outbox?",
    "How does a token bucket limit requests?",
]


def test_batch_killed_and_rerun(ray_local: None, private_redis: RedisServer, tmp_path: Path) -> None:
    import ray

    qfile = tmp_path / "questions.jsonl"
    lines = [json.dumps({"id": f"q{i}", "question": q}) for i, q in enumerate(QUESTIONS)]
    lines.insert(2, "{not json")
    lines.insert(4, json.dumps({"id": "nothing"}))
    qfile.write_text("\n".join(lines) + "\n")
    out = tmp_path / "results.jsonl"
    ns = f"batch-{uuid.uuid4().hex[:6]}"
    env = {**os.environ, "UNDYING_REDIS_URL": private_redis.url, "UNDYING_NAMESPACE": ns,
           "UNDYING_RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    cmd = [sys.executable, "-m", "undying.cli", "batch", str(qfile), "--out", str(out),
           "--concurrency", "2", "--latency", "0.3"]

    first = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (out.exists() and out.read_text().count("\n") >= 1):
        assert first.poll() is None, first.stderr.read().decode() if first.stderr else ""
        assert time.monotonic() < deadline, "the first invocation wrote no result"
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)  # the driver crashes mid-batch
    first.wait()
    done_first = {json.loads(x)["run_id"] for x in out.read_text().splitlines()}
    probe = Undying(Settings(redis_url=private_redis.url, namespace=ns))
    history_first = {rid: len(probe.history(rid)) for rid in done_first}

    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert second.returncode == 0, second.stderr
    assert "questions.jsonl:3: skipped: invalid JSON" in second.stderr
    assert "questions.jsonl:5: skipped: missing field 'question'" in second.stderr

    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert sorted(r["id"] for r in rows) == sorted(f"q{i}" for i in range(len(QUESTIONS)))
    assert len({r["run_id"] for r in rows}) == len(rows), "every question answered exactly once"
    assert all(r["status"] == "finished" and r["answer"] for r in rows)

    ud = Undying(Settings(redis_url=private_redis.url, namespace=ns))
    teardown(ud)  # the CLI left the cluster's supervisor and pool running, as it should
    for r in rows:
        assert all(v == 1 for v in ledger_of(ud, r["run_id"]).values()), "a tool ran twice"
        if r["run_id"] in done_first:
            assert len(ud.history(r["run_id"])) == history_first[r["run_id"]], \
                "a finished run was executed again"


def _client(server: RedisServer) -> Undying:
    return Undying(Settings(redis_url=server.url, namespace=f"batch-{uuid.uuid4().hex[:6]}"))


def _write_questions(path: Path, questions: list[str]) -> None:
    path.write_text("".join(json.dumps({"id": f"q{i}", "question": q}) + "\n"
                            for i, q in enumerate(questions)))


def _rows(out: Path) -> list[dict]:
    return sorted((json.loads(x) for x in out.read_text().splitlines()), key=lambda r: r["line"])


def test_batch_identity_paths_and_content(ray_local: None, private_redis: RedisServer,
                                          tmp_path: Path) -> None:
    """Same file names in two folders are two batches; an edited line alone runs again; a
    line whose run id names a run of another task is refused, by line number."""
    ud = _client(private_redis)
    try:
        a, b = tmp_path / "a", tmp_path / "b"
        for d, qs in ((a, QUESTIONS[:3]), (b, QUESTIONS[2:])):
            d.mkdir()
            _write_questions(d / "questions.jsonl", qs)
            report = run_batch(ud, research_agent, d / "questions.jsonl", d / "results.jsonl",
                               concurrency=3, progress=None)
            assert report.finished == len(qs) and report.failed == 0
        rows_a, rows_b = _rows(a / "results.jsonl"), _rows(b / "results.jsonl")
        assert not {r["run_id"] for r in rows_a} & {r["run_id"] for r in rows_b}
        for rows, qs in ((rows_a, QUESTIONS[:3]), (rows_b, QUESTIONS[2:])):
            assert [ud.state(r["run_id"]).task for r in rows] == qs, "another batch's answers"
            assert all(r["status"] == "finished" and r["answer"] for r in rows)

        # edit line 2 of a: only that line runs again, its old result leaves the file
        history = {r["run_id"]: len(ud.history(r["run_id"])) for r in rows_a}
        edited = [QUESTIONS[0], "What is a lease, and how long should it last?", QUESTIONS[2]]
        _write_questions(a / "questions.jsonl", edited)
        err = io.StringIO()
        report = run_batch(ud, research_agent, a / "questions.jsonl", a / "results.jsonl",
                           concurrency=3, progress=err)
        assert (report.started, report.resumed, report.already_done) == (1, 0, 2)
        again = _rows(a / "results.jsonl")
        assert [r["line"] for r in again] == [1, 2, 3]
        assert [ud.state(r["run_id"]).task for r in again] == edited
        assert again[1]["run_id"] != rows_a[1]["run_id"] and again[1]["status"] == "finished"
        for old, new in ((rows_a[0], again[0]), (rows_a[2], again[2])):
            assert old == new
            assert len(ud.history(new["run_id"])) == history[new["run_id"]], "ran again"
        assert f"dropped 1 result(s) of lines edited or removed since they ran: " \
               f"{rows_a[1]['run_id']}" in err.getvalue()

        # a run already holding line 4's id, made for another task: refused, named
        _write_questions(a / "questions.jsonl", [*edited, QUESTIONS[3]])
        bid = batch_id_for(a / "questions.jsonl", a / "results.jsonl")
        line4 = parse_questions((a / "questions.jsonl").read_text(), bid)[0][3]
        ud.start(research_agent, "something else entirely", run_id=line4.run_id)
        err = io.StringIO()
        report = run_batch(ud, research_agent, a / "questions.jsonl", a / "results.jsonl",
                           concurrency=3, progress=err)
        assert [n for n, _ in report.conflicts] == [4] and report.failed == 1
        assert f"questions.jsonl:4: run {line4.run_id} already exists for another task" \
            in err.getvalue()
        assert [r["line"] for r in _rows(a / "results.jsonl")] == [1, 2, 3]
    finally:
        teardown(ud)


def test_batch_repairs_a_torn_results_line(ray_local: None, private_redis: RedisServer,
                                           tmp_path: Path) -> None:
    """A driver killed mid-write leaves half a line: the next invocation cuts it off and
    writes that result again, without running anything again."""
    ud = _client(private_redis)
    try:
        qfile, out = tmp_path / "questions.jsonl", tmp_path / "results.jsonl"
        _write_questions(qfile, QUESTIONS[:3])
        run_batch(ud, research_agent, qfile, out, concurrency=3, progress=None)
        lines = out.read_text().splitlines(keepends=True)
        torn = json.loads(lines[-1])
        out.write_text("".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])
        history = {json.loads(x)["run_id"]: len(ud.history(json.loads(x)["run_id"]))
                   for x in lines}

        err = io.StringIO()
        report = run_batch(ud, research_agent, qfile, out, concurrency=3, progress=err)
        assert "its last line was cut short" in err.getvalue()
        assert (report.already_done, report.started, report.finished) == (2, 0, 1)
        text = out.read_text()
        assert text.endswith("\n")
        rows = [json.loads(x) for x in text.splitlines()]  # every line whole JSON
        assert sorted(r["line"] for r in rows) == [1, 2, 3]
        assert [r for r in rows if r["run_id"] == torn["run_id"]][0]["answer"] == torn["answer"]
        assert {rid: len(ud.history(rid)) for rid in history} == history, "a run ran again"
    finally:
        teardown(ud)


PROGRESS = re.compile(r"(\d+)/(\d+) done  (\d+) running  (\d+) waiting  (\d+) failed  "
                      r"(\d+) sub-agents in flight  (\d+) steps/s")


def test_batch_progress_line(ray_local: None, private_redis: RedisServer, tmp_path: Path) -> None:
    """The live line shows done, running, waiting and failed roots, this batch's sub-agents
    in flight and steps/s; a run of another batch in the namespace is not counted."""
    ud = _client(private_redis)
    try:
        other = ud.start(slow_lead(0.5), QUESTIONS[4], run_id="elsewhere-1")  # in flight throughout
        qfile, out = tmp_path / "questions.jsonl", tmp_path / "results.jsonl"
        _write_questions(qfile, QUESTIONS[:3])
        shown = io.StringIO()
        report = run_batch(ud, slow_lead(0.2), qfile, out, concurrency=3, progress=shown)
        ticks = [tuple(map(int, m.groups())) for m in PROGRESS.finditer(shown.getvalue())]
        assert len(ticks) >= 3 and len(re.findall(r"\r", shown.getvalue())) == len(ticks)
        assert any(t[5] > 0 for t in ticks), "no sub-agent ever shown in flight"
        assert any(t[2] + t[3] > 0 for t in ticks), "no root ever shown running or waiting"
        assert any(t[6] > 0 for t in ticks), "no steps/s"
        assert all(t[1] == 3 and t[2] + t[3] <= 3 for t in ticks)
        spawned = sum(r["subagents"] for r in _rows(out))
        assert max(t[5] for t in ticks) == report.subagents_peak <= spawned, "counted another's"
        assert ticks[-1][:6] == (3, 3, 0, 0, 0, 0)
        assert shown.getvalue().endswith("\n")
        assert report.subagents_peak >= 2
        other.result(timeout=120)
    finally:
        teardown(ud)


def test_batch_ctrl_c(ray_local: None, private_redis: RedisServer, tmp_path: Path) -> None:
    """SIGINT to the driver: exit code 130, the exact command that continues the batch
    (absolute paths, same options), no process of the driver's left; that command finishes
    every question exactly once, from another folder."""
    import psutil
    import ray

    _write_questions(tmp_path / "questions.jsonl", QUESTIONS)
    out = tmp_path / "results.jsonl"
    ns = f"batch-{uuid.uuid4().hex[:6]}"
    env = {**os.environ, "UNDYING_REDIS_URL": private_redis.url, "UNDYING_NAMESPACE": ns,
           "UNDYING_RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    args = ["batch", "questions.jsonl", "--out", "results.jsonl", "--concurrency", "2",
            "--latency", "0.3"]
    first = subprocess.Popen([sys.executable, "-m", "undying.cli", *args], env=env, cwd=tmp_path,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out.exists() and out.read_text().count("\n") >= 1):
        assert first.poll() is None, first.stderr.read() if first.stderr else ""
        assert time.monotonic() < deadline, "the first invocation wrote no result"
        time.sleep(0.05)
    driver = psutil.Process(first.pid)
    own = driver.children(recursive=True)
    first.send_signal(signal.SIGINT)
    _, stderr = first.communicate(timeout=60)
    assert first.returncode == 130, stderr
    assert "Traceback" not in stderr
    said = stderr.splitlines()
    command = said[said.index(next(x for x in said if x.endswith("Continue it with:"))) + 1]
    assert shlex.split(command) == ["undying", "batch", str(tmp_path / "questions.jsonl"), "--out",
                                    str(out), "--concurrency", "2", "--latency", "0.3"]
    _, alive = psutil.wait_procs(own, timeout=15)
    assert not alive, f"the driver left {alive}"
    done_first = {json.loads(x)["run_id"] for x in out.read_text().splitlines()}
    assert 1 <= len(done_first) < len(QUESTIONS)

    rerun = [sys.executable, "-m", "undying.cli", *shlex.split(command)[1:]]
    second = subprocess.run(rerun, env=env, cwd="/", capture_output=True, text=True, timeout=180)
    assert second.returncode == 0, second.stderr
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert sorted(r["id"] for r in rows) == sorted(f"q{i}" for i in range(len(QUESTIONS)))
    assert len({r["run_id"] for r in rows}) == len(rows), "every question answered exactly once"
    assert all(r["status"] == "finished" and r["answer"] for r in rows)
    assert PROGRESS.search(second.stderr), second.stderr

    ud = Undying(Settings(redis_url=private_redis.url, namespace=ns))
    teardown(ud)
    for r in rows:
        assert all(v == 1 for v in ledger_of(ud, r["run_id"]).values()), "a tool ran twice"
