"""The operator's deployment files under cluster/deploy.

They parse, pin the versions every Ray node must share, keep the settings
that protect checkpoints (AOF on, no eviction, no default user), and hold no
machine paths or secrets. Where a real redis-server is on PATH, the ACL file
and redis.conf are loaded into it, and a commit written by a Lua script has
to survive a restart. Redis 7 drops such commits at AOF load when the
`default` user has no rights (redis/redis#14541).
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "cluster" / "deploy"
RAY_VERSION = "2.60.0"
UNDYING_VERSION = "0.1.0"

EXPECTED_FILES = [
    "README.md",
    "ray/README.md",
    "ray/cluster.yaml",
    "ray/undying.env.example",
    "kuberay/README.md",
    "kuberay/raycluster.yaml",
    "kuberay/Dockerfile",
    "redis/README.md",
    "redis/redis.conf",
    "redis/users.acl",
    "redis/sentinel.conf",
]


def _files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.is_file() and "__pycache__" not in p.parts)


def _yaml_docs(path: Path) -> list[Any]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _directives(path: Path) -> list[list[str]]:
    """Non-comment lines of a redis/sentinel config, split into words."""
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            out.append(line.split())
    return out


def _acl_users() -> dict[str, list[str]]:
    users = {}
    for line in (DEPLOY / "redis" / "users.acl").read_text().splitlines():
        if line.strip():
            words = line.split()
            assert words[0] == "user", f"users.acl line does not start with 'user': {line!r}"
            users[words[1]] = words[2:]
    return users


def _raycluster() -> dict[str, Any]:
    docs = _yaml_docs(DEPLOY / "kuberay" / "raycluster.yaml")
    found = [d for d in docs if d.get("kind") == "RayCluster"]
    assert len(found) == 1, "raycluster.yaml must hold exactly one RayCluster"
    return found[0]


def _ray_containers(rc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = rc["spec"]
    pods = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    return [c for pod in pods for c in pod["spec"]["containers"]]


# --- the files are there and parse -------------------------------------------


def test_every_expected_file_exists() -> None:
    missing = [f for f in EXPECTED_FILES if not (DEPLOY / f).is_file()]
    assert not missing, f"missing under cluster/deploy: {missing}"


def test_every_yaml_parses() -> None:
    yamls = [p for p in _files() if p.suffix in (".yaml", ".yml")]
    assert len(yamls) >= 2
    for path in yamls:
        docs = _yaml_docs(path)
        assert docs, f"{path.relative_to(ROOT)} has no YAML document"


# --- KubeRay -------------------------------------------------------------------


def test_raycluster_pins_ray_and_uses_secrets() -> None:
    rc = _raycluster()
    assert rc["apiVersion"] == "ray.io/v1"
    assert rc["spec"]["rayVersion"] == RAY_VERSION
    assert rc["spec"]["workerGroupSpecs"], "RayCluster has no worker group"
    containers = _ray_containers(rc)
    assert len(containers) >= 2
    for c in containers:
        tag = c["image"].rsplit(":", 1)[-1]
        assert tag.startswith(RAY_VERSION), f"{c['name']}: image {c['image']} is not Ray {RAY_VERSION}"
        env = {e["name"]: e for e in c.get("env", [])}
        url = env.get("UNDYING_REDIS_URL")
        assert url and "secretKeyRef" in url.get("valueFrom", {}), (
            f"{c['name']}: UNDYING_REDIS_URL must come from a Secret"
        )
        assert "value" not in url
        assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"]


def test_raycluster_gcs_fault_tolerance_uses_external_redis() -> None:
    ft = _raycluster()["spec"]["gcsFaultToleranceOptions"]
    assert ft["redisAddress"]
    assert "secretKeyRef" in ft["redisPassword"]["valueFrom"]
    # Ray's GCS Redis is not undying's Redis.
    undying_hosts = re.findall(r"@([\w.-]+):", (DEPLOY / "kuberay" / "README.md").read_text())
    assert undying_hosts
    assert urlparse(ft["redisAddress"]).hostname not in undying_hosts


def test_dockerfile_builds_on_pinned_ray_image_with_undying() -> None:
    text = (DEPLOY / "kuberay" / "Dockerfile").read_text()
    froms = re.findall(r"^FROM\s+(\S+)", text, re.MULTILINE)
    assert froms == [f"rayproject/ray:{RAY_VERSION}-py311"]
    assert re.search(rf"pip install[^\n]*undying=={re.escape(UNDYING_VERSION)}", text)


# --- Ray cluster launcher --------------------------------------------------------


def _launcher() -> dict[str, Any]:
    docs = _yaml_docs(DEPLOY / "ray" / "cluster.yaml")
    assert len(docs) == 1
    return docs[0]


def test_launcher_installs_undying_and_pinned_ray() -> None:
    cfg = _launcher()
    setup = " ".join(cfg["setup_commands"])
    assert "pip install" in setup
    assert f"undying=={UNDYING_VERSION}" in setup
    assert f"ray[default]=={RAY_VERSION}" in setup
    assert cfg["docker"]["image"].rsplit(":", 1)[-1].startswith(RAY_VERSION)


def test_launcher_node_types_and_head_fault_tolerance() -> None:
    cfg = _launcher()
    assert cfg["provider"]["type"] == "aws"
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    workers = [t for name, t in types.items() if name != cfg["head_node_type"]]
    assert workers
    for t in workers:
        assert 0 <= t["min_workers"] <= t["max_workers"] <= cfg["max_workers"]
    head_start = " ".join(cfg["head_start_ray_commands"])
    assert "RAY_REDIS_ADDRESS=" in head_start
    assert "ray start --head" in head_start
    # secrets reach the nodes through the env file, never through the YAML
    assert "undying.env" in " ".join(cfg["file_mounts"])
    assert "undying.env" in head_start
    assert "undying.env" in " ".join(cfg["worker_start_ray_commands"])


def test_launcher_matches_rays_schema() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    autoscaler = pytest.importorskip("ray.autoscaler")
    schema_path = Path(autoscaler.__file__).parent / "ray-schema.json"
    if not schema_path.is_file():
        pytest.skip("this Ray install has no ray-schema.json")
    import json

    jsonschema.validate(_launcher(), json.loads(schema_path.read_text()))


# --- Redis ------------------------------------------------------------------------


def test_redis_conf_keeps_checkpoints() -> None:
    d = {w[0].lower(): w[1:] for w in _directives(DEPLOY / "redis" / "redis.conf")}
    assert d["appendonly"] == ["yes"]
    assert d["appendfsync"] == ["everysec"]
    assert d["maxmemory-policy"] == ["noeviction"]
    assert d["protected-mode"] == ["yes"]
    assert d["port"] == ["0"], "plaintext port must be off"
    assert d["tls-port"] and d["tls-port"] != ["0"]
    assert "aclfile" in d
    assert "requirepass" not in d, "users live in users.acl"
    text = (DEPLOY / "redis" / "redis.conf").read_text()
    assert "appendfsync always" in text, "the comment on zero-loss fsync is gone"


def test_users_acl_disables_default_and_confines_undying() -> None:
    users = _acl_users()
    default = users["default"]
    assert "off" in default and "on" not in default
    assert "nopass" not in default
    assert not any(r.startswith((">", "#")) for r in default), "default user has a password"
    undying = users["undying"]
    assert "on" in undying
    keys = [r for r in undying if r.startswith("~") or r in ("allkeys", "%RW~*")]
    assert keys == ["~ud:*"]
    for cmd in ("+eval", "+evalsha", "+script|load", "-@dangerous"):
        assert cmd in undying
    assert undying.index("-@dangerous") > undying.index("+@keyspace")
    # Redis 7 checks AOF MULTI/EXEC blocks against the default user at load.
    assert [r for r in default if r not in ("off", "resetpass")] == [
        r for r in undying if r not in ("on",) and not r.startswith(("#", ">"))
    ]
    assert "allchannels" not in undying and "+@all" not in undying


def test_sentinel_monitors_with_quorum_two() -> None:
    d = _directives(DEPLOY / "redis" / "sentinel.conf")
    monitor = [w for w in d if w[:2] == ["sentinel", "monitor"]]
    assert len(monitor) == 1
    _, _, name, _host, port, quorum = monitor[0]
    assert name == "undying-primary" and quorum == "2" and port.isdigit()
    assert ["sentinel", "down-after-milliseconds", "undying-primary", "5000"] in d
    assert any(w[:3] == ["sentinel", "auth-user", "undying-primary"] for w in d)


def test_templates_name_every_placeholder_they_use() -> None:
    for name in ("redis.conf", "sentinel.conf"):
        path = DEPLOY / "redis" / name
        lines = path.read_text().splitlines()
        used = {v for ln in lines if not ln.lstrip().startswith("#")
                for v in re.findall(r"\$\{(\w+)\}", ln)}
        header = " ".join(ln for ln in lines if ln.lstrip().startswith("#"))
        assert used, name
        missing = [v for v in used if f"${{{v}}}" not in header]
        assert not missing, f"{name}: placeholders not in its envsubst line: {missing}"
    readme = (DEPLOY / "redis" / "README.md").read_text()
    for v in re.findall(r"\$\{(\w+)\}", (DEPLOY / "redis" / "users.acl").read_text()):
        assert f"export {v}=" in readme, f"redis/README.md does not show how to set {v}"


# --- nothing local, nothing secret ---------------------------------------------------


def test_no_local_machine_paths() -> None:
    for path in _files():
        text = path.read_text()
        for bad in ("/root", "/home/", "/work/"):
            assert bad not in text, f"{path.relative_to(ROOT)} contains {bad!r}"


PLACEHOLDER = re.compile(
    r"""^(\$\{?[A-Za-z_][A-Za-z0-9_]*\}?|\$\(.*|<[^>]*>|[A-Z][A-Z0-9_]*)$"""
)
SECRET_NAME = re.compile(r"(?i)(pass(word|wd)?|secret|token|api[_-]?key|auth)$")
KNOWN_SAMPLE_PASSWORDS = ("5241590000000000", "foobared", "changeme", "hunter2", "password123")


def _is_placeholder(value: str) -> bool:
    return bool(PLACEHOLDER.match(value.strip().strip("'\"")))


def _secrets_in_line(line: str) -> list[str]:
    found = []
    # user:password@ in any URL
    for m in re.finditer(r"\b[a-z][a-z0-9+.-]*://[^\s:/@'\"]*:([^\s@'\"/]+)@", line):
        if not _is_placeholder(m.group(1)):
            found.append(m.group(0))
    # NAME_PASSWORD=value, --redis-password=value, password="value"
    for m in re.finditer(
        r"(?i)([A-Za-z0-9_-]*(?:password|passwd|token|secret|api_key))\s*=\s*(\S+)", line
    ):
        if not _is_placeholder(m.group(2)):
            found.append(m.group(0))
    words = line.split()
    if words and not line.lstrip().startswith("#"):
        if words[0] in ("requirepass", "masterauth") and len(words) > 1:
            if not _is_placeholder(words[1]):
                found.append(line)
        if words[:2] in (["sentinel", "auth-pass"], ["sentinel", "sentinel-pass"]):
            if not _is_placeholder(words[-1]):
                found.append(line)
        if words[0] == "user":
            for w in words[2:]:
                if w.startswith(">") and not _is_placeholder(w[1:]):
                    found.append(w)
                if w.startswith("#") and not _is_placeholder(w[1:]):
                    found.append(w)
    # a literal SHA-256 (an ACL password hash) or a long random-looking token
    found += re.findall(r"(?<![\w{$])#?\b[0-9a-f]{32,}\b", line)
    found += re.findall(
        r"\b(?=[\w-]*\d)(?=[\w-]*[a-z])(?=[\w-]*[A-Z])[A-Za-z0-9_-]{24,}\b", line
    )
    found += [s for s in KNOWN_SAMPLE_PASSWORDS if s in line]
    return found


def _secrets_in_yaml(node: Any, where: str) -> list[str]:
    found = []
    if isinstance(node, dict):
        if isinstance(node.get("name"), str) and SECRET_NAME.search(node["name"]):
            if isinstance(node.get("value"), str) and not _is_placeholder(node["value"]):
                found.append(f"{where}: env {node['name']} has a literal value")
        for k, v in node.items():
            if isinstance(k, str) and SECRET_NAME.search(k) and isinstance(v, str):
                if not _is_placeholder(v) and k != "mode":
                    found.append(f"{where}.{k} is a literal")
            found += _secrets_in_yaml(v, f"{where}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            found += _secrets_in_yaml(v, f"{where}[{i}]")
    return found


def test_secret_scanner_catches_literals() -> None:
    # the scanner itself, on strings built here, so no literal sits in a file
    pw = "s3cr" + "etValue"
    assert _secrets_in_line(f"rediss://undying:{pw}@redis:6380/0")
    assert _secrets_in_line(f"RAY_GCS_REDIS_PASSWORD={pw}")
    assert _secrets_in_line(f"masterauth {pw}")
    assert _secrets_in_line(f"sentinel auth-pass undying-primary {pw}")
    assert _secrets_in_line(f"user undying on >{pw} ~ud:*")
    assert _secrets_in_line("user undying on #" + hashlib.sha256(b"x").hexdigest())
    assert _secrets_in_yaml({"env": [{"name": "RAY_AUTH_TOKEN", "value": pw}]}, "doc")
    assert not _secrets_in_line("rediss://undying:${UNDYING_REDIS_PASSWORD}@redis:6380/0")
    assert not _secrets_in_line("rediss://undying:PASSWORD@redis:6380/0")
    assert not _secrets_in_line('--redis-password="$RAY_GCS_REDIS_PASSWORD"')
    assert not _secrets_in_line("user undying on #${UNDYING_REDIS_PASSWORD_SHA256} ~ud:*")


def test_no_literal_secrets() -> None:
    problems = []
    for path in _files():
        rel = path.relative_to(ROOT)
        for n, line in enumerate(path.read_text().splitlines(), 1):
            problems += [f"{rel}:{n}: {s}" for s in _secrets_in_line(line)]
        if path.suffix in (".yaml", ".yml"):
            for i, doc in enumerate(_yaml_docs(path)):
                problems += _secrets_in_yaml(doc, f"{rel}#{i}")
    assert not problems, "literal secrets in deploy files:\n" + "\n".join(problems)


# --- against a real redis-server ----------------------------------------------------


def _redis_servers() -> list[tuple[tuple[int, ...], str]]:
    candidates = []
    explicit = os.environ.get("UNDYING_REDIS_SERVER")
    if explicit:
        candidates.append(explicit)
    for d in os.environ.get("PATH", "").split(os.pathsep):
        p = os.path.join(d, "redis-server")
        if os.path.isfile(p) and os.access(p, os.X_OK):
            candidates.append(p)
    found = {}
    # run each by its own name: Debian's redis-server is a link whose target
    # behaves as redis-check-rdb when called by that name
    for exe in {os.path.realpath(c): c for c in reversed(candidates)}.values():
        try:
            out = subprocess.run([exe, "--version"], capture_output=True, text=True,
                                 timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            continue
        m = re.search(r"v=(\d+)\.(\d+)\.(\d+)", out)
        if m:
            found[exe] = tuple(int(x) for x in m.groups())
    return sorted(((v, e) for e, v in found.items()), reverse=True)


@pytest.fixture(scope="module")
def redis_server() -> tuple[tuple[int, ...], str]:
    servers = [s for s in _redis_servers() if s[0] >= (6, 2)]
    if not servers:
        pytest.skip("no redis-server >= 6.2 on PATH")
    return servers[0]


def _render(text: str, values: dict[str, str]) -> str:
    # a KeyError here is a placeholder the README's render step does not set
    return re.sub(r"\$\{(\w+)\}", lambda m: values[m.group(1)], text)


def _once() -> dict[str, Any]:
    """Client options without redis-py's retries: a refused login fails at once."""
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    return {"retry": Retry(NoBackoff(), 0), "socket_timeout": 5}


class _Server:
    def __init__(self, exe: str, version: tuple[int, ...], tmp: Path,
                 values: dict[str, str], passwords: dict[str, str]) -> None:
        self.exe, self.tmp, self.passwords = exe, tmp, passwords
        self.sock = str(tmp / "redis.sock")
        self.log = tmp / "redis.log"
        acl = tmp / "users.acl"
        acl.write_text(_render((DEPLOY / "redis" / "users.acl").read_text(), values))
        if version >= (7,):
            # the real redis.conf, minus TLS (certificates are the operator's)
            conf = _render((DEPLOY / "redis" / "redis.conf").read_text(), values)
            lines = []
            for line in conf.splitlines():
                word = line.split()[0] if line.split() else ""
                if word.startswith("tls-") or word in ("dir", "aclfile", "bind"):
                    continue
                lines.append(line)
            lines += [f"dir {tmp}", f"aclfile {acl}", "bind 127.0.0.1", "port 0",
                      f"unixsocket {self.sock}", f"logfile {self.log}", 'save ""']
            (tmp / "redis.conf").write_text("\n".join(lines) + "\n")
            self.args = [exe, str(tmp / "redis.conf")]
        else:
            self.args = [exe, "--port", "0", "--unixsocket", self.sock, "--dir", str(tmp),
                         "--appendonly", "yes", "--aclfile", str(acl),
                         "--maxmemory-policy", "noeviction", "--logfile", str(self.log),
                         "--save", ""]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        import redis

        self.proc = subprocess.Popen(self.args, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                log = self.log.read_text() if self.log.exists() else ""
                pytest.fail(f"redis-server refused the deploy config:\n{log[-3000:]}")
            if os.path.exists(self.sock):
                try:
                    redis.Redis(unix_socket_path=self.sock, **_once()).ping()
                except redis.exceptions.AuthenticationError:
                    return  # up, and the default user is off
                except redis.exceptions.ConnectionError:
                    pass
                except redis.exceptions.ResponseError:
                    return
            time.sleep(0.05)
        pytest.fail("redis-server did not start in 10 s")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture
def server(redis_server: tuple[tuple[int, ...], str], tmp_path: Path) -> Iterator[_Server]:
    version, exe = redis_server
    passwords = {n: secrets.token_hex(16) for n in ("undying", "ops", "replica", "sentinel")}
    values = {
        "UNDYING_REDIS_PASSWORD_SHA256": hashlib.sha256(passwords["undying"].encode()).hexdigest(),
        "OPS_REDIS_PASSWORD_SHA256": hashlib.sha256(passwords["ops"].encode()).hexdigest(),
        "UD_REPLICATION_PASSWORD_SHA256": hashlib.sha256(passwords["replica"].encode()).hexdigest(),
        "SENTINEL_REDIS_PASSWORD_SHA256": hashlib.sha256(passwords["sentinel"].encode()).hexdigest(),
        "UD_REPLICATION_PASSWORD": passwords["replica"],
        "REDIS_BIND_ADDRESS": "127.0.0.1",
    }
    s = _Server(exe, version, tmp_path, values, passwords)
    s.start()
    try:
        yield s
    finally:
        s.stop()


def _client(server: _Server, user: str | None) -> Any:
    import redis

    if user is None:
        return redis.Redis(unix_socket_path=server.sock, **_once())
    return redis.Redis(unix_socket_path=server.sock, username=user,
                       password=server.passwords[user], **_once())


def test_acl_lets_undying_do_its_work_and_nothing_else(server: _Server) -> None:
    import redis

    u = _client(server, "undying")
    u.set("ud:x", "1")
    u.hset("ud:{r1}:meta", "epoch", 1)
    u.xadd("ud:{r1}:events", {"m": "1"})
    assert u.xread({"ud:{r1}:events": "0"}, count=1)
    with u.pipeline() as p:  # MULTI/EXEC
        p.sadd("ud:state:running", "r1").hincrby("ud:{r1}:meta", "epoch", 1).execute()
    # register_script: EVALSHA, then SCRIPT LOAD on NOSCRIPT; globals in ud:*
    commit = u.register_script(
        "redis.call('SADD', 'ud:state:pending', ARGV[1]) "
        "redis.call('RPUSH', KEYS[2], ARGV[1]) "
        "return redis.call('HINCRBY', KEYS[1], 'epoch', 1)"
    )
    assert commit(keys=["ud:{r1}:meta", "ud:{r1}:journal"], args=["r1"]) == 3
    assert u.wait(0, 10) == 0

    for denied in (
        lambda: u.set("other", "1"),
        lambda: u.flushall(),
        lambda: u.keys("*"),
        lambda: u.config_get("maxmemory"),
        lambda: u.eval("return redis.call('SET', 'other', 1)", 0),
    ):
        with pytest.raises(redis.exceptions.ResponseError):
            denied()

    with pytest.raises((redis.exceptions.AuthenticationError, redis.exceptions.ResponseError)):
        _client(server, None).ping()
    with pytest.raises((redis.exceptions.AuthenticationError, redis.exceptions.ResponseError)):
        redis.Redis(unix_socket_path=server.sock, username="default", password="x",
                    **_once()).ping()


def test_scripted_commits_survive_a_restart(server: _Server) -> None:
    u = _client(server, "undying")
    commit = u.register_script(
        "redis.call('SADD', 'ud:state:running', ARGV[1]) "
        "redis.call('XADD', KEYS[2], '*', 'step', ARGV[2]) "
        "return redis.call('HINCRBY', KEYS[1], 'step', 1)"
    )
    for step in range(5):
        commit(keys=["ud:{r1}:meta", "ud:{r1}:events"], args=["r1", step])
    ops = _client(server, "ops")
    assert ops.config_get("appendonly")["appendonly"] == "yes"
    assert ops.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"
    before = ops.dbsize()
    ops.shutdown(nosave=True)  # the AOF is fsynced on shutdown; no RDB is written
    assert server.proc is not None
    server.proc.wait(10)
    server.start()
    ops = _client(server, "ops")
    log = server.log.read_text()
    assert "NOPERM" not in log and "CRITICAL" not in log, log[-2000:]
    assert ops.dbsize() == before
    assert ops.hget("ud:{r1}:meta", "step") == b"5"
    assert ops.xlen("ud:{r1}:events") == 5
