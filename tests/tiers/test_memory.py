import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmesh.tiers.memory import MemoryTier, ReserveStatus

CAPACITY = 64 * 1024


def _tier() -> MemoryTier:
    return MemoryTier(CAPACITY, memoryview(bytearray(CAPACITY)), alignment=1024)


def _key(i: int) -> bytes:
    return i.to_bytes(16, "little")


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["put", "get", "pin", "unpin", "delete"]),
                          st.integers(0, 30), st.integers(1, 30_000)), max_size=120))
def test_budget_holds_and_contents_stay_intact(ops) -> None:
    tier = _tier()
    written: dict[bytes, bytes] = {}
    pins: list[tuple[bytes, object]] = []
    for op, index, size in ops:
        key = _key(index)
        if op == "put":
            data = os.urandom(size)
            if tier.put(key, data) and key not in written:
                written[key] = data
        elif op == "get":
            got = tier.get(key)
            if got is not None:
                assert got == written[key]
        elif op == "pin":
            extent = tier.acquire(key)
            if extent is not None:
                pins.append((key, extent))
        elif op == "unpin" and pins:
            tier.release(*pins.pop(index % len(pins)))
        elif op == "delete" and tier.delete(key):
            written.pop(key, None)
        for gone in [k for k in written if not tier.contains(k)]:
            del written[gone]  # evicted
        extents = sorted(tier.extents(), key=lambda e: e.offset)
        assert sum(-(-e.nbytes // 1024) * 1024 for e in extents) <= CAPACITY
        for a, b in zip(extents, extents[1:]):
            assert a.offset + a.nbytes <= b.offset
        assert tier.stats().bytes_used <= CAPACITY
        # a pinned entry is never evicted while its key stays stored
        for pinned_key, _extent in pins:
            if pinned_key in written:
                assert tier.contains(pinned_key)
    for key, data in written.items():
        assert tier.get(key) == data


def test_pinned_entries_are_not_evicted() -> None:
    tier = _tier()
    assert tier.put(_key(0), b"a" * 30_000)
    extent = tier.acquire(_key(0))
    for i in range(1, 10):
        tier.put(_key(i), b"b" * 30_000)
    assert tier.contains(_key(0))
    assert tier.get(_key(0)) == b"a" * 30_000
    tier.release(_key(0), extent)
    for i in range(10, 20):
        tier.put(_key(i), b"c" * 30_000)
    assert not tier.contains(_key(0))  # unpinned, it is the least recently used


def test_lru_order_follows_reads() -> None:
    tier = _tier()
    for i in range(4):
        tier.put(_key(i), bytes([i]) * 15_000)
    assert tier.get(_key(0)) is not None  # 0 becomes the most recent
    tier.put(_key(9), b"x" * 15_000)
    assert tier.contains(_key(0)) and not tier.contains(_key(1))
    assert tier.stats().evictions == 1


def test_reservation_is_invisible_until_commit_and_abort_frees_it() -> None:
    tier = _tier()
    reservation = tier.reserve(_key(1), 10_000)
    assert reservation.status is ReserveStatus.OK
    assert not tier.contains(_key(1)) and tier.lookup([_key(1)]) == 0
    assert tier.reserve(_key(1), 10_000).status is ReserveStatus.EXISTS
    tier.abort(_key(1))
    assert tier.stats().bytes_used == 0
    assert tier.reserve(_key(1), 10_000).status is ReserveStatus.OK
    tier.commit(_key(1))
    assert tier.lookup([_key(1), _key(2)]) == 1


def test_too_large_and_all_pinned_are_refused() -> None:
    tier = _tier()
    assert tier.reserve(_key(1), CAPACITY + 1).status is ReserveStatus.NO_ROOM
    tier.put(_key(2), b"z" * 60_000)
    extent = tier.acquire(_key(2))
    assert tier.reserve(_key(3), 10_000).status is ReserveStatus.NO_ROOM
    assert tier.stats().rejected_stores == 2
    tier.release(_key(2), extent)
    assert tier.reserve(_key(3), 10_000).status is ReserveStatus.OK


def test_delete_while_pinned_frees_at_release() -> None:
    tier = _tier()
    tier.put(_key(1), b"q" * 10_000)
    extent = tier.acquire(_key(1))
    assert tier.delete(_key(1))
    assert not tier.contains(_key(1))
    assert tier.stats().bytes_used > 0  # still held by the reader
    assert tier.buffer[extent.offset:extent.offset + 4] == b"qqqq"
    tier.put(_key(1), b"r" * 10_000)  # rewritten elsewhere; the reader's copy is intact
    assert tier.buffer[extent.offset:extent.offset + 4] == b"qqqq"
    tier.release(_key(1), extent)
    assert tier.get(_key(1)) == b"r" * 10_000
    assert tier.stats().bytes_used == 10_240
    with pytest.raises(KeyError):
        tier.release(_key(1), extent)


def test_kept_entries_survive_a_flood_until_unkept_or_their_time_runs_out() -> None:
    now = [0.0]
    tier = MemoryTier(8 * 4096, bytearray(8 * 4096), keep_budget=2 * 4096, clock=lambda: now[0])
    for key in (b"system", b"tools", b"doc"):
        assert tier.put(key, os.urandom(4096))
    result = tier.keep([b"system", b"tools", b"doc", b"absent"], seconds=60)
    assert (result.kept, result.missing, result.over_budget) == (2, 1, 1)  # the budget holds two pages
    for index in range(20):  # a flood of other prompts
        tier.put(b"flood-%d" % index, os.urandom(4096))
    assert tier.contains(b"system") and tier.contains(b"tools") and not tier.contains(b"doc")
    assert tier.kept() == (2, 2 * 4096)
    assert tier.stats().pinned_entries == 2
    assert tier.unkeep([b"tools"]) == 1
    now[0] = 61.0  # system's time ran out
    for index in range(20, 40):
        tier.put(b"flood-%d" % index, os.urandom(4096))
    assert not tier.contains(b"system") and not tier.contains(b"tools")
    assert tier.kept() == (0, 0)
    with pytest.raises(ValueError, match="positive"):
        tier.keep([b"x"], seconds=0)


def test_a_kept_entry_can_still_be_deleted_and_every_keep_released() -> None:
    tier = MemoryTier(4 * 4096, bytearray(4 * 4096), keep_budget=4 * 4096)
    tier.put(b"a", os.urandom(4096))
    tier.put(b"b", os.urandom(4096))
    assert tier.keep([b"a", b"b"], seconds=10).kept == 2
    assert tier.delete(b"a")  # a corrupt entry still goes
    assert tier.kept() == (1, 4096)
    assert tier.unkeep() == 1 and tier.kept() == (0, 0)
