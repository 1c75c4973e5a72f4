"""Connecting to Ray and Redis."""

from __future__ import annotations

import os

from undying.persistence import RedisStore, ensure_embedded

from ._settings import Settings

# Keep a local Ray on loopback, without usage reporting or token files, unless the
# user set these themselves (RAY-NOTES: forcing the address another way hung a test).
_RAY_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
}


def redis_url(settings: Settings) -> str:
    if settings.redis_url:
        return settings.redis_url
    return ensure_embedded(settings.home, appendfsync=settings.appendfsync)


def connect_store(settings: Settings) -> RedisStore:
    store = RedisStore(redis_url(settings))
    store.ping()
    return store


def init_ray(settings: Settings) -> None:
    import ray

    if ray.is_initialized():
        return
    for k, v in _RAY_ENV.items():
        os.environ.setdefault(k, v)
    if settings.ray_address:
        ray.init(address=settings.ray_address, namespace=settings.namespace,
                 log_to_driver=False)
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(address="local", namespace=settings.namespace, include_dashboard=False,
             log_to_driver=False, num_cpus=settings.num_cpus or os.cpu_count() or 2,
             object_store_memory=200 << 20)
