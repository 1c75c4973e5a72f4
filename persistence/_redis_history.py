"""History, forks, retention and metrics: the part of the Redis store that looks back.

History: compaction does not delete the journal, it renames it to a history segment
``ud:{R}:hist:<step>`` (the deltas of the steps up to that snapshot, its own
included) and lists it in ``ud:{R}:hist``; the run's first snapshot is kept as
``ud:{R}:origin``. So origin + segments + journal hold every step's delta, at no
cost per step (a RENAME per compaction), and the state at any step can be rebuilt.
A fork is a new run whose snapshot is that state; its own history starts there and
points back to the run it came from (``forked_from``, ``origin_step`` in its meta).

Retention: when a root run ends, the commit script notes when (``ud:ended``).
`remove_ended` deletes one ended run and all its keys in one script, and refuses
a run that has not ended, is held or queued by a host, or still has messages to
relay: nothing running or waiting is ever removed.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from ._errors import RunExists, RunNotFound
from ._keys import COUNTERS, ENDED, FX_DUE, INDEX, LEASES, READY, TIMERS, _k, _s
from ._store import EventEntry
from .metrics import METRICS_KEY

_TERMINAL = """
local TERMINAL = {finished=true, failed=true, cancelled=true, quarantined=true}
"""

# KEYS: meta snap index lease ready outbox fx fxdue timers events counters
# ARGV: run_id agent now snapshot step status forked_from fx_timeout_ms event
#       n_outbox n_fx n_timers (outbox id, envelope)... (effect id, attempt)... (timer id, at)...
# A fork is born with its pending calls recorded as dispatched-not-claimed and its
# activation marked unclean, so the first host that takes it dispatches them (the same
# path as a restart after a crash), and with its spawns in its outbox.
FORK = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 'EXISTS' end
local run, now, step, status = ARGV[1], tonumber(ARGV[3]), ARGV[5], ARGV[6]
redis.call('HSET', KEYS[1], 'epoch', 0, 'step', step, 'status', status, 'snap_step', step,
           'snap_bytes', #ARGV[4], 'journal_bytes', 0, 'journal_len', 0, 'agent', ARGV[2],
           'parent', '', 'created', now, 'updated', now, 'reason', '', 'clean', 0,
           'origin_step', step, 'forked_from', ARGV[7], 'forked_at', step)
redis.call('SET', KEYS[2], ARGV[4])
redis.call('HSET', KEYS[3], run, status)
redis.call('SADD', 'ud:state:' .. status, run)
redis.call('XADD', KEYS[10], '*', 'e', ARGV[9])
local no, nf, nt = tonumber(ARGV[10]), tonumber(ARGV[11]), tonumber(ARGV[12])
local i = 13
for _ = 1, no do
  redis.call('HSET', KEYS[6], ARGV[i], ARGV[i + 1]); i = i + 2
end
local due = now + tonumber(ARGV[8])
for _ = 1, nf do
  redis.call('HSET', KEYS[7], ARGV[i], ARGV[i + 1] .. '|q')
  redis.call('ZADD', KEYS[8], due, run .. '|' .. ARGV[i]); i = i + 2
end
for _ = 1, nt do
  redis.call('ZADD', KEYS[9], tonumber(ARGV[i + 1]), run .. '|' .. ARGV[i]); i = i + 2
end
redis.call('SET', KEYS[4], 'ready')
redis.call('RPUSH', KEYS[5], run)
redis.call('RPUSH', 'ud:bell', 1)
redis.call('HINCRBY', KEYS[11], 'forks_total', 1)
return 'OK'
"""

# KEYS: the run's keys (meta first, then lease, outbox, fx, then the rest)
#       then index leases ended fxdue timers counters
# ARGV: run_id why n_run_keys timer_ids...
REMOVE = _TERMINAL + """
local n = tonumber(ARGV[3])
local meta, lease, outbox, fx = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local index, leases, ended, fxdue, timers, counters =
  KEYS[n + 1], KEYS[n + 2], KEYS[n + 3], KEYS[n + 4], KEYS[n + 5], KEYS[n + 6]
local run = ARGV[1]
local status = redis.call('HGET', meta, 'status')
if status and not TERMINAL[status] then return 'ACTIVE' end
if status and redis.call('EXISTS', lease) == 1 then return 'HELD' end
if status and redis.call('HLEN', outbox) > 0 then return 'OUTBOX' end
for _, seg in ipairs(redis.call('LRANGE', KEYS[n], 0, -1)) do
  redis.call('DEL', KEYS[n] .. ':' .. seg)
end
for _, eid in ipairs(redis.call('HKEYS', fx)) do redis.call('ZREM', fxdue, run .. '|' .. eid) end
for k = 1, n do redis.call('DEL', KEYS[k]) end
redis.call('HDEL', index, run)
if status then redis.call('SREM', 'ud:state:' .. status, run) end
redis.call('ZREM', leases, run)
redis.call('ZREM', ended, run)
for k = 4, #ARGV do redis.call('ZREM', timers, run .. '|' .. ARGV[k]) end
if not status then return 'GONE' end
redis.call('HINCRBY', counters, 'removed|' .. ARGV[2], 1)
return 'OK'
"""

# KEYS: meta  ARGV: since_ms. The first detection counts (a second report keeps it).
RECOVERING = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
return redis.call('HSETNX', KEYS[1], 'recovering', ARGV[1])
"""

# the parts REMOVE deletes: meta, lease, outbox, fx first (the script looks at those), the
# list of history segments last
_REMOVE_PARTS = ("meta", "lease", "outbox", "fx", "snap", "journal", "events", "inbox", "seen",
                 "ledger", "ledger_nonces", "restarts", "crash", "origin", "hist")
_TIMER_IDS = ("deadline",)


def glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


class RedisHistory:
    # provided by RedisStore
    r: Any
    _retry: Any
    dispatch_timeout_ms: int

    def _history_scripts(self) -> tuple[Any, Any, Any]:
        scripts = self.__dict__.get("_hist_scripts")
        if scripts is None:
            scripts = (self.r.register_script(FORK), self.r.register_script(REMOVE),
                       self.r.register_script(RECOVERING))
            self.__dict__["_hist_scripts"] = scripts
        return scripts  # type: ignore[no-any-return]

    def mark_recovering(self, run_id: str, since_ms: int) -> None:
        """The supervisor noticed the run's activation died at ``since_ms``: the run's next
        commit measures its recovery time from there (and clears the mark)."""
        mark = self._history_scripts()[2]
        self._retry(lambda: mark(keys=[_k(run_id, "meta")], args=[since_ms]))

    # -- metrics (the sink of `undying.persistence.metrics.Recorder`) ----------------------

    def add_metrics(self, incs: dict[str, float]) -> None:
        """Add recorded values to the cluster's metrics: one pipeline, no retry loop (the
        recorder keeps what failed and sends it with its next flush)."""
        p = self.r.pipeline(transaction=False)
        for f, v in incs.items():
            if float(v).is_integer():
                p.hincrby(METRICS_KEY, f, int(v))
            else:
                p.hincrbyfloat(METRICS_KEY, f, float(v))
        p.execute()

    def read_metrics(self) -> dict[str, float]:
        raw = self._retry(lambda: self.r.hgetall(METRICS_KEY))
        return {_s(k): float(_s(v)) for k, v in raw.items()}

    # -- history ----------------------------------------------------------------------------

    def history_records(self, run_id: str, upto_step: int) -> tuple[dict[str, str], int, bytes,
                                                                     list[bytes]]:
        """What rebuilds the run's state at ``upto_step``: (meta, origin step, origin
        snapshot, the records of steps origin+1 .. upto_step, in order). A record is the
        step's delta (a snapshot where a commit carried no delta)."""
        hist = _k(run_id, "hist")

        def read() -> list[Any]:
            p = self.r.pipeline(transaction=True)
            p.hgetall(_k(run_id, "meta"))
            p.get(_k(run_id, "origin"))
            p.get(_k(run_id, "snap"))
            p.lrange(hist, 0, -1)
            p.lrange(_k(run_id, "journal"), 0, -1)
            return p.execute()

        meta_raw, origin, snap, segments, journal = self._retry(read)
        if not meta_raw:
            raise RunNotFound(run_id)
        meta = {_s(k): _s(v) for k, v in meta_raw.items()}
        base = int(meta.get("origin_step", 0) or 0)
        if origin is None:
            origin = snap or b""  # no compaction yet: the snapshot is still the first one
        need = upto_step - base
        rows: list[bytes] = []
        for end in segments:  # each segment holds the steps up to the step it is named by
            if len(rows) >= need:
                break
            rows += self._retry(lambda e=end: self.r.lrange(f"{hist}:{_s(e)}", 0, -1))
        if len(rows) < need:
            rows += journal
        return meta, base, origin, rows[:max(0, need)]

    def create_fork(self, run_id: str, snapshot: bytes, *, agent: str, step: int, status: str,
                    forked_from: str, event: bytes,
                    outbox: tuple[tuple[str, bytes], ...] = (),
                    effects: tuple[tuple[str, int], ...] = (),
                    timers: tuple[tuple[str, int], ...] = (), now_ms: int) -> None:
        fork = self._history_scripts()[0]
        args: list[Any] = [run_id, agent, now_ms, snapshot, step, status, forked_from,
                           self.dispatch_timeout_ms, event, len(outbox), len(effects), len(timers)]
        for mid, env in outbox:
            args.extend((mid, env))
        for eid, attempt in effects:
            args.extend((eid, attempt))
        for tid, at in timers:
            args.extend((tid, at))
        keys = [_k(run_id, p) for p in ("meta", "snap")] + [INDEX, _k(run_id, "lease"), READY]
        keys += [_k(run_id, p) for p in ("outbox", "fx")] + [FX_DUE, TIMERS,
                                                            _k(run_id, "events"), COUNTERS]
        if _s(self._retry(lambda: fork(keys=keys, args=args))) == "EXISTS":
            raise RunExists(run_id)

    # -- watching many runs ---------------------------------------------------------------------

    def read_events_multi(self, cursors: dict[str, str], count: int = 100,
                          block_ms: int | None = None) -> list[tuple[str, EventEntry]]:
        """New events of several runs in one call: (run id, entry), oldest first per run."""
        if not cursors:
            return []
        streams = {_k(rid, "events"): after for rid, after in cursors.items()}
        back = {_k(rid, "events"): rid for rid in cursors}
        res = self._retry(lambda: self.r.xread(streams, count=count, block=block_ms))
        out: list[tuple[str, EventEntry]] = []
        for key, rows in res or []:
            rid = back[_s(key)]
            out.extend((rid, EventEntry(_s(eid), f[b"e"])) for eid, f in rows if b"e" in f)
        return out

    # -- retention and gc -----------------------------------------------------------------------

    def ended_before(self, before_ms: int, count: int = 1000) -> list[tuple[str, int]]:
        """Root runs that ended before ``before_ms``: (run id, ended ms), oldest first."""
        rows = self._retry(lambda: self.r.zrangebyscore(ENDED, 0, before_ms, start=0, num=count,
                                                        withscores=True))
        return [(_s(m), int(sc)) for m, sc in rows]

    def descendants(self, run_id: str) -> list[str]:
        """Every sub-agent below a run (their ids are ``<parent>.<step>-<n>``)."""
        match = glob_escape(run_id) + ".*"
        return sorted(_s(k) for k, _ in self.r.hscan_iter(INDEX, match=match, count=1000))

    def index_items(self) -> Iterator[tuple[str, str]]:
        """(run id, status) of every run, in no order."""
        for k, v in self.r.hscan_iter(INDEX, count=1000):
            yield _s(k), _s(v)

    def remove_ended(self, run_id: str, why: str = "gc") -> str:
        """Delete one run that has ended: "ok"; or "active", "held", "outbox" (left alone);
        "gone" (it was not there; stray keys and index entries are cleaned)."""
        remove = self._history_scripts()[1]
        keys = [_k(run_id, p) for p in _REMOVE_PARTS]
        keys += [INDEX, LEASES, ENDED, FX_DUE, TIMERS, COUNTERS]
        res = self._retry(lambda: remove(keys=keys, args=[run_id, why, len(_REMOVE_PARTS),
                                                         *_TIMER_IDS]))
        return _s(res).lower()
