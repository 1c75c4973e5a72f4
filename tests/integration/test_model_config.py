"""`undying demo` and `undying batch` pointed at a provider by configuration alone.

The local `ProviderServer` (both wire formats, answering from the scripted policies)
requires a canary API key. The CLI runs as a user runs it: a subprocess with its
own local Ray (no ``UNDYING_RAY_ADDRESS``), the key only in its environment, the
model named by a TOML file (OpenAI wire format) or by ``UNDYING_*`` variables alone
(Anthropic). Each run must finish, the server must have answered every request of
the lead *and* of its sub-agents (a request without the key is a 401, which fails
the run), every run of the tree must carry the configured spec in its checkpoint,
and after it the canary must be in no Redis key or value.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.test_provider_faults_e2e import scan_redis
from undying import Settings, Undying
from undying._model_config import ENV_VARS
from undying.actors.provider_server import ProviderServer
from undying.persistence import RedisServer

pytestmark = [pytest.mark.timeout(240)]

CANARY = "sk-canary-model-config-5e7c19d3b2"
KEY_ENV = "UD_MODEL_CONFIG_CANARY_KEY"
QUESTION = "How do fencing tokens stop zombie writers, and what is a lease?"  # the demo's first


@pytest.fixture(scope="module")
def mc_redis(tmp_root: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_root / f"redis-mc-{uuid.uuid4().hex[:6]}").start()
    yield server
    server.kill()


@pytest.fixture
def server() -> Iterator[ProviderServer]:
    with ProviderServer(api_key=CANARY) as s:
        yield s


def cli_env(redis: RedisServer, home: Path, **extra: str) -> dict[str, str]:
    """The environment of a user's shell: the key in it, no Ray to join, no model set."""
    env = {k: v for k, v in os.environ.items()
           if k not in ENV_VARS and k not in ("UNDYING_MODEL_CONFIG", "UNDYING_RAY_ADDRESS")}
    return {**env, "UNDYING_REDIS_URL": redis.url, "UNDYING_HOME": str(home),
            "UNDYING_NAMESPACE": f"mc-{uuid.uuid4().hex[:6]}", KEY_ENV: CANARY, **extra}


def run_cli(env: dict[str, str], *argv: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "undying.cli", *argv], env=env,
                          capture_output=True, text=True, timeout=200)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-3000:]}"
    assert CANARY not in proc.stdout + proc.stderr
    return proc


def check_tree(redis: RedisServer, env: dict[str, str], root: str, provider: str,
               base_url: str) -> int:
    """Every run of the tree has the configured spec in its checkpoint; returns sub-agents."""
    ud = Undying(Settings(redis_url=redis.url, namespace=env["UNDYING_NAMESPACE"]))
    try:
        tree = ud.tree(root)
        for depth, info in tree:
            model = ud.state(info.run_id).context.model
            assert info.status == "finished", info
            assert (model.provider, model.base_url) == (provider, base_url), (depth, model)
            assert model.name == ("research-lead" if depth == 0 else "research"), (depth, model)
            assert model.api_key is not None and model.api_key.env == KEY_ENV
    finally:
        ud.close()
    return len(tree) - 1


def check_server(server: ProviderServer, path: str) -> None:
    """The lead and its sub-agents all called the server, with the key (no 401 or other)."""
    records = server.records()
    assert {r.model for r in records} == {"research-lead", "research"}, records
    assert {(r.path, r.status) for r in records} == {(path, "200")}, records


def check_no_canary(redis: RedisServer, marker: str) -> None:
    scanned, found = scan_redis(redis.url, [CANARY, marker])
    assert found[marker], f"the scan of {scanned} keys missed the run's own task text"
    assert found[CANARY] == [], found[CANARY]


def test_demo_runs_on_an_openai_compatible_server_named_in_a_file(
        mc_redis: RedisServer, server: ProviderServer, tmp_path: Path) -> None:
    base_url = server.url + "/v1"
    config = tmp_path / "model.toml"
    config.write_text(f'''
provider = "openai"
base_url = "{base_url}"
model = "research-lead"
api_key_env = "{KEY_ENV}"
timeout_s = 20
max_attempts = 3

[subagents]
model = "research"
''')
    env = cli_env(mc_redis, tmp_path / "home")
    proc = run_cli(env, "demo", "--questions", "1", "--concurrency", "1",
                   "--model-config", str(config))
    assert f"model: openai 'research-lead' at {base_url}, key from ${KEY_ENV}" in proc.stdout
    assert f"sub-agents: openai 'research' at {base_url}, key from ${KEY_ENV}" in proc.stdout
    (results,) = (tmp_path / "home" / "demo").glob("results-*.jsonl")
    (row,) = [json.loads(x) for x in results.read_text().splitlines()]
    assert row["status"] == "finished" and "[06-fencing-tokens]" in row["answer"], row
    assert row["subagents"] >= 1
    check_server(server, "/v1/chat/completions")
    assert check_tree(mc_redis, env, row["run_id"], "openai", base_url) == row["subagents"]
    check_no_canary(mc_redis, QUESTION)


def test_batch_runs_on_an_anthropic_server_named_by_environment_variables(
        mc_redis: RedisServer, server: ProviderServer, tmp_path: Path) -> None:
    questions, out = tmp_path / "questions.jsonl", tmp_path / "results.jsonl"
    questions.write_text(json.dumps({"id": "q1", "question": QUESTION}) + "\n")
    env = cli_env(mc_redis, tmp_path / "home", UNDYING_PROVIDER="anthropic",
                  UNDYING_BASE_URL=server.url, UNDYING_MODEL="research-lead",
                  UNDYING_SUBAGENT_MODEL="research", UNDYING_API_KEY_ENV=KEY_ENV)
    proc = run_cli(env, "batch", str(questions), "--out", str(out), "--concurrency", "1")
    assert f"model: anthropic 'research-lead' at {server.url}, key from ${KEY_ENV}" in proc.stdout
    assert "model configuration: $UNDYING_PROVIDER + $UNDYING_BASE_URL" in proc.stdout
    (row,) = [json.loads(x) for x in out.read_text().splitlines()]
    assert row["status"] == "finished" and row["subagents"] >= 1, row
    check_server(server, "/v1/messages")
    assert check_tree(mc_redis, env, row["run_id"], "anthropic", server.url) == row["subagents"]
    check_no_canary(mc_redis, QUESTION)
