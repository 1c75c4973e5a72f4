"""The pool: warm host actors and two executor actors per Ray node.

Runs are not actors of their own: a host actor hosts one run at a time,
while it has messages to apply, and executors perform the model and tool
calls of every run on their node. So the number of processes follows the work
being done, not the number of runs in flight (RAY-NOTES: an actor costs
~41 MB and creating one takes 0.2-0.3 s on 2 cores; a thousand sub-agents in
flight cannot each keep one).

Every pool actor is named, detached, pinned to its node, uses no CPU
reservation (num_cpus=0) and holds nothing that is not in Redis. A dead one
is replaced (by the supervisor; an executor also by the first host that needs
it), not restarted by Ray, so that its death is known at once. The node's second executor
is a hot standby: hosts send calls to the first while it lives, and to the standby from the
moment the first dies until its replacement is up, so the calls of runs whose executor died
are redone without waiting for a new process (~0.5 s on 2 cores). `ensure_pool` is idempotent: the
supervisor calls it on boot and whenever nodes come or go, a client without a
supervisor calls it before starting runs.
"""

from __future__ import annotations

from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

EXECUTOR = "undying-executor"
HOST = "undying-host"
HOSTS_PER_NODE = 4
EXECUTORS_PER_NODE = 2  # the first does the work, the second is a hot standby


def executor_name(node_id: str, i: int = 0) -> str:
    return f"{EXECUTOR}:{node_id}" if i == 0 else f"{EXECUTOR}:{node_id}:{i}"


def executor_names(node_id: str, options: dict[str, Any] | None = None) -> list[str]:
    n = int((options or {}).get("executors_per_node", EXECUTORS_PER_NODE))
    return [executor_name(node_id, i) for i in range(max(1, n))]


def node_of(pool_name: str) -> str:
    """The node id in a pool actor's name (``undying-executor:<node>[:i]``,
    ``undying-host:<node>:<i>``)."""
    return pool_name.split(":")[1]


def host_name(node_id: str, i: int) -> str:
    return f"{HOST}:{node_id}:{i}"


def alive_nodes() -> list[str]:
    return sorted(n["NodeID"] for n in ray.nodes() if n.get("Alive"))


def _pinned(node_id: str) -> NodeAffinitySchedulingStrategy:
    return NodeAffinitySchedulingStrategy(node_id, soft=False)


def get_executor(redis_url: str, namespace: str, node_id: str,
                 options: dict[str, Any] | None = None, i: int = 0) -> Any:
    from .ray_executor import ExecutorActor

    return ExecutorActor.options(  # type: ignore[attr-defined, misc, operator]
        name=executor_name(node_id, i), namespace=namespace, lifetime="detached",
        get_if_exists=True, scheduling_strategy=_pinned(node_id),
    ).remote(redis_url, executor_name(node_id, i), dict(options or {}))


def ensure_pool(redis_url: str, namespace: str, options: dict[str, Any] | None = None,
                nodes: list[str] | None = None) -> dict[str, Any]:
    """Create the missing pool actors on every live node; returns {name: handle}."""
    from .ray_host import RunHost

    opts = dict(options or {})
    per_node = int(opts.get("hosts_per_node", HOSTS_PER_NODE))
    out: dict[str, Any] = {}
    for node in nodes if nodes is not None else alive_nodes():
        for i, name in enumerate(executor_names(node, opts)):
            out[name] = get_executor(redis_url, namespace, node, opts, i)
        for i in range(per_node):
            name = host_name(node, i)
            out[name] = RunHost.options(  # type: ignore[attr-defined, misc, operator]
                name=name, namespace=namespace, lifetime="detached", get_if_exists=True,
                scheduling_strategy=_pinned(node),
            ).remote(redis_url, namespace, name, opts)
    return out


def pool_actors(namespace: str) -> dict[str, Any]:
    """The pool actors that exist now, by name."""
    from ray.util import list_named_actors

    out = {}
    for entry in list_named_actors(all_namespaces=True):
        if entry.get("namespace") != namespace:
            continue
        name = entry.get("name", "")
        if name.startswith((EXECUTOR + ":", HOST + ":")):
            try:
                out[name] = ray.get_actor(name, namespace=namespace)
            except ValueError:
                continue
    return out


def shutdown_pool(namespace: str) -> int:
    """Kill every pool actor of a namespace (tests, `undying` teardown). Returns how many."""
    n = 0
    for handle in pool_actors(namespace).values():
        ray.kill(handle, no_restart=True)
        n += 1
    return n
