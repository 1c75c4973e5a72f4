"""The public API is pinned: a change to it is a deliberate edit of this file."""

from __future__ import annotations

import importlib
import pkgutil
import re
from pathlib import Path

import pytest

PUBLIC = {
    "undying": [
        "Agent",
        "Budgets",
        "CorruptCheckpoint",
        "Fenced",
        "ModelSpec",
        "Quarantined",
        "RunHandle",
        "RunNotFound",
        "RunResult",
        "RunTimeout",
        "SecretRef",
        "Settings",
        "StoreUnavailable",
        "Tool",
        "ToolContext",
        "Undying",
        "UndyingError",
        "__version__",
        "connect",
        "tool",
    ],
    "undying.actors": [
        "Agent",
        "AgentNotFound",
        "Budgets",
        "Cancel",
        "ChatMessage",
        "ChildResult",
        "JournalEntry",
        "MalformedOutput",
        "Model",
        "ModelReply",
        "ModelRequest",
        "ModelResponse",
        "ModelSpec",
        "ProviderError",
        "RunEngine",
        "RunState",
        "ScriptedModel",
        "SecretRef",
        "Start",
        "StepEvent",
        "Tool",
        "ToolArgumentsError",
        "ToolCallRequest",
        "ToolContext",
        "ToolResult",
        "build_model",
        "create_run",
        "decide",
        "encode_message",
        "load_agent",
        "load_state",
        "new_run_id",
        "read",
        "recover",
        "register_provider",
        "search",
        "tool",
    ],
    "undying.persistence": [
        "CheckpointStore",
        "Commit",
        "CommitResult",
        "CorruptCheckpoint",
        "EventEntry",
        "Fenced",
        "InboxEntry",
        "Loaded",
        "MAX_RECORD_BYTES",
        "MemoryStore",
        "NeedsUpgrade",
        "Quarantined",
        "RecordTooLarge",
        "RecordUnencodable",
        "RedisServer",
        "RedisStore",
        "RunExists",
        "RunInfo",
        "RunNotFound",
        "SCHEMA_VERSION",
        "STATUSES",
        "StepConflict",
        "StoreUnavailable",
        "TERMINAL",
        "UndyingError",
        "apply_delta",
        "decode",
        "diff_states",
        "encode",
        "ensure_embedded",
        "find_redis_server",
        "free_port",
        "pack",
        "plain",
        "unpack",
        "validate",
    ],
    "undying.supervisor": ["Policy", "SupervisorView", "get_supervisor", "handle"],
    "undying.cluster": ["Settings", "connect_store", "init_ray", "redis_url"],
    "undying.testing": [
        "CrashAfter",
        "FakeClock",
        "HttpSink",
        "MemoryStore",
        "POLICIES",
        "RecordingStore",
        "ScriptedModel",
        "SimulatedCrash",
        "echo_agent",
        "fanout_agent",
        "policy",
        "resume_inline",
        "run_inline",
        "sink_agent",
        "sink_answer",
        "sink_task",
    ],
}

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("module", sorted(PUBLIC))
def test_all_is_pinned(module: str) -> None:
    mod = importlib.import_module(module)
    assert sorted(mod.__all__) == PUBLIC[module]
    for name in mod.__all__:
        assert hasattr(mod, name), f"{module}.{name} is exported but missing"


def test_one_namespace_only() -> None:
    # never install a top-level package named supervisor or persistence
    assert importlib.util.find_spec("undying.supervisor") is not None
    for name in ("actors", "persistence", "supervisor", "cluster", "dashboards"):
        spec = importlib.util.find_spec(name)
        assert spec is None or "undying" not in str(spec.origin or ""), name


def test_no_pickle_anywhere() -> None:
    pattern = re.compile(r"^\s*(import|from)\s+(c?pickle|dill|cloudpickle)\b", re.M)
    for folder in ("actors", "persistence", "supervisor", "cluster", "undying"):
        for path in (ROOT / folder).rglob("*.py"):
            assert not pattern.search(path.read_text()), f"{path} imports pickle"


def test_no_local_paths_in_sources() -> None:
    for folder in ("actors", "persistence", "supervisor", "cluster", "undying", "bench", "docs"):
        for path in (ROOT / folder).rglob("*"):
            if path.is_file() and path.suffix in (".py", ".md", ".yaml", ".yml", ".conf", ".txt"):
                text = path.read_text(errors="replace")
                for bad in ("/root/", "/home/", "/work/"):
                    assert bad not in text, f"{path} mentions {bad}"


def test_modules_import() -> None:
    import undying as pkg

    for info in pkgutil.walk_packages(pkg.__path__, "undying."):
        importlib.import_module(info.name)
