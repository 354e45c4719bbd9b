"""Partial chunks findable from their parent key: the bounded index, and TieredStore over real tiers.

The store tests use a real DiskTier on tmp_path and a real redis-server; a
"restart" is a new TieredStore (new, empty L1) over the same disk directory, and
"another node" is a second store with its own L1 sharing only the Redis.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest
import torch

from kvmesh.integrations.vllm.planner import match_prefix
from kvmesh.keys import ChunkKey, chunk_keys, model_namespace, namespace_root
from kvmesh.store import LowerTier, TieredStore
from kvmesh.store.partials import PartialIndex
from kvmesh.tiers.disk import DiskTier
from kvmesh.tiers.memory import MemoryTier
from kvmesh.tiers.redis import RedisTier
from redis_servers import RedisServer

MiB = 1024 * 1024
NS = model_namespace("partials-test", "L2.H2.D16.bfloat16")
CHUNK = 64


def _key(i: int) -> bytes:
    return i.to_bytes(16, "little")


# ----------------------------------------------------------------- PartialIndex
def test_index_lists_children_newest_first_and_knows_their_parent() -> None:
    index = PartialIndex()
    index.add(_key(1), _key(10), 5)
    index.add(_key(1), _key(11), 7)
    index.add(_key(2), _key(20), 3)
    assert index.children(_key(1)) == [(_key(11), 7), (_key(10), 5)]
    assert index.parent_of(_key(20)) == (_key(2), 3)
    assert index.parent_of(_key(99)) is None
    assert index.children(_key(3)) == []
    assert len(index) == 3


def test_index_is_bounded_per_parent_keeping_the_newest() -> None:
    index = PartialIndex(per_parent=3, total=100)
    for i in range(10):
        index.add(_key(1), _key(100 + i), i + 1)
    assert index.children(_key(1)) == [(_key(109), 10), (_key(108), 9), (_key(107), 8)]
    assert index.parent_of(_key(100)) is None
    assert len(index) == 3


def test_index_is_bounded_in_all_dropping_the_parent_added_to_least_recently() -> None:
    index = PartialIndex(per_parent=2, total=4)
    index.add(_key(1), _key(10), 1)
    index.add(_key(2), _key(20), 1)
    index.add(_key(1), _key(11), 1)  # parent 1 is now the most recently added to
    index.add(_key(3), _key(30), 1)
    assert index.add(_key(3), _key(31), 1) == [_key(2)]  # five children: parent 2 goes, whole
    assert index.children(_key(2)) == [] and index.parent_of(_key(20)) is None
    assert set(index.parents()) == {_key(1), _key(3)}
    assert len(index) == 4


def test_discard_forgets_children_and_an_empty_parent() -> None:
    index = PartialIndex()
    index.add(_key(1), _key(10), 1)
    index.add(_key(1), _key(11), 2)
    assert index.discard(_key(1), [_key(10)])
    assert not index.discard(_key(1), [_key(10)])
    assert index.discard(_key(1), [_key(11)])
    assert index.parents() == []
    with pytest.raises(ValueError):
        index.add(_key(1), _key(12), 0)


# ------------------------------------------------------------ TieredStore, real tiers
def _l1(size: int = 8 * MiB) -> MemoryTier:
    return MemoryTier(size, memoryview(bytearray(size)))


def _chunk(key: ChunkKey, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(2, 2, key.num_tokens, 2, 16, generator=generator).to(torch.bfloat16)


def _store_prompt(store: TieredStore, tokens: list[int], seed: int = 0) -> list[tuple[ChunkKey, torch.Tensor]]:
    """Store every chunk of ``tokens``, the partial tail indexed under its parent, as the connector does."""
    keys = chunk_keys(tokens, NS, CHUNK, include_partial=True)
    stored = []
    for i, key in enumerate(keys):
        chunk = _chunk(key, seed + i)
        parent = (keys[i - 1].digest if i else namespace_root(NS)) if key.num_tokens < CHUNK else None
        assert store.put(key.digest, chunk, parent=parent, tokens=key.num_tokens)
        stored.append((key, chunk))
    assert store.flush()
    return stored


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.view(torch.uint8)


def test_a_restarted_store_offers_a_partial_stored_on_disk_and_loads_it_bit_exact(tmp_path: Path) -> None:
    tokens = list(range(1000, 1000 + 2 * CHUNK + 40))  # two full chunks and a 40-token tail
    first = TieredStore(_l1(), [DiskTier(tmp_path, 64 * MiB)])
    stored = _store_prompt(first, tokens)
    first.close()
    (_, _, (tail, tail_chunk)) = stored

    store = TieredStore(_l1(), [DiskTier(tmp_path, 64 * MiB)], prefetch=False)  # new L1, same disk
    assert not store.l1.contains(tail.digest)
    assert store.partials(stored[1][0].digest) == [(tail.digest, 40)]
    extent = store.acquire(tail.digest)
    assert extent is not None and store.l1.contains(tail.digest)
    assert torch.equal(_bits(store.tensor_at(extent)), _bits(tail_chunk))
    store.release(tail.digest, extent)


def test_the_lookup_of_a_partial_below_l1_starts_promoting_it(tmp_path: Path) -> None:
    tokens = list(range(2000, 2000 + CHUNK + 10))
    first = TieredStore(_l1(), [DiskTier(tmp_path, 64 * MiB)])
    (head, _), (tail, tail_chunk) = _store_prompt(first, tokens)
    first.close()
    store = TieredStore(_l1(), [DiskTier(tmp_path, 64 * MiB)])
    assert store.partials(head.digest, fits=10) == [(tail.digest, 10)]
    deadline = time.monotonic() + 10
    while not store.l1.contains(tail.digest) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert store.l1.contains(tail.digest)  # promoted by the prefetcher, before any acquire
    assert torch.equal(_bits(store.get(tail.digest)), _bits(tail_chunk))
    assert store.partials(head.digest, fits=9) == [(tail.digest, 10)]  # offered even when it cannot fit


def test_the_next_turn_hits_the_stored_tail_down_to_the_token(tmp_path: Path) -> None:
    turn_1 = list(range(3000, 3000 + 2 * CHUNK + 25))
    turn_2 = turn_1 + list(range(9000, 9000 + CHUNK + 7))  # the same tokens, continued
    first = TieredStore(_l1(), [DiskTier(tmp_path, 64 * MiB)])
    stored = _store_prompt(first, turn_1)
    first.close()

    store = TieredStore(_l1(), [DiskTier(tmp_path, 64 * MiB)], prefetch=False)
    keys = chunk_keys(turn_2, NS, CHUNK, include_partial=True)
    hits = store.lookup([k.digest for k in keys])
    assert hits == 2  # the third chunk of turn 2 was never stored whole
    offered = store.partials(keys[hits - 1].digest, sum(k.num_tokens for k in keys[hits:]))
    found = match_prefix(turn_2, keys, hits, offered, NS)
    assert found[-1].end == len(turn_1)  # every token of turn 1, not just its whole chunks
    assert found[-1].digest == stored[2][0].digest
    assert torch.equal(_bits(store.get(found[-1].digest)), _bits(stored[2][1]))


def test_a_partial_evicted_from_disk_is_not_offered(tmp_path: Path) -> None:
    tokens = list(range(4000, 4000 + CHUNK + 30))
    disk = DiskTier(tmp_path, 64 * MiB)
    store = TieredStore(_l1(), [disk], prefetch=False)
    (head, _), (tail, _) = _store_prompt(store, tokens)
    store.l1.delete(tail.digest)
    assert store.partials(head.digest) == [(tail.digest, 30)]  # disk still holds it
    disk.delete(tail.digest)
    assert store.partials(head.digest) == []


def test_a_store_that_shares_only_redis_finds_the_partial_another_stored(redis_server: RedisServer) -> None:
    namespace = f"p{uuid.uuid4().hex[:8]}"
    tokens = list(range(5000, 5000 + CHUNK + 50))
    node_a = TieredStore(_l1(), [RedisTier(redis_server.url, namespace=namespace)])
    (head, _), (tail, tail_chunk) = _store_prompt(node_a, tokens, seed=7)
    node_b = TieredStore(_l1(), [RedisTier(redis_server.url, namespace=namespace)], prefetch=False)
    assert node_b.partials(head.digest) == [(tail.digest, 50)]
    assert torch.equal(_bits(node_b.get(tail.digest)), _bits(tail_chunk))
    assert node_b.l1.contains(tail.digest)
    node_a.close()
    node_b.close()


def test_redis_down_leaves_l1_and_disk_candidates_and_counts_the_fault(tmp_path: Path,
                                                                     redis_server_factory) -> None:
    server: RedisServer = redis_server_factory()
    redis_tier = RedisTier(server.url, namespace="down", timeout_seconds=0.5)
    store = TieredStore(_l1(), [LowerTier(DiskTier(tmp_path, 64 * MiB)), LowerTier(redis_tier)], prefetch=False)
    tokens = list(range(6000, 6000 + CHUNK + 20))
    (head, _), (tail, _) = _store_prompt(store, tokens)
    server.stop()
    errors = redis_tier.stats().errors
    store.l1.delete(tail.digest)
    assert store.partials(head.digest) == [(tail.digest, 20)]  # from the disk's index; Redis is a miss
    assert redis_tier.stats().errors > errors
    assert store.partials(_key(12345)) == []
    store.close()


def test_a_reserved_partial_is_indexed_when_committed_and_forgotten_when_aborted() -> None:
    store = TieredStore(_l1())
    kept, dropped = _key(10), _key(11)
    for key in (kept, dropped):
        assert store.reserve(key, 64, "", parent=_key(1), tokens=3).extent is not None
    assert store.partials(_key(1)) == []  # nothing committed yet
    store.commit(kept)
    store.abort(dropped)
    assert store.partials(_key(1)) == [(kept, 3)]
    assert store.partial_index.parent_of(dropped) is None
    with pytest.raises(ValueError):
        store.reserve(_key(12), 64, "", parent=_key(1), tokens=0)
