"""A rate limiter shared by the whole cluster, in Redis: requests and tokens per minute.

Every process that calls a provider asks Redis for a slot before each
attempt, so a thousand sub-agents on twenty nodes spend one quota together
instead of each believing it has the provider to itself.

The algorithm is GCRA (the generic cell rate algorithm) with reservation. A
bucket stores, per limit, its "theoretical arrival time" (TAT): when the
bucket would be empty again if nobody else came. A caller asking for ``cost``
units moves the TAT forward by ``cost`` emission intervals and is told how long
to wait until its slot; callers are thus queued in Redis, first come first
served, and each sleeps exactly once instead of polling. The clock is the
Redis server's (``TIME``), so clocks that differ between nodes do not matter.
Both limits (requests and tokens) are checked and moved in one script: either
the caller gets both, or it gets neither.

A bucket is provider + base URL + the *name* of the API key's environment
variable, never its value: two deployments that share a key share a quota.
Keys: ``ud:rl:{bucket}`` (one key per bucket; the braces are a Redis Cluster
hash tag). A bucket's key expires once its TATs are in the past, when it
would read as empty anyway.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio as aioredis

log = logging.getLogger("undying.ratelimit")

# KEYS[1] the bucket's hash. ARGV: rpm, request burst, tpm, token burst, requests, tokens,
# max wait (ms), force (1: reserve even beyond max wait). Returns {granted, wait in µs}.
_GCRA = """
-- TIME before a write needs effects replication (the default from Redis 7 on)
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local horizon = now
local function plan(field, per_min, burst, cost)
  local stored = tonumber(redis.call('HGET', KEYS[1], field))
  if stored and stored > horizon then horizon = stored end
  if per_min <= 0 or cost <= 0 then return nil, 0 end
  local interval = 60000 / per_min
  local tat = stored or now
  if tat < now then tat = now end
  local new_tat = tat + cost * interval
  -- a request larger than the burst passes once the bucket is empty (not never)
  local wait = new_tat - math.max(burst, cost) * interval - now
  if wait < 0 then wait = 0 end
  return new_tat, wait
end
local r_tat, r_wait = plan('r', tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[5]))
local t_tat, t_wait = plan('t', tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[6]))
local wait = math.max(r_wait, t_wait)
if wait > tonumber(ARGV[7]) and ARGV[8] ~= '1' then
  return {0, math.floor(wait * 1000)}
end
if r_tat then
  redis.call('HSET', KEYS[1], 'r', tostring(r_tat))
  if r_tat > horizon then horizon = r_tat end
end
if t_tat then
  redis.call('HSET', KEYS[1], 't', tostring(t_tat))
  if t_tat > horizon then horizon = t_tat end
end
redis.call('PEXPIRE', KEYS[1], math.ceil(horizon - now) + 1000)
return {1, math.floor(wait * 1000)}
"""


@dataclass(frozen=True)
class Limits:
    """Requests and tokens per minute; bursts default to one second's worth (at least 1)."""

    rpm: float | None = None
    tpm: float | None = None
    burst_requests: float | None = None
    burst_tokens: float | None = None

    @property
    def active(self) -> bool:
        return bool(self.rpm) or bool(self.tpm)

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> Limits:
        def num(name: str) -> float | None:
            v = options.get(name)
            if v is None:
                return None
            if not isinstance(v, int | float) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"rate limit option {name!r} must be a positive number, not {v!r}")
            return float(v)

        return cls(rpm=num("rpm"), tpm=num("tpm"), burst_requests=num("rpm_burst"),
                   burst_tokens=num("tpm_burst"))

    def args(self) -> tuple[float, float, float, float]:
        rpm, tpm = self.rpm or 0.0, self.tpm or 0.0
        br = self.burst_requests or max(1.0, rpm / 60.0)
        bt = self.burst_tokens or max(1.0, tpm / 60.0)
        return rpm, br, tpm, bt


def bucket_name(provider: str, base_url: str, key_env: str | None) -> str:
    """Whose quota a call spends. The key's variable *name*: a value must never reach Redis."""
    raw = f"{provider}|{base_url.rstrip('/')}|{key_env or '-'}"
    return raw.replace("{", "(").replace("}", ")")  # braces would break the hash tag


def bucket_key(bucket: str) -> str:
    return "ud:rl:{" + bucket + "}"


@dataclass(frozen=True)
class Reservation:
    granted: bool  # False: the queue is longer than the horizon, nothing was reserved
    wait_s: float  # until the slot (granted) or until one would be (not granted)


@dataclass
class LimiterStats:
    acquired: int = 0
    waited_s: float = 0.0
    redis_errors: int = 0


class RedisRateLimiter:
    """``await limiter.acquire(bucket, tokens, limits=Limits(rpm=600))`` before each call.

    ``max_reserve_s`` bounds how far ahead a slot is reserved: a caller facing a
    longer queue reserves nothing, sleeps until it is within reach and asks
    again, so callers that give up meanwhile do not hold slots for an hour.
    With ``fail_open`` (the default), Redis being unreachable lets calls
    through unlimited (logged) rather than stopping every agent: the
    provider's own 429s, which are retried, are then the limit.
    """

    def __init__(self, redis_url: str | aioredis.Redis, *, default: Limits | None = None,
                 max_reserve_s: float = 30.0, fail_open: bool = True, max_connections: int = 16,
                 sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
                 rng: random.Random | None = None) -> None:
        self._url = redis_url if isinstance(redis_url, str) else None
        self._given = None if isinstance(redis_url, str) else redis_url
        self._clients: dict[int, tuple[aioredis.Redis, Any]] = {}
        self.default = default
        self.max_reserve_s = max_reserve_s
        self.max_connections = max_connections
        self.fail_open = fail_open
        self.sleep = sleep
        self.rng = rng or random.Random()
        self.stats = LimiterStats()
        self._last_warning = 0.0

    def _script(self) -> Any:
        # an asyncio Redis client's connections belong to the loop that opened them
        loop_id = id(asyncio.get_running_loop())
        entry = self._clients.get(loop_id)
        if entry is None:
            if self._given is not None:
                client = self._given
            else:
                assert self._url is not None
                # a blocking pool: a burst of callers queues for a connection; an erroring
                # one (redis-py's default) would fail the burst open, unlimited
                pool = aioredis.BlockingConnectionPool.from_url(
                    self._url, max_connections=self.max_connections, timeout=10,
                    socket_timeout=5, socket_connect_timeout=2)
                client = aioredis.Redis(connection_pool=pool)
            # EVALSHA, falling back to EVAL when the server has not seen the script yet
            entry = (client, client.register_script(_GCRA))
            self._clients = {loop_id: entry}
        return entry[1]

    async def reserve(self, bucket: str, *, limits: Limits, requests: int = 1, tokens: int = 0,
                      force: bool = False) -> Reservation:
        """One round trip: reserve a slot (or not) and say how long until it."""
        rpm, br, tpm, bt = limits.args()
        granted, wait_us = await self._script()(
            keys=[bucket_key(bucket)],
            args=[rpm, br, tpm, bt, requests, tokens, self.max_reserve_s * 1000.0,
                  "1" if force else "0"])
        return Reservation(granted=bool(granted), wait_s=int(wait_us) / 1e6)

    async def acquire(self, bucket: str, tokens: int = 0, *, requests: int = 1,
                      limits: Limits | None = None, wait: bool = True) -> float:
        """Wait for a slot; returns the seconds waited. ``wait=False`` only charges the bucket
        (to settle tokens used beyond an estimate) and returns the debt it created."""
        limits = limits or self.default
        if limits is None or not limits.active:
            return 0.0
        start = time.monotonic()
        while True:
            try:
                res = await self.reserve(bucket, limits=limits, requests=requests, tokens=tokens,
                                         force=not wait)
            except (redis.RedisError, OSError) as exc:
                self.stats.redis_errors += 1
                if not self.fail_open:
                    raise
                self._warn(bucket, exc)
                return time.monotonic() - start
            if not wait:
                return res.wait_s
            if res.granted:
                if res.wait_s > 0:
                    await self.sleep(res.wait_s)
                waited = time.monotonic() - start
                self.stats.acquired += 1
                self.stats.waited_s += waited
                return waited
            # beyond the horizon: come back when the slot is nearly in reach, spread out so
            # that the callers turned away together do not all return in the same instant
            await self.sleep(res.wait_s - self.max_reserve_s * self.rng.uniform(0.5, 0.9))

    def _warn(self, bucket: str, exc: BaseException) -> None:
        now = time.monotonic()
        if now - self._last_warning > 30:
            self._last_warning = now
            log.warning("rate limiter: Redis unreachable (%s); calls to %s go through unlimited",
                        type(exc).__name__, bucket)

    async def aclose(self) -> None:
        for client, _ in self._clients.values():
            if client is self._given:
                continue  # the caller's client: the caller closes it
            try:
                await client.aclose()
            except RuntimeError:
                pass  # its loop is gone; its sockets went with it
        self._clients = {}
