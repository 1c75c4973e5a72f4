"""The supervisor: liveness, restart, crash-loop guard.

The policy (`handle`) is pure; `SupervisorActor` is its Ray adapter.
"""

from ._policy import Policy, SupervisorView, handle


def get_supervisor(*args, **kwargs):  # type: ignore[no-untyped-def]
    """The cluster's supervisor actor (imports Ray: kept out of the pure imports)."""
    from ._actor import get_supervisor as _get

    return _get(*args, **kwargs)


__all__ = ["Policy", "SupervisorView", "get_supervisor", "handle"]
