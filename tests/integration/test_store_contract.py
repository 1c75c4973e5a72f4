"""The checkpoint-store contract: one suite, every backend (in memory and a real redis-server).

The store moves bytes and knows nothing of agents, so the contract tests use
opaque byte strings. The engine-level tests below then run the research
agent on Redis: compaction must not change the state a resume loads, and a
corrupt record quarantines its run and nothing else.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.conftest import unique_id
from undying.actors import RunState, create_run, load_state
from undying.actors.research import agent
from undying.persistence import (
    Commit,
    CorruptCheckpoint,
    Fenced,
    MemoryStore,
    Quarantined,
    RedisStore,
    RunExists,
    RunNotFound,
    StepConflict,
    encode,
    pack,
)
from undying.testing import RecordingStore, resume_inline, run_inline

TASK = "How do fencing tokens and idempotency keys prevent duplicates?"


@pytest.fixture(params=["memory", "redis"])
def backend(request: pytest.FixtureRequest) -> Iterator[Any]:
    if request.param == "memory":
        yield MemoryStore()
        return
    s = RedisStore(request.getfixturevalue("redis_server").url, unavailable_s=20)
    yield s
    s.close()


def new_run(store: Any, *, first: bytes = b"", snap: bytes = b"S0") -> str:
    rid = unique_id("contract")
    store.create(rid, snap, agent="pkg.mod:agent", parent="parent-x", first_message=first)
    return rid


def ids(infos: list[Any]) -> dict[str, str]:
    return {i.run_id: i.status for i in infos}


# -- checkpoints ------------------------------------------------------------------------


def test_create_then_load(backend: Any) -> None:
    rid = new_run(backend)
    got = backend.load(rid)
    assert (got.run_id, got.epoch, got.step, got.status) == (rid, 0, 0, "pending")
    assert (got.snapshot, got.snapshot_step, got.deltas, got.journal_bytes) == (b"S0", 0, (), 0)
    assert (got.seen, got.outbox, got.agent, got.parent) == (frozenset(), (), "pkg.mod:agent", "parent-x")
    info = backend.info(rid)
    assert (info.status, info.step, info.epoch, info.agent, info.parent, info.reason) == (
        "pending", 0, 0, "pkg.mod:agent", "parent-x", "")
    assert info.created_ms > 0


def test_create_twice_raises_run_exists_and_keeps_the_first(backend: Any) -> None:
    rid = new_run(backend)
    with pytest.raises(RunExists) as exc:
        backend.create(rid, b"other", agent="x:y")
    assert exc.value.run_id == rid
    assert backend.load(rid).snapshot == b"S0"


def test_commit_appends_its_delta_and_moves_step_and_status(backend: Any) -> None:
    rid = new_run(backend)
    e = backend.claim_epoch(rid)
    r1 = backend.commit(rid, Commit(epoch=e, step=1, status="running", delta=b"D1"))
    r2 = backend.commit(rid, Commit(epoch=e, step=2, status="waiting", delta=b"DD2"))
    assert (r1.journal_len, r1.journal_bytes) == (1, 2) and (r2.journal_len, r2.journal_bytes) == (2, 5)
    got = backend.load(rid)
    assert (got.step, got.status, got.deltas, got.snapshot) == (2, "waiting", (b"D1", b"DD2"), b"S0")
    assert got.journal_bytes == 5 and backend.info(rid).step == 2


def test_claim_epoch_increments(backend: Any) -> None:
    rid = new_run(backend)
    assert [backend.claim_epoch(rid) for _ in range(3)] == [1, 2, 3]
    assert backend.load(rid).epoch == 3 and backend.info(rid).epoch == 3


def test_a_commit_from_an_old_epoch_is_fenced_and_changes_nothing(backend: Any) -> None:
    rid = new_run(backend)
    old = backend.claim_epoch(rid)
    backend.commit(rid, Commit(epoch=old, step=1, status="running", delta=b"D1"))
    new = backend.claim_epoch(rid)
    with pytest.raises(Fenced) as exc:
        backend.commit(rid, Commit(epoch=old, step=2, status="finished", delta=b"zombie",
                                   events=(b"E",), outbox=(("m", b"X"),), seen=("s",)))
    assert (exc.value.run_id, exc.value.epoch, exc.value.current) == (rid, old, new)
    got = backend.load(rid)
    assert (got.step, got.status, got.deltas, got.outbox, got.seen) == (1, "running", (b"D1",), (),
                                                                       frozenset())
    assert backend.read_events(rid) == []
    backend.commit(rid, Commit(epoch=new, step=2, status="running", delta=b"D2"))
    assert backend.load(rid).deltas == (b"D1", b"D2")


@pytest.mark.parametrize("step", [2, 5])
def test_a_commit_that_skips_a_step_is_a_step_conflict(backend: Any, step: int) -> None:
    rid = new_run(backend)
    e = backend.claim_epoch(rid)
    with pytest.raises(StepConflict) as exc:
        backend.commit(rid, Commit(epoch=e, step=step, status="running", delta=b"D"))
    assert (exc.value.run_id, exc.value.step, exc.value.stored) == (rid, step, 0)
    assert backend.load(rid).deltas == ()


def test_a_commit_behind_the_stored_step_is_a_step_conflict(backend: Any) -> None:
    rid = new_run(backend)
    e = backend.claim_epoch(rid)
    for step in (1, 2, 3):
        backend.commit(rid, Commit(epoch=e, step=step, status="running", delta=b"D%d" % step))
    with pytest.raises(StepConflict) as exc:
        backend.commit(rid, Commit(epoch=e, step=2, status="running", delta=b"again"))
    assert (exc.value.step, exc.value.stored) == (2, 3)
    assert backend.load(rid).deltas == (b"D1", b"D2", b"D3")


def test_an_unknown_status_is_refused(backend: Any) -> None:
    rid = new_run(backend)
    e = backend.claim_epoch(rid)
    with pytest.raises(ValueError, match="unknown status"):
        backend.commit(rid, Commit(epoch=e, step=1, status="sleeping"))


def test_a_snapshot_commit_replaces_snapshot_and_journal(backend: Any) -> None:
    rid = new_run(backend)
    e = backend.claim_epoch(rid)
    backend.commit(rid, Commit(epoch=e, step=1, status="running", delta=b"D1"))
    backend.commit(rid, Commit(epoch=e, step=2, status="running", delta=b"D2"))
    res = backend.commit(rid, Commit(epoch=e, step=3, status="running", snapshot=b"SNAP3"))
    assert (res.journal_len, res.journal_bytes, res.snapshot_bytes) == (0, 0, 5)
    got = backend.load(rid)
    assert (got.snapshot, got.snapshot_step, got.deltas, got.journal_bytes, got.snapshot_bytes) == (
        b"SNAP3", 3, (), 0, 5)
    backend.commit(rid, Commit(epoch=e, step=4, status="running", delta=b"D4"))
    got = backend.load(rid)
    assert (got.snapshot, got.snapshot_step, got.deltas, got.step) == (b"SNAP3", 3, (b"D4",), 4)


def test_the_run_index_follows_status_changes(backend: Any) -> None:
    rid, other = new_run(backend), new_run(backend)
    assert rid in ids(backend.list_runs("pending"))
    assert ids(backend.list_runs())[rid] == "pending"
    e = backend.claim_epoch(rid)
    path = ["running", "waiting", "running", "finished"]
    for step, status in enumerate(path, start=1):
        backend.commit(rid, Commit(epoch=e, step=step, status=status))
        for s in ("pending", "running", "waiting", "finished"):
            assert (rid in ids(backend.list_runs(s))) == (s == status), (status, s)
        assert ids(backend.list_runs())[rid] == status == backend.info(rid).status
    assert ids(backend.list_runs("pending"))[other] == "pending"


# -- messages ---------------------------------------------------------------------------


def test_inbox_reads_are_ordered_and_the_cursor_is_exclusive(backend: Any) -> None:
    rid = new_run(backend, first=b"M0")
    sent = [backend.send(rid, b"M%d" % i) for i in (1, 2, 3)]
    everything = backend.read_inbox(rid, "0-0")
    assert [e.data for e in everything] == [b"M0", b"M1", b"M2", b"M3"]
    assert [e.entry_id for e in everything[1:]] == sent
    assert [e.data for e in backend.read_inbox(rid, sent[0])] == [b"M2", b"M3"]
    assert backend.read_inbox(rid, sent[-1]) == []
    assert [e.data for e in backend.read_inbox(rid, "0-0", count=2)] == [b"M0", b"M1"]
    key = [tuple(int(x) for x in e.entry_id.split("-")) for e in everything]
    assert key == sorted(key) and len(set(key)) == 4


def test_outbox_entries_are_loaded_until_marked_relayed(backend: Any) -> None:
    rid = new_run(backend)
    e = backend.claim_epoch(rid)
    backend.commit(rid, Commit(epoch=e, step=1, status="running", outbox=(("m-b", b"EB"), ("m-a", b"EA"))))
    assert backend.load(rid).outbox == (("m-a", b"EA"), ("m-b", b"EB"))
    backend.mark_relayed(rid, "m-a")
    assert backend.load(rid).outbox == (("m-b", b"EB"),)
    backend.mark_relayed(rid, "m-a")  # relaying twice is harmless
    backend.mark_relayed(rid, "m-b")
    assert backend.load(rid).outbox == ()


def test_seen_ids_accumulate_and_are_loaded(backend: Any) -> None:
    rid = new_run(backend)
    e = backend.claim_epoch(rid)
    backend.commit(rid, Commit(epoch=e, step=1, status="running", seen=("a", "b")))
    backend.commit(rid, Commit(epoch=e, step=2, status="running", seen=("c",)))
    backend.commit(rid, Commit(epoch=e, step=3, status="running"))
    assert backend.load(rid).seen == frozenset({"a", "b", "c"})


def test_events_are_read_in_order_after_a_cursor(backend: Any) -> None:
    rid = new_run(backend)
    e = backend.claim_epoch(rid)
    backend.commit(rid, Commit(epoch=e, step=1, status="running", events=(b"E1",)))
    backend.commit(rid, Commit(epoch=e, step=2, status="running", events=(b"E2", b"E3")))
    events = backend.read_events(rid)
    assert [x.data for x in events] == [b"E1", b"E2", b"E3"]
    assert [x.data for x in backend.read_events(rid, after=events[0].entry_id)] == [b"E2", b"E3"]
    assert [x.data for x in backend.read_events(rid, count=1)] == [b"E1"]
    t0 = time.monotonic()
    assert backend.read_events(rid, after=events[-1].entry_id, block_ms=50) == []
    assert time.monotonic() - t0 < 5


def test_quarantine_stops_one_run_and_no_other(backend: Any) -> None:
    bad, good = new_run(backend), new_run(backend)
    e_bad, e_good = backend.claim_epoch(bad), backend.claim_epoch(good)
    backend.quarantine(bad, "snapshot cannot be read")
    with pytest.raises(Quarantined) as exc:
        backend.load(bad)
    assert exc.value.run_id == bad and "snapshot cannot be read" in exc.value.reason
    with pytest.raises(Quarantined):
        backend.claim_epoch(bad)
    with pytest.raises(Quarantined):
        backend.commit(bad, Commit(epoch=e_bad, step=1, status="running"))
    info = backend.info(bad)
    assert (info.status, info.reason) == ("quarantined", "snapshot cannot be read")
    assert bad in ids(backend.list_runs("quarantined")) and bad not in ids(backend.list_runs("pending"))
    # the other run goes on
    backend.commit(good, Commit(epoch=e_good, step=1, status="running", delta=b"D"))
    assert backend.load(good).deltas == (b"D",) and backend.claim_epoch(good) == e_good + 1
    assert good not in ids(backend.list_runs("quarantined"))


def test_delete_removes_the_run_and_only_it(backend: Any) -> None:
    rid, other = new_run(backend, first=b"M0"), new_run(backend)
    e = backend.claim_epoch(rid)
    backend.commit(rid, Commit(epoch=e, step=1, status="running", delta=b"D", events=(b"E",)))
    backend.delete(rid)
    with pytest.raises(RunNotFound):
        backend.load(rid)
    with pytest.raises(RunNotFound):
        backend.info(rid)
    assert rid not in ids(backend.list_runs()) and rid not in ids(backend.list_runs("running"))
    backend.delete(rid)  # deleting twice is harmless
    assert backend.load(other).snapshot == b"S0"
    backend.create(rid, b"again", agent="a:b")  # the id is free again, with nothing left over
    got = backend.load(rid)
    assert (got.snapshot, got.step, got.epoch, got.deltas) == (b"again", 0, 0, ())
    assert backend.read_inbox(rid, "0-0") == []


def test_an_unknown_run_is_not_found(backend: Any) -> None:
    rid = unique_id("missing")
    for call in (lambda: backend.send(rid, b"m"), lambda: backend.load(rid),
                 lambda: backend.claim_epoch(rid), lambda: backend.info(rid),
                 lambda: backend.quarantine(rid, "x"),
                 lambda: backend.commit(rid, Commit(epoch=1, step=1, status="running"))):
        with pytest.raises(RunNotFound) as exc:
            call()
        assert exc.value.run_id == rid


# -- the engine on Redis: compaction and corrupt records -----------------------------------


@dataclass
class LoadAfterEveryCommit(RecordingStore):
    """Loads the run's state from the store right after each commit."""

    run_id: str = ""
    loaded: list[RunState] = field(default_factory=list)

    def after_write(self, n: int, name: str) -> None:
        if name == "commit":
            self.loaded.append(load_state(self.inner, self.run_id)[0])


@pytest.mark.parametrize("ratio", [0.5, 1, 100])
def test_compaction_keeps_the_loaded_state_identical(store: RedisStore, ratio: float) -> None:
    rid = unique_id("compact")
    watched = LoadAfterEveryCommit(store, run_id=rid)
    final = run_inline(watched, agent, TASK, run_id=rid, compact_ratio=ratio, effect_concurrency=1)
    assert final.status == "finished" and final.result
    state, loaded = load_state(store, rid)
    assert state == final
    assert [s.step for s in watched.loaded] == list(range(1, final.step + 1))
    for s in watched.loaded:  # every intermediate state is a prefix of the final one
        assert final.conversation[:len(s.conversation)] == s.conversation
        assert all(final.journal[k].call_id == k for k in s.journal)
    assert watched.loaded[-1] == final
    if ratio == 100:
        assert loaded.snapshot_step == 0 and len(loaded.deltas) == final.step
    else:
        assert loaded.snapshot_step > 0 and len(loaded.deltas) < final.step
    # and a fresh activation resumes from that state without changing it
    assert resume_inline(store, rid) == final


def _other_run_snapshot(rid: str) -> bytes:
    return encode("snapshot", RunState(run_id="somebody-else", context=agent.context()), run_id=rid)


GARBAGE = b"\xc1\x00 this is not msgpack \xff"
CORRUPTIONS = {
    "snap-garbage": ("snap", lambda rid: GARBAGE),
    "snap-wrong-kind": ("snap", lambda rid: pack("event", {"step": 1}, run_id=rid)),
    "snap-other-run": ("snap", _other_run_snapshot),
    "journal-garbage": ("journal", lambda rid: GARBAGE),
    "journal-unknown-op": ("journal", lambda rid: pack("delta", {"step": 99, "ops": [["x", "memory"]]})),
    "journal-no-ops": ("journal", lambda rid: pack("delta", {"step": 99})),
    "journal-bad-field": ("journal", lambda rid: pack("delta", {"step": 99, "ops": [["s", "step", "x"]]})),
    "journal-wrong-step": ("journal", lambda rid: pack("delta", {"step": 99, "ops": [["s", "step", 99]]})),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_a_corrupt_record_quarantines_its_run_and_nothing_else(store: RedisStore, case: str) -> None:
    part, make = CORRUPTIONS[case]
    bad = unique_id("corrupt")
    before = create_run(store, agent, TASK, run_id=unique_id("neighbour"))
    final = run_inline(store, agent, TASK, run_id=bad, compact_ratio=100)
    assert final.status == "finished"
    key = f"ud:{{{bad}}}:{part}"
    if part == "snap":
        store.r.set(key, make(bad))
    else:
        store.r.rpush(key, make(bad))

    with pytest.raises(CorruptCheckpoint) as exc:
        load_state(store, bad)
    assert exc.value.run_id == bad and repr(bad) in str(exc.value)
    info = store.info(bad)
    assert info.status == "quarantined" and info.reason == exc.value.reason
    assert bad in {i.run_id for i in store.list_runs("quarantined")}
    assert bad not in {i.run_id for i in store.list_runs("finished")}
    with pytest.raises(Quarantined):
        load_state(store, bad)
    with pytest.raises(Quarantined):
        resume_inline(store, bad)
    # a run created before and one created after both run to the end in the same store
    assert resume_inline(store, before).status == "finished"
    after = run_inline(store, agent, TASK, run_id=unique_id("after"))
    assert after.status == "finished" and after.result == final.result
    assert load_state(store, before)[0].status == "finished"


def test_a_corrupt_inbox_entry_quarantines_the_run(store: RedisStore) -> None:
    rid = create_run(store, agent, TASK, run_id=unique_id("inbox"))
    store.send(rid, GARBAGE)
    with pytest.raises(CorruptCheckpoint) as exc:
        resume_inline(store, rid)
    assert exc.value.run_id == rid
    assert store.info(rid).status == "quarantined"


@pytest.mark.parametrize("record", [GARBAGE, pack("outbox", {"to": "someone"})], ids=["garbage", "no-m"])
def test_a_corrupt_outbox_entry_quarantines_the_run(store: RedisStore, record: bytes) -> None:
    rid = create_run(store, agent, TASK, run_id=unique_id("outbox"))
    store.r.hset(f"ud:{{{rid}}}:outbox", f"{rid}>someone:m1", record)
    with pytest.raises(CorruptCheckpoint) as exc:
        resume_inline(store, rid)
    assert exc.value.run_id == rid
    assert store.info(rid).status == "quarantined"


def test_a_quarantined_run_cannot_be_activated(store: RedisStore) -> None:
    rid = create_run(store, agent, TASK, run_id=unique_id("q"))
    store.quarantine(rid, "operator says no")
    with pytest.raises(Quarantined, match="operator says no"):
        resume_inline(store, rid)
    with pytest.raises(Quarantined):
        store.activate(rid, "host-1", "host-1|node|1", 3000)
    with pytest.raises(Quarantined):
        store.claim_epoch(rid)
    assert store.info(rid).epoch == 0  # no epoch was taken


def test_a_dispatch_is_claimed_by_one_executor_and_its_own_retry_finds_it_claimed(
        backend: Any) -> None:
    rid = new_run(backend)
    e = backend.claim_epoch(rid)
    backend.commit(rid, Commit(epoch=e, step=1, status="running", delta=b"D1",
                               effects=(("m1", 1),)))
    assert backend.fx_claim(rid, "m1", 1, "exec-a", 4000, "i1").status == "ok"
    # the same executor asking again (a retry after a lost reply) finds its own claim
    assert backend.fx_claim(rid, "m1", 1, "exec-a", 4000, "i1").status == "ok"
    # anyone else is refused, told who holds it: another executor, or another
    # incarnation of the same one, or an older attempt
    assert backend.fx_claim(rid, "m1", 1, "exec-b", 4000, "i2").status == "skip"
    assert backend.fx_claim(rid, "m1", 1, "exec-a", 4000, "i9").status == "skip"
    assert backend.fx_claim(rid, "m1", 0, "exec-a", 4000, "i1").status == "skip"
