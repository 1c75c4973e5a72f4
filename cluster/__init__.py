"""Cluster: connecting to Ray and Redis, node placement, deployment files (see deploy/)."""

from ._connect import connect_store, init_ray, redis_url
from ._settings import Settings

__all__ = ["Settings", "connect_store", "init_ray", "redis_url"]
