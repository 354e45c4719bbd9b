"""TieredStore over a real L1 and real lower tiers (an in-memory arena and a disk directory)."""

import os
import threading
import time
from pathlib import Path

import pytest
import torch

from kvmesh.codecs import KiviCodec, RawCodec, get_codec
from kvmesh.codecs.base import read_header
from kvmesh.entry import EntryMeta
from kvmesh.store import LowerTier, TieredStore
from kvmesh.tiers.disk import DiskTier
from kvmesh.tiers.memory import MemoryTier

MiB = 1024 * 1024


def _l1(size: int = 4 * MiB) -> MemoryTier:
    return MemoryTier(size, memoryview(bytearray(size)))


def _lower(size: int = 16 * MiB) -> MemoryTier:
    return MemoryTier(size, memoryview(bytearray(size)), name="l2")


def _chunk(seed: int) -> torch.Tensor:
    return torch.randn(4, 2, 64, 2, 32, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


def test_put_writes_behind_and_get_returns_the_same_bits() -> None:
    lower = _lower()
    store = TieredStore(_l1(), [lower])
    chunk = _chunk(1)
    assert store.put(b"k" * 16, chunk)
    assert store.flush()
    assert torch.equal(store.get(b"k" * 16).view(torch.uint8), chunk.view(torch.uint8))
    assert torch.equal(RawCodec().decode(lower.get(b"k" * 16)), chunk)


def test_write_through_is_done_when_commit_returns(tmp_path: Path) -> None:
    disk = DiskTier(tmp_path, 64 * MiB)
    store = TieredStore(_l1(), [LowerTier(disk, "write_through")])
    store.put(b"t" * 16, _chunk(2))
    assert disk.contains(b"t" * 16)  # no flush needed


def test_lookup_spans_tiers_and_stops_at_first_miss() -> None:
    lower = _lower()
    store = TieredStore(_l1(), [lower], prefetch=False)
    keys = [bytes([i]) * 16 for i in range(4)]
    for i, key in enumerate(keys[:3]):
        store.put(key, _chunk(i))
    assert store.flush()
    store.l1.delete(keys[1])  # only the lower tier holds chunk 1 now
    assert store.lookup(keys) == 3
    lower.delete(keys[0])
    assert store.lookup(keys) == 3  # L1 still holds chunk 0
    store.l1.delete(keys[0])
    assert store.lookup(keys) == 0


def test_a_hit_below_is_promoted_and_a_lookup_prefetches(tmp_path: Path) -> None:
    disk = DiskTier(tmp_path, 64 * MiB)
    store = TieredStore(_l1(1 * MiB), [disk])  # L1 holds a few 128 KiB chunks only
    chunks = {bytes([i]) * 16: _chunk(i) for i in range(20)}
    for key, chunk in chunks.items():
        store.put(key, chunk)
        assert store.flush()  # at most half of L1 may wait to be written; let each one through
    first, second = bytes([0]) * 16, bytes([1]) * 16
    assert not store.l1.contains(first) and not store.l1.contains(second)
    assert torch.equal(store.get(first), chunks[first])  # served from disk ...
    assert store.l1.contains(first)  # ... and promoted
    assert store.lookup([first, second]) == 2  # the lookup starts moving chunk 1 up
    deadline = time.monotonic() + 10
    while not store.l1.contains(second):
        assert time.monotonic() < deadline, "prefetch did not promote the chunk"
        time.sleep(0.01)


def test_a_corrupt_lower_entry_becomes_a_miss_and_is_deleted() -> None:
    lower = _lower()
    store = TieredStore(_l1(), [lower])
    key = b"c" * 16
    store.put(key, _chunk(5))
    assert store.flush()
    store.l1.delete(key)
    damaged = bytearray(lower.get(key))
    damaged[-1] ^= 1
    lower.delete(key)
    lower.put(key, bytes(damaged))
    assert store.get(key) is None
    assert not lower.contains(key)


def test_a_full_write_queue_drops_stores_instead_of_waiting() -> None:
    dropped: list[str] = []

    class Observer:
        def tier_read(self, *args: object) -> None: ...
        def tier_write(self, *args: object) -> None: ...
        def dropped_store(self, reason: str, key: bytes | None = None) -> None:
            dropped.append(reason)

    lower = _lower()
    chunk_bytes = _chunk(0).numel() * 2
    store = TieredStore(_l1(), [lower], observer=Observer(), write_queue_bytes=chunk_bytes - 1)
    assert store.put(b"q" * 16, _chunk(0))  # L1 takes it at once ...
    assert store.flush()
    assert dropped == ["write_queue_full"] and not lower.contains(b"q" * 16)  # ... the lower tier never does


def test_on_reuse_admission_writes_only_chunks_asked_for_twice() -> None:
    lower = _lower()
    store = TieredStore(_l1(), [LowerTier(lower, admission="on_reuse")], prefetch=False)
    once, twice = b"1" * 16, b"2" * 16
    store.lookup([once])
    store.lookup([twice])
    store.lookup([twice])
    store.put(once, _chunk(1))
    store.put(twice, _chunk(2))
    assert store.flush()
    assert not lower.contains(once) and lower.contains(twice)


def test_a_failing_tier_is_a_miss_not_an_error() -> None:
    class Broken:
        name = "broken"

        def lookup(self, keys): raise ConnectionError("down")
        def get_many(self, keys): raise ConnectionError("down")
        def put_many(self, items): raise ConnectionError("down")
        def delete(self, key): raise ConnectionError("down")
        def stats(self): raise ConnectionError("down")
        def close(self): raise ConnectionError("down")

    store = TieredStore(_l1(), [Broken()])
    keys = [b"a" * 16, b"b" * 16]
    assert store.put(keys[0], _chunk(0))
    assert store.flush()
    assert store.lookup(keys) == 1
    assert store.get(keys[1]) is None


def test_concurrent_promotions_of_one_key_all_see_it(tmp_path: Path) -> None:
    """The prefetcher and a reader promoting the same chunk: both must end with it pinned, never a miss."""
    disk = DiskTier(tmp_path, 64 * MiB)
    keys = [bytes([i]) * 16 for i in range(12)]
    for key in keys:
        disk.put(key, RawCodec().encode(_chunk(key[0])))
    for attempt in range(5):
        store = TieredStore(_l1(), [disk])
        results: list[int] = []

        def read_all(store: TieredStore = store, results: list[int] = results) -> None:
            extents = [store.acquire(key) for key in keys]
            results.append(sum(e is not None for e in extents))

        assert store.lookup(keys) == len(keys)  # starts the prefetcher on every key
        readers = [threading.Thread(target=read_all) for _ in range(2)]
        for reader in readers:
            reader.start()
        for reader in readers:
            reader.join()
        assert results == [len(keys), len(keys)], attempt
        store.close()


def _tier_codec(tier: MemoryTier | DiskTier, key: bytes) -> int:
    return read_header(tier.get(key)).codec_id


def test_each_tier_gets_its_own_codec_and_promotion_decodes_it(tmp_path: Path) -> None:
    disk = DiskTier(tmp_path, 64 * MiB)
    lower = _lower()
    store = TieredStore(_l1(), [LowerTier(disk, codec=get_codec("kivi:bits=8")), LowerTier(lower)])
    pages = torch.randn(4, 2, 2, 64, 64, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    key = b"p" * 16
    assert store.put(key, pages, view="cpu-pages")
    assert store.flush()
    assert _tier_codec(disk, key) == KiviCodec.codec_id
    assert _tier_codec(lower, key) == RawCodec.codec_id  # the store's codec (raw) for a tier without its own
    store.l1.delete(key)
    extent = store.acquire(key)  # promoted from the disk (the first lower tier), decoded
    assert extent is not None
    try:
        assert EntryMeta.decode(extent.meta).view == "cpu-pages"  # so a later re-encode finds K and V again
        back = store.tensor_at(extent).clone()
    finally:
        store.release(key, extent)
    assert not torch.equal(back, pages)  # 8-bit, not bit-exact ...
    assert float((back.float() - pages.float()).abs().max()) < 0.05  # ... but close


def test_every_entry_written_down_names_its_key(tmp_path: Path) -> None:
    disk, lower = DiskTier(tmp_path, 64 * MiB), _lower()
    store = TieredStore(_l1(), [LowerTier(disk, codec=get_codec("kivi:bits=8")), LowerTier(lower)])
    opaque = torch.randn(4, 5, 6).to(torch.bfloat16)  # no K/V axes: kivi falls back to lossless
    entries = {b"c" * 16: (_chunk(8), "chunk"), b"o" * 16: (opaque, "opaque")}
    for key, (tensor, view) in entries.items():
        assert store.put(key, tensor, view=view)
    assert store.flush()
    for key in entries:
        assert read_header(disk.get(key)).key == key  # encode_for_tier, kivi or its fallback
        assert read_header(lower.get(key)).key == key  # raw: the header of encode_parts
    store.close()


def test_entries_stay_readable_after_the_codec_changes(tmp_path: Path) -> None:
    first = TieredStore(_l1(), [LowerTier(DiskTier(tmp_path, 64 * MiB), codec=get_codec("cachegen"))])
    chunks = {bytes([i]) * 16: _chunk(i) for i in range(3)}
    for key, chunk in chunks.items():
        first.put(key, chunk)
    assert first.flush()
    first.close()
    second = TieredStore(_l1(), [LowerTier(DiskTier(tmp_path, 64 * MiB), codec=get_codec("lossless"))])
    assert second.lookup(list(chunks)) == 3
    for key, chunk in chunks.items():
        back = second.get(key)
        assert back is not None and back.shape == chunk.shape
        assert float((back.float() - chunk.float()).abs().max()) < 0.2
    second.put(b"n" * 16, _chunk(9))
    assert second.flush()
    assert torch.equal(second.get(b"n" * 16), _chunk(9))


def test_a_raw_entry_reaches_disk_and_a_byte_tier_as_the_same_bytes(tmp_path: Path) -> None:
    disk, lower = DiskTier(tmp_path, 64 * MiB), _lower()  # takes parts / takes one buffer
    store = TieredStore(_l1(), [disk, lower])
    chunk = _chunk(3)
    store.put(b"r" * 16, chunk)
    assert store.flush()
    assert disk.get(b"r" * 16) == lower.get(b"r" * 16) == RawCodec().encode(chunk, key=b"r" * 16)


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="no idle scheduling class here")
@pytest.mark.parametrize(("priority", "policy"), [("idle", "SCHED_IDLE"), ("normal", "SCHED_OTHER")])
def test_the_writer_thread_runs_in_the_idle_class_unless_told(tmp_path: Path, priority: str, policy: str) -> None:
    store = TieredStore(_l1(), [DiskTier(tmp_path, 64 * MiB)], prefetch=False, writer_priority=priority,
                        prefetch_priority="normal")
    store.put(b"p" * 16, _chunk(4))
    assert store.flush()  # the writer has started its loop
    writer = next(t for t in store.threads if t.name == "kvmesh-writer")
    assert os.sched_getscheduler(writer.native_id) == getattr(os, policy)
    prefetcher = next(t for t in store.threads if t.name.startswith("kvmesh-prefetcher"))
    assert os.sched_getscheduler(prefetcher.native_id) == os.SCHED_OTHER  # as asked: the classes are independent
    store.close()


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="no idle scheduling class here")
def test_prefetch_threads_run_in_the_idle_class_when_asked(tmp_path: Path) -> None:
    disk = DiskTier(tmp_path, 64 * MiB)
    store = TieredStore(_l1(), [disk], prefetch_priority="idle")
    deadline = time.monotonic() + 10
    prefetchers = [t for t in store.threads if t.name.startswith("kvmesh-prefetcher")]
    while time.monotonic() < deadline and any(os.sched_getscheduler(t.native_id) != os.SCHED_IDLE
                                              for t in prefetchers):
        time.sleep(0.01)  # each thread sets its own class as it starts
    assert prefetchers and all(os.sched_getscheduler(t.native_id) == os.SCHED_IDLE for t in prefetchers)
    store.close()


def test_an_entry_stays_pinned_in_l1_until_its_disk_write_is_done(tmp_path: Path, gated_disk_writes) -> None:
    writing, finish = gated_disk_writes.writing, gated_disk_writes.finish
    disk = DiskTier(tmp_path, 64 * MiB)
    chunk_bytes = _chunk(0).numel() * 2
    store = TieredStore(_l1(4 * chunk_bytes), [disk], prefetch=False)
    first = b"a" * 16
    store.put(first, _chunk(0))
    assert writing.wait(30)
    for i in range(1, 8):  # more than L1 holds: everything but the chunk being written may be evicted
        store.put(bytes([i]) * 16, _chunk(i))
    assert store.l1.contains(first) and not disk.contains(first)
    finish.set()
    assert store.flush()
    assert disk.get(first) == RawCodec().encode(_chunk(0), key=first)


def test_a_lookup_names_each_chunks_tier_and_the_record_says_where_a_lost_one_went(tmp_path: Path) -> None:
    """L1 evicts to a disk tier that evicts in turn: the lookup credits the disk with what it holds, and the
    record of a chunk lost by both says so, tier by tier, oldest first."""
    chunk_bytes = _chunk(0).numel() * 2
    disk = DiskTier(tmp_path, 3 * chunk_bytes + 4096)  # three entries (and their headers) at most
    store = TieredStore(_l1(2 * chunk_bytes), [LowerTier(disk, "write_through")], prefetch=False)
    keys = [bytes([i]) * 16 for i in range(6)]
    for i, key in enumerate(keys):  # each store evicts the oldest from L1 (two fit) and from disk (three fit)
        store.put(key, _chunk(i))
    located = store.locate(keys[3:])
    assert located.hits == 3 and located.found_in == {0: "disk"} and located.unavailable == []
    history = store.evictions.history(keys[0])
    assert [(g.tier, g.what) for g in history] == [("l1", "evicted"), ("disk", "evicted")]
    assert history[0].ago >= history[1].ago >= 0
    assert [(g.tier, g.what) for g in store.evictions.history(keys[3])] == [("l1", "evicted")]
    store.put(keys[0], _chunk(0))  # stored again: its record is gone
    assert store.evictions.history(keys[0]) == []


def test_a_store_the_write_queue_had_no_room_for_is_recorded_against_the_tier_it_was_meant_for(
        tmp_path: Path) -> None:
    disk = DiskTier(tmp_path, 64 * MiB)
    store = TieredStore(_l1(), [LowerTier(disk, "write_behind")], write_queue_bytes=1)  # no entry fits the queue
    store.put(b"q" * 16, _chunk(7))
    assert store.flush() and not disk.contains(b"q" * 16)
    assert [(g.tier, g.what) for g in store.evictions.history(b"q" * 16)] == [
        ("disk", "not written (the write queue was full)")]


def test_describe_says_where_each_entry_is_its_bytes_age_and_codec(tmp_path: Path) -> None:
    chunk_bytes = _chunk(0).numel() * 2
    disk = DiskTier(tmp_path, 64 * MiB)
    store = TieredStore(_l1(2 * chunk_bytes), [LowerTier(disk, "write_through", codec=get_codec("lossless"))],
                        prefetch=False)
    keys = [bytes([i]) * 16 for i in range(3)]
    for i, key in enumerate(keys):  # the first leaves L1 for the disk tier (two fit in L1)
        store.put(key, _chunk(i))
    on_disk, in_l1, _ = store.describe(keys)
    assert on_disk is not None and on_disk.tier == "disk" and on_disk.codec == "lossless"
    assert on_disk.nbytes == os.path.getsize(disk._path(keys[0])) and on_disk.age >= 0
    assert in_l1 is not None and (in_l1.tier, in_l1.nbytes, in_l1.codec) == ("l1", chunk_bytes, "raw")
    assert store.describe([b"z" * 16]) == [None]
