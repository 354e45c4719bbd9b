"""Writing on eviction: L1 as the disk's write-back cache (``store/write_back.py``)."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from kvmesh.store import TieredStore
from kvmesh.store.types import LowerTier, NullObserver
from kvmesh.store.write_back import WriteBack
from kvmesh.tiers.disk import DiskTier
from kvmesh.tiers.memory import MemoryTier
from polling import eventually

MiB = 1024 * 1024
L1_BYTES = 2 * MiB  # 32 chunks of 64 KiB; the oldest quarter (8 chunks) is kept written once it is nearly full


class Drops(NullObserver):
    def __init__(self) -> None:
        self.reasons: list[str] = []

    def dropped_store(self, reason: str, key: bytes | None = None) -> None:
        self.reasons.append(reason)


def _chunk(seed: int) -> torch.Tensor:  # 64 KiB
    return torch.randn(4, 2, 64, 2, 32, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


def _key(seed: int) -> bytes:
    return seed.to_bytes(2, "big") * 8


def _store(tmp_path: Path) -> tuple[TieredStore, MemoryTier, DiskTier, Drops]:
    drops = Drops()
    l1 = MemoryTier(L1_BYTES, memoryview(bytearray(L1_BYTES)))
    disk = DiskTier(tmp_path / "disk", 64 * MiB)
    store = TieredStore(l1, [LowerTier(disk, "on_eviction")], observer=drops, prefetch=False)
    return store, l1, disk, drops


def test_nothing_goes_to_disk_while_l1_has_room_and_a_flush_writes_it_all(tmp_path: Path) -> None:
    store, _, disk, _ = _store(tmp_path)
    try:
        for seed in range(8):
            assert store.put(_key(seed), _chunk(seed))
        time.sleep(0.5)  # five times the writer's look at what is due
        assert disk.stats().stores == 0
        assert store.flush(10)  # a graceful shutdown
        assert all(disk.contains(_key(seed)) for seed in range(8))
        assert torch.equal(store.get(_key(3)), _chunk(3))
    finally:
        store.close()


def test_the_oldest_entries_go_down_before_l1_evicts_them(tmp_path: Path) -> None:
    store, l1, disk, drops = _store(tmp_path)
    try:
        for seed in range(48):  # half again what L1 holds
            assert store.put(_key(seed), _chunk(seed))
            # a store at a time the writer keeps up with: the oldest quarter is on disk before the next one
            assert eventually(lambda: all(disk.contains(k) for k in l1.next_to_evict(L1_BYTES // 4))
                             or l1.capacity - l1.used >= L1_BYTES // 4)
        assert l1.stats().evictions >= 16
        assert drops.reasons == []  # nothing left L1 unwritten
        keys = [_key(seed) for seed in range(48)]
        assert store.lookup(keys) == 48  # every chunk is in L1 or on disk
        assert not disk.contains(_key(47))  # the newest were never written: they are still in L1
        for seed in (0, 20, 47):
            assert torch.equal(store.get(_key(seed)), _chunk(seed))
    finally:
        store.close()


def test_an_entry_evicted_before_it_was_written_is_a_counted_drop_never_a_silent_loss(tmp_path: Path) -> None:
    store, l1, disk, drops = _store(tmp_path)
    try:
        for seed in range(48):  # faster than the writer looks: some leave L1 unwritten
            assert store.put(_key(seed), _chunk(seed))
        evicted = [seed for seed in range(48) if not l1.contains(_key(seed))]
        assert store.flush(10)
        assert len(evicted) == l1.stats().evictions > 0
        lost = [seed for seed in evicted if not disk.contains(_key(seed))]
        assert drops.reasons.count("evicted_unwritten") == len(lost)  # each one not on disk was counted
        for seed in range(48):  # the others are all there, in L1 or on disk; a lost one is a miss
            assert store.lookup([_key(seed)]) == (0 if seed in lost else 1)
    finally:
        store.close()


def test_the_write_back_counts_only_dirty_entries_that_nobody_is_writing() -> None:
    drops = Drops()
    l1 = MemoryTier(L1_BYTES)
    back = WriteBack(l1, drops)
    back.mark(b"a" * 16)
    back.mark(b"b" * 16)
    taken: list[bytes] = []
    assert back.drain(lambda key: taken.append(key) or True) == 2
    back.evicted(b"a" * 16)  # on its way down (pinned in L1, in fact): not lost
    back.written(b"b" * 16)
    back.mark(b"c" * 16)
    back.evicted(b"c" * 16)  # dirty and nobody writing it: lost, counted
    back.evicted(b"d" * 16)  # never dirty (already below L1): nothing to count
    assert sorted(taken) == [b"a" * 16, b"b" * 16]
    assert drops.reasons == ["evicted_unwritten"]
    assert back.dirty == 0


def test_what_l1_is_about_to_evict_goes_down_even_while_engines_hold_writes_back(tmp_path: Path) -> None:
    import threading

    from kvmesh.store.quiet import QuietGate

    gate = QuietGate(0.2)
    drops = Drops()
    l1 = MemoryTier(L1_BYTES, memoryview(bytearray(L1_BYTES)))
    disk = DiskTier(tmp_path / "disk", 64 * MiB)
    store = TieredStore(l1, [LowerTier(disk, "on_eviction")], observer=drops, prefetch=False, quiet_gate=gate)
    stop = threading.Event()

    def engine_at_work() -> None:  # a message every 5 ms: the gate never sees quiet
        while not stop.is_set():
            gate.busy()
            time.sleep(0.005)

    busy = threading.Thread(target=engine_at_work, daemon=True)
    busy.start()
    try:
        for seed in range(40):
            assert store.put(_key(seed), _chunk(seed))
            assert eventually(lambda: all(disk.contains(k) for k in l1.next_to_evict(L1_BYTES // 8))
                             or l1.capacity - l1.used >= L1_BYTES // 8)
        assert drops.reasons == []
        assert disk.stats().stores >= 8  # written although the engine never went quiet
        assert store.lookup([_key(seed) for seed in range(40)]) == 40
    finally:
        stop.set()
        busy.join()
        store.close()


def test_urgent_once_less_than_half_the_clean_room_is_free() -> None:
    l1 = MemoryTier(L1_BYTES)
    back = WriteBack(l1, Drops())  # clean room: a quarter of L1, urgent below an eighth free
    seed = 0
    while l1.capacity - l1.used >= L1_BYTES // 8:
        assert not back.urgent()
        l1.reserve(_key(seed), 64 * 1024)
        l1.commit(_key(seed))
        seed += 1
    assert back.urgent() and seed == 29
