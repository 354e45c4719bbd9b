"""The store's parts on their own: leases, the tier-fault guard, batched writes behind and promotions."""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch

from kvmesh.codecs import RawCodec
from kvmesh.codecs.base import CorruptEntry
from kvmesh.store import LeaseTable, TieredStore
from kvmesh.store.guard import TierGuard
from kvmesh.store.types import NullObserver
from kvmesh.tiers.memory import Extent, MemoryTier

MiB = 1024 * 1024


def _l1(size: int = 8 * MiB) -> MemoryTier:
    return MemoryTier(size, memoryview(bytearray(size)))


def _chunk(seed: int) -> torch.Tensor:
    return torch.randn(4, 2, 64, 2, 32, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


class Counting(NullObserver):
    def __init__(self) -> None:
        self.faults: list[tuple[str, str]] = []
        self.dropped: list[str] = []

    def tier_fault(self, tier: str, action: str) -> None:
        self.faults.append((tier, action))

    def dropped_store(self, reason: str, key: bytes | None = None) -> None:
        self.dropped.append(reason)


class Recording(MemoryTier):
    """A lower tier that records the batches the store hands it."""

    def __init__(self) -> None:
        super().__init__(32 * MiB, memoryview(bytearray(32 * MiB)), name="rec")
        self.put_batches: list[int] = []
        self.get_batches: list[list[bytes]] = []

    def put_many(self, items):
        self.put_batches.append(len(items))
        return super().put_many(items)

    def get_many(self, keys):
        self.get_batches.append(list(keys))
        return super().get_many(keys)


def test_a_lease_is_given_back_once_and_an_old_one_expires() -> None:
    released: list[bytes] = []
    now = [0.0]
    leases = LeaseTable(lambda key, extent: released.append(key), 10, clock=lambda: now[0])
    first = leases.grant([(b"a", Extent(0, 1)), (b"b", Extent(4096, 1))])
    second = leases.grant([(b"c", Extent(8192, 1))])
    assert len(leases) == 2
    assert leases.give_back(first) and released == [b"a", b"b"]
    assert not leases.give_back(first)  # unknown now: the caller reports a failed load
    now[0] = 5.0
    assert leases.expire() == 0
    now[0] = 10.5
    assert leases.expire() == 1 and released == [b"a", b"b", b"c"]
    assert not leases.give_back(second) and len(leases) == 0
    with pytest.raises(ValueError, match="positive"):
        LeaseTable(lambda key, extent: None, 0)


def test_the_guard_counts_faults_by_action_and_only_put_faults_as_dropped_stores() -> None:
    observer = Counting()
    guard = TierGuard(observer)

    def down() -> int:
        raise ConnectionError("down")

    def corrupt() -> int:
        raise CorruptEntry("bad")

    assert guard.call("redis", "lookup", down, 0) == 0
    assert guard.call("disk", "get", corrupt, -1) == -1
    assert guard.call("redis", "put", down, 0) == 0
    assert observer.faults == [("redis", "lookup"), ("disk", "get"), ("redis", "put")]
    assert observer.dropped == ["redis_put_error"]
    with pytest.raises(KeyError):  # not a cache fault: a bug, and it goes through
        guard.call("disk", "get", lambda: {}["x"], None)


def test_a_failing_lookup_is_a_tier_fault_not_a_dropped_store() -> None:
    class Down(MemoryTier):
        def lookup(self, keys):
            raise TimeoutError("slow")

    observer = Counting()
    store = TieredStore(_l1(), [Down(MiB, memoryview(bytearray(MiB)), name="down")], observer=observer)
    assert store.lookup([b"x" * 16]) == 0
    assert observer.faults == [("down", "lookup")] and observer.dropped == []
    store.close()


def test_the_writer_drains_the_queue_into_batches(gated_disk_writes, tmp_path) -> None:
    from kvmesh.tiers.disk import DiskTier

    lower = Recording()
    disk = DiskTier(tmp_path, 64 * MiB)  # first: holding its first write lets the queue fill behind it
    store = TieredStore(_l1(16 * MiB), [disk, lower], prefetch=False)
    store.put(b"first" + bytes(11), _chunk(0))
    assert gated_disk_writes.writing.wait(30)
    keys = [bytes([i]) * 16 for i in range(1, 9)]
    for i, key in enumerate(keys, 1):
        store.put(key, _chunk(i))
    gated_disk_writes.finish.set()
    assert store.flush()
    assert lower.put_batches[0] == 1 and lower.put_batches[1:] == [len(keys)]  # one put_many for the rest
    for i, key in enumerate(keys, 1):
        assert lower.get(key) == RawCodec().encode(_chunk(i), key=key)
    store.close()


def test_a_prefetch_reads_several_keys_with_one_get_many() -> None:
    lower = Recording()
    keys = [bytes([i]) * 16 for i in range(4)]
    for i, key in enumerate(keys):
        lower.put(key, RawCodec().encode(_chunk(i)))
    gate = threading.Event()
    store = TieredStore(_l1(), [lower], prefetch_threads=1)
    original = lower.get_many

    def held(batch):
        gate.wait(30)
        return original(batch)

    lower.get_many = held  # type: ignore[method-assign]
    assert store.lookup([b"z" * 16]) == 0
    store._promoter.prefetch([keys[0]])  # the thread takes this one and waits in the read ...
    store._promoter.prefetch(keys[1:])  # ... while these queue up behind it
    gate.set()
    deadline = time.monotonic() + 30
    while not all(store.l1.contains(key) for key in keys):  # all brought up by the prefetch thread
        assert time.monotonic() < deadline, "prefetch did not promote the chunks"
        time.sleep(0.01)
    for i, key in enumerate(keys):
        got = store.get(key)
        assert got is not None and torch.equal(got.view(torch.uint8), _chunk(i).view(torch.uint8))
    assert any(len(batch) > 1 for batch in lower.get_batches)
    store.close()


def _scheduling(thread: threading.Thread) -> int:
    assert thread.native_id is not None
    return os.sched_getscheduler(thread.native_id)


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="Linux's idle scheduling class")
def test_an_idle_prefetch_thread_runs_at_normal_priority_while_someone_waits_for_it() -> None:
    """A second ask for a key still on its way up means an engine waits: the idle class would starve it."""
    lower = Recording()
    key = b"w" * 16
    lower.put(key, RawCodec().encode(_chunk(1), key=key))
    gate, reading = threading.Event(), threading.Event()
    original = lower.get_many

    def held(batch):
        reading.set()
        gate.wait(30)
        return original(batch)

    lower.get_many = held  # type: ignore[method-assign]
    store = TieredStore(_l1(), [lower], prefetch_threads=1, prefetch_priority="idle")
    thread = store._promoter.threads[0]
    deadline = time.monotonic() + 10
    while _scheduling(thread) != os.SCHED_IDLE:
        assert time.monotonic() < deadline, "the prefetch thread never entered the idle class"
        time.sleep(0.01)
    store._promoter.prefetch([key])
    assert reading.wait(30)
    assert _scheduling(thread) == os.SCHED_IDLE  # asked once: nobody is known to wait
    store._promoter.prefetch([key])  # asked again while it is promoted: an engine is waiting
    assert _scheduling(thread) == os.SCHED_OTHER
    gate.set()
    while _scheduling(thread) != os.SCHED_IDLE:  # back to the idle class once nothing is queued
        assert time.monotonic() < deadline + 20, "the prefetch thread stayed at normal priority"
        time.sleep(0.01)
    assert store.l1.contains(key)
    store.close()
