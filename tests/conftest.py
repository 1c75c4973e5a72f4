"""Shared fixtures: real redis-servers on free ports, one local Ray per session.

Every server and Ray instance a test starts is stopped here; processes are
killed only by pid. The machine's own Redis on 6379 is never touched.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from undying.persistence import RedisServer, RedisStore  # noqa: E402


@pytest.fixture(scope="session")
def tmp_root() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="undying-tests-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_server(tmp_root: Path) -> Iterator[RedisServer]:
    """One shared server for the session (appendfsync always: nothing acknowledged is lost)."""
    server = RedisServer(tmp_root / "redis-shared", appendfsync="always").start()
    yield server
    server.stop()


@pytest.fixture
def store(redis_server: RedisServer) -> Iterator[RedisStore]:
    s = RedisStore(redis_server.url, unavailable_s=20)
    yield s
    s.close()


@pytest.fixture
def private_redis(tmp_root: Path) -> Iterator[RedisServer]:
    """A server of this test's own, to kill and restart."""
    server = RedisServer(tmp_root / f"redis-{uuid.uuid4().hex[:8]}", appendfsync="always").start()
    yield server
    server.kill()


@pytest.fixture(scope="module")
def module_redis(tmp_root: Path) -> Iterator[RedisServer]:
    """A server of this test module's own (AOF always), shared by its tests."""
    server = RedisServer(tmp_root / f"redis-m-{uuid.uuid4().hex[:8]}", appendfsync="always").start()
    yield server
    server.kill()


class _RayState:
    """Which Ray this test process is attached to: one local instance shared by the
    session, or a module's multi-node `Cluster` (they cannot coexist in one driver)."""

    mode: str | None = None
    cluster: object | None = None


_RAY = _RayState()


def _shutdown_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
    if _RAY.cluster is not None:
        _RAY.cluster.shutdown()  # type: ignore[attr-defined]
        _RAY.cluster = None
    _RAY.mode = None


@pytest.fixture(scope="session", autouse=True)
def _ray_session() -> Iterator[None]:
    yield
    _shutdown_ray()


@pytest.fixture(scope="module")
def ray_local() -> Iterator[None]:
    import ray

    if _RAY.mode != "local":
        _shutdown_ray()
        ray.init(address="local", include_dashboard=False, log_to_driver=False, num_cpus=2,
                 object_store_memory=100 << 20, namespace="undying-tests")
        _RAY.mode = "local"
    yield


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[object]:
    """Three Ray nodes on this machine (ray.cluster_utils.Cluster), default health checks."""
    import ray
    from ray.cluster_utils import Cluster

    _shutdown_ray()
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "include_dashboard": False, "object_store_memory": 80 << 20})
    for _ in range(2):
        cluster.add_node(num_cpus=1, object_store_memory=80 << 20)
    _RAY.cluster, _RAY.mode = cluster, "cluster"
    ray.init(address=cluster.address, log_to_driver=False, namespace="undying-tests")
    cluster.wait_for_nodes()
    yield cluster
    _shutdown_ray()


def unique_id(prefix: str = "t") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"
