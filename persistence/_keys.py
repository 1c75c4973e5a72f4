"""Redis key names. Every key of one run shares the hash tag ``{run_id}``."""

from __future__ import annotations

from typing import Any

INDEX = "ud:index"  # hash run -> status
COUNTERS = "ud:counters"  # cluster-wide counters that survive every process
LEASES = "ud:leases"  # zset run -> lease expiry (ms) of runs a host holds
READY = "ud:ready"  # list of runs queued for activation (any host)
BELL = "ud:bell"  # a doorbell per queued run: hosts block on it
FX_DUE = "ud:fx:due"  # zset "run|effect" -> when its dispatch is due to be claimed or renewed
TIMERS = "ud:timers"  # zset "run|timer" -> when it fires (ms)
APPROVALS = "ud:approvals"  # zset "run|call" -> since when it waits for someone's decision (ms)
ENDED = "ud:ended"  # zset root run -> when it ended (ms): retention counts from there
HOSTS = "ud:hosts"  # hash host id -> "heartbeat ms|node|pid|run|epoch"


def _k(run_id: str, part: str) -> str:
    return f"ud:{{{run_id}}}:{part}"


def _state_key(status: str) -> str:
    return f"ud:state:{status}"


def _taking(host: str) -> str:
    """The runs a host took from the ready queue and is activating (a reliable queue)."""
    return f"ud:taking:{host}"


def _own_ready(host: str) -> str:
    """Runs queued for one host first: it held them last, their state may be warm there."""
    return f"{READY}:{host}"


def _own_bell(host: str) -> str:
    return f"{BELL}:{host}"


def _execset(executor: str) -> str:
    """The dispatches an executor (by name, over its incarnations) has claimed."""
    return f"ud:exec:{executor}"


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)
