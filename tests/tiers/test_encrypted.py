"""Encryption at rest (``tiers/encrypted.py``): around a real disk tier and a real Redis."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest

from kvmesh.config import ConfigError, KVMeshConfig
from kvmesh.tiers.base import PartialIndexed
from kvmesh.tiers.disk import DiskTier
from kvmesh.tiers.encrypted import EncryptedTier, Keyring, KeyringError, load_keyring, parse_keys
from kvmesh.tiers.redis import RedisTier
from redis_servers import RedisServer

OLD, NEW = os.urandom(32), os.urandom(32)
PLAIN = b"KV of a prompt, " * 4096  # 64 KiB


def _disk(path: Path, *keys: bytes) -> EncryptedTier:
    return EncryptedTier(DiskTier(path, 64 << 20), Keyring(list(keys)))


def test_what_lies_on_disk_is_ciphertext_and_reads_back_exactly(tmp_path: Path) -> None:
    tier = _disk(tmp_path, NEW)
    assert tier.put_many([(b"k" * 16, [PLAIN[:1000], PLAIN[1000:]])]) == [True]  # parts, as the writer sends
    [stored] = [p.read_bytes() for p in tmp_path.rglob("*.kv")]
    assert b"KV of a prompt" not in stored and len(stored) > len(PLAIN)
    assert tier.get_many([b"k" * 16]) == [PLAIN]
    assert tier.lookup([b"k" * 16]) == 1 and isinstance(tier, PartialIndexed)  # the index passes through


def test_an_altered_or_moved_entry_is_a_miss_counted_and_deleted(tmp_path: Path) -> None:
    tier = _disk(tmp_path, NEW)
    tier.put_many([(b"a" * 16, PLAIN), (b"b" * 16, PLAIN[::-1])])
    files = {p.name: p for p in tmp_path.rglob("*.kv")}
    a, b = files[(b"a" * 16).hex() + ".kv"], files[(b"b" * 16).hex() + ".kv"]
    valid_a = a.read_bytes()
    b.write_bytes(valid_a)  # a valid entry of another key, planted under b
    damaged = bytearray(valid_a)
    damaged[-100] ^= 1  # one bit of the ciphertext
    a.write_bytes(bytes(damaged))
    assert tier.get_many([b"a" * 16, b"b" * 16]) == [None, None]
    assert tier.stats().errors == 2
    assert tier.lookup([b"a" * 16]) == 0 and tier.lookup([b"b" * 16]) == 0  # both dropped


def test_an_entry_written_without_the_key_is_a_miss(tmp_path: Path) -> None:
    DiskTier(tmp_path, 64 << 20).put(b"p" * 16, PLAIN)  # planted in the clear
    tier = _disk(tmp_path, NEW)
    assert tier.get_many([b"p" * 16]) == [None]
    assert tier.stats().errors == 1


def test_rotation_reads_old_entries_writes_new_ones_and_keeps_what_it_cannot_read(tmp_path: Path) -> None:
    _disk(tmp_path, OLD).put_many([(b"o" * 16, PLAIN)])
    rotated = _disk(tmp_path, NEW, OLD)  # the new key writes, the old one still reads
    assert rotated.get_many([b"o" * 16]) == [PLAIN]
    rotated.put_many([(b"n" * 16, PLAIN)])
    only_old = _disk(tmp_path, OLD)  # a node that has not rotated yet
    assert only_old.get_many([b"n" * 16]) == [None]
    assert only_old.stats().errors == 1
    assert only_old.lookup([b"n" * 16]) == 1  # kept: the nodes that hold the new key read it
    assert rotated.get_many([b"n" * 16]) == [PLAIN]


def test_through_redis_as_well(redis_server: RedisServer) -> None:
    tier = EncryptedTier(RedisTier(redis_server.url, namespace=f"enc{os.getpid()}"), Keyring([NEW]))
    assert tier.put_many([(b"r" * 16, PLAIN)]) == [True]
    raw = tier.inner.get(b"r" * 16)
    assert raw is not None and b"KV of a prompt" not in bytes(raw)
    assert tier.get_many([b"r" * 16]) == [PLAIN]


def test_keys_are_checked_where_they_are_given_and_never_shown(tmp_path: Path) -> None:
    good = base64.b64encode(NEW).decode()
    assert parse_keys(f"{good}, {OLD.hex()}", "x") == [NEW, OLD]
    with pytest.raises(KeyringError, match="key 2 is neither base64 nor hex of 32 bytes"):
        parse_keys(f"{good},c2hvcnQ=", "x")
    with pytest.raises(ConfigError, match="encryption_keys") as caught:
        KVMeshConfig.from_mapping({"encryption_keys": "not-a-key-at-all"})
    assert "not-a-key-at-all" not in str(caught.value)
    key_file = tmp_path / "keys"
    key_file.write_text(f"# the first encrypts\n{good}\n{OLD.hex()}\n")
    key_file.chmod(0o644)
    with pytest.raises(KeyringError, match="readable by others"):
        load_keyring("", str(key_file))
    key_file.chmod(0o600)
    keyring = load_keyring("", str(key_file))
    assert keyring is not None and keyring.keys == [NEW, OLD]
    assert load_keyring("", "") is None
    shown = KVMeshConfig.from_mapping({"encryption_keys": good}).shown_dict()  # kvmesh config show, stats
    assert shown["encryption_keys"] == "***" and good not in str(shown)


def test_a_daemon_with_a_keyring_encrypts_what_it_writes_down(tmp_path: Path) -> None:
    import torch

    from kvmesh.client import KVMeshClient
    from kvmesh.keys import chunk_keys, model_namespace

    config = KVMeshConfig.from_mapping({
        "socket_dir": str(tmp_path / "sock"), "instance": "enc", "l1_size": "16MiB", "l1_prefault": False,
        "http_port": 0, "disk_path": str(tmp_path / "disk"), "encryption_keys": base64.b64encode(NEW).decode()})
    keys = chunk_keys(list(range(4096)), model_namespace("m", "L4.bf16"), 1024)
    chunks = [torch.full((4, 2, 1024, 2, 32), float(i + 1), dtype=torch.bfloat16) for i in range(len(keys))]
    with KVMeshClient(config) as client:
        try:
            client.put(keys, chunks)
            assert client.flush()["disk"]["stores"] == len(keys)
        finally:
            client.shutdown_daemon()
    files = list((tmp_path / "disk").rglob("*.kv"))
    assert len(files) == len(keys)
    assert all(f.read_bytes()[:4] == b"KVMX" for f in files)
    with KVMeshClient(config) as client:  # a restarted daemon with the same key reads them back
        try:
            assert client.lookup(keys) == len(keys)
            assert all(torch.equal(a, b) for a, b in zip(client.get(keys), chunks))
        finally:
            client.shutdown_daemon()
