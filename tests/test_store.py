"""TieredStore over a real L1 and a second in-memory tier standing in for a slower one."""

import torch

from kvmesh.codecs import RawCodec
from kvmesh.store import TieredStore
from kvmesh.tiers.memory import MemoryTier

MiB = 1024 * 1024


def _store(l1_bytes: int = 4 * MiB) -> tuple[TieredStore, MemoryTier]:
    lower = MemoryTier(16 * MiB, memoryview(bytearray(16 * MiB)), name="l2")
    return TieredStore(MemoryTier(l1_bytes, memoryview(bytearray(l1_bytes))), [lower]), lower


def _chunk(seed: int) -> torch.Tensor:
    return torch.randn(4, 2, 64, 2, 32, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


def test_put_writes_through_and_get_returns_the_same_bits() -> None:
    store, lower = _store()
    chunk = _chunk(1)
    assert store.put(b"k" * 16, chunk)
    assert torch.equal(store.get(b"k" * 16).view(torch.uint8), chunk.view(torch.uint8))
    encoded = lower.get(b"k" * 16)
    assert torch.equal(RawCodec().decode(encoded), chunk)


def test_lookup_spans_tiers_and_stops_at_first_miss() -> None:
    store, lower = _store()
    keys = [bytes([i]) * 16 for i in range(4)]
    for i, key in enumerate(keys[:3]):
        store.put(key, _chunk(i))
    store.l1.delete(keys[1])  # only the lower tier holds chunk 1 now
    assert store.lookup(keys) == 3
    lower.delete(keys[0])
    assert store.lookup(keys) == 3  # L1 still holds chunk 0
    store.l1.delete(keys[0])
    assert store.lookup(keys) == 0


def test_a_hit_in_the_lower_tier_is_promoted() -> None:
    store, _ = _store(l1_bytes=1 * MiB)  # L1 holds only a couple of chunks (128 KiB each ... 8 fit)
    chunks = {bytes([i]) * 16: _chunk(i) for i in range(20)}
    for key, chunk in chunks.items():
        store.put(key, chunk)
    first = bytes([0]) * 16
    assert not store.l1.contains(first)  # evicted from L1 ...
    assert torch.equal(store.get(first), chunks[first])  # ... served from below ...
    assert store.l1.contains(first)  # ... and promoted


def test_a_corrupt_lower_entry_becomes_a_miss_and_is_deleted() -> None:
    store, lower = _store()
    key = b"c" * 16
    store.put(key, _chunk(5))
    store.l1.delete(key)
    damaged = bytearray(lower.get(key))
    damaged[-1] ^= 1
    lower.delete(key)
    lower.put(key, bytes(damaged))
    assert store.get(key) is None
    assert not lower.contains(key)
