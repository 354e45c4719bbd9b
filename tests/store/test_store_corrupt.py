"""A damaged entry below L1 is found by the codec's own checks when the store promotes it: a miss,
deleted from its tier and counted (the tiers add no checksum of their own).  So is another key's valid
entry in its place: the codec header names the key each entry was written for."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest
import torch

from kvmesh.codecs import get_codec
from kvmesh.codecs.base import read_header
from kvmesh.store import LowerTier, TieredStore
from kvmesh.store.types import NullObserver
from kvmesh.tiers import disk
from kvmesh.tiers.disk import DiskTier
from kvmesh.tiers.memory import MemoryTier
from kvmesh.tiers.redis import RedisTier
from redis_servers import RedisServer

MiB = 1024 * 1024
KEY = b"d" * 16
OTHER = b"e" * 16  # another chunk, whose valid entry ends up under KEY


class Faults(NullObserver):
    def __init__(self) -> None:
        self.faults: list[tuple[str, str]] = []

    def tier_fault(self, tier: str, action: str) -> None:
        self.faults.append((tier, action))


def _chunk() -> torch.Tensor:
    return torch.randn(4, 2, 64, 2, 32, generator=torch.Generator().manual_seed(7)).to(torch.bfloat16)


def _damaged(raw: bytes, damage: str) -> bytes:
    data = bytearray(raw)
    if damage == "flip_payload_byte":
        data[-5000] ^= 0x01
    elif damage == "flip_header_byte":
        data[10] ^= 0x01
    elif damage == "truncate":
        data = data[:len(data) // 2]
    elif damage == "foreign":
        data = bytearray(os.urandom(len(data)))
    else:
        data = bytearray()
    return bytes(data)


DAMAGES = ["flip_payload_byte", "flip_header_byte", "truncate", "foreign", "empty"]


def _stored(tier: object, observer: Faults) -> TieredStore:
    store = TieredStore(MemoryTier(4 * MiB, memoryview(bytearray(4 * MiB))), [tier], observer=observer,
                        prefetch=False)
    assert store.put(KEY, _chunk())
    assert store.flush()
    store.l1.delete(KEY)
    return store


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_disk_file_is_a_miss_deleted_and_counted(tmp_path: Path, damage: str) -> None:
    tier, observer = DiskTier(tmp_path, 64 * MiB), Faults()
    store = _stored(tier, observer)
    path = tmp_path / KEY.hex()[:2] / (KEY.hex() + disk.SUFFIX)
    path.write_bytes(_damaged(path.read_bytes(), damage))
    assert store.get(KEY) is None
    assert not path.exists() and not tier.contains(KEY)
    assert observer.faults == [("disk", "corrupt")]
    assert store.put(KEY, _chunk()) and store.flush()  # stored again, whole
    store.l1.delete(KEY)
    assert torch.equal(store.get(KEY).view(torch.uint8), _chunk().view(torch.uint8))
    store.close()


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_redis_value_is_a_miss_deleted_and_counted(redis_server: RedisServer, damage: str) -> None:
    tier, observer = RedisTier(redis_server.url, namespace=f"c{uuid.uuid4().hex[:8]}"), Faults()
    store = _stored(tier, observer)
    raw = redis_server.client()
    head = tier.redis_key(KEY)
    raw.set(head, _damaged(raw.get(head), damage))
    assert store.get(KEY) is None
    assert raw.keys(f"{head}*") == []
    assert observer.faults == [("redis", "corrupt")]
    store.close()


def _other_chunk() -> torch.Tensor:
    return torch.randn(4, 2, 64, 2, 32, generator=torch.Generator().manual_seed(8)).to(torch.bfloat16)


def _both_stored(tier: object, observer: Faults, codec: str) -> TieredStore:
    """KEY and OTHER written down to ``tier`` (encoded with ``codec``), neither left in L1."""
    lower = LowerTier(tier, codec=get_codec(codec))  # type: ignore[arg-type]
    store = TieredStore(MemoryTier(4 * MiB, memoryview(bytearray(4 * MiB))), [lower], observer=observer,
                        prefetch=False)
    assert store.put(KEY, _chunk()) and store.put(OTHER, _other_chunk())
    assert store.flush()
    store.l1.delete(KEY)
    store.l1.delete(OTHER)
    return store


@pytest.mark.parametrize("codec", ["raw", "lossless"])
def test_a_disk_file_holding_another_keys_valid_entry_is_a_miss_deleted_and_counted(
        tmp_path: Path, codec: str) -> None:
    tier, observer = DiskTier(tmp_path, 64 * MiB), Faults()
    store = _both_stored(tier, observer, codec)
    path, other = (tmp_path / k.hex()[:2] / (k.hex() + disk.SUFFIX) for k in (KEY, OTHER))
    path.write_bytes(other.read_bytes())  # copied by hand: a valid entry, of OTHER
    assert read_header(path.read_bytes()).key == OTHER
    assert store.get(KEY) is None
    assert not path.exists() and not tier.contains(KEY)
    assert observer.faults == [("disk", "corrupt")]
    assert torch.equal(store.get(OTHER).view(torch.uint8), _other_chunk().view(torch.uint8))  # its own still is
    assert store.put(KEY, _chunk()) and store.flush()  # stored again, its own
    store.l1.delete(KEY)
    assert torch.equal(store.get(KEY).view(torch.uint8), _chunk().view(torch.uint8))
    store.close()


@pytest.mark.parametrize("codec", ["raw", "lossless"])
def test_a_redis_value_holding_another_keys_valid_entry_is_a_miss_deleted_and_counted(
        redis_server: RedisServer, codec: str) -> None:
    tier, observer = RedisTier(redis_server.url, namespace=f"c{uuid.uuid4().hex[:8]}"), Faults()
    store = _both_stored(tier, observer, codec)
    raw = redis_server.client()
    head = tier.redis_key(KEY)
    value = raw.get(tier.redis_key(OTHER))
    assert read_header(value).key == OTHER  # inline: the codec's entry as it is
    raw.set(head, value)
    assert store.get(KEY) is None
    assert raw.keys(f"{head}*") == []
    assert observer.faults == [("redis", "corrupt")]
    assert torch.equal(store.get(OTHER).view(torch.uint8), _other_chunk().view(torch.uint8))
    store.close()


def _from_a_newer_kvmesh(raw: bytes, change: str) -> bytes:
    """An intact entry as a newer kvmesh could write it: another format version, or an unknown codec id."""
    import struct

    import xxhash

    from kvmesh.codecs.base import read_header

    data = bytearray(raw)
    if change == "format":
        data[4:6] = struct.pack("<H", 9)
        return bytes(data)
    data[6] = 200  # the codec id (after magic and version); the header checksum recomputed as a writer would
    header_end = read_header(raw).size - 4
    data[header_end:header_end + 4] = struct.pack("<I", xxhash.xxh32_intdigest(bytes(data[:header_end])))
    return bytes(data)


@pytest.mark.parametrize("change", ["format", "codec"])
def test_an_entry_of_a_newer_kvmesh_is_a_miss_left_in_place_and_not_offered_again(tmp_path: Path,
                                                                                  change: str) -> None:
    """A rolling upgrade: what this node cannot read stays for the nodes that can, and costs no waiting."""
    tier, observer = DiskTier(tmp_path, 64 * MiB), Faults()
    store = _stored(tier, observer)
    path = next(p for p in tmp_path.rglob("*") if p.is_file() and KEY.hex() in p.name)
    path.write_bytes(_from_a_newer_kvmesh(path.read_bytes(), change))
    assert store.lookup([KEY]) == 1  # on disk: this node does not know yet that it cannot read it
    assert store.acquire(KEY) is None  # a miss
    assert path.exists() and tier.contains(KEY)  # left in place: not damage
    assert ("disk", "unreadable") in observer.faults and ("disk", "corrupt") not in observer.faults
    assert store.lookup([KEY]) == 0  # no longer offered: a request does not wait on a promotion that fails
