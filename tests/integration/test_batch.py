"""`undying batch`: bad lines skipped with their numbers; the driver killed and re-run
continues the same batch, every question answered exactly once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.integration._faults import ledger_of, teardown
from undying import Settings, Undying
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
