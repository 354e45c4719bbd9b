"""The daemon with disk and Redis tiers: warm restart, a Redis shared by two daemons, faults as misses."""

from __future__ import annotations

import uuid
from pathlib import Path

import torch
from redis_servers import RedisServer, redis_server, redis_server_factory  # noqa: F401 - fixtures

from kvmesh.client import KVMeshClient
from kvmesh.config import KVMeshConfig
from kvmesh.keys import chunk_keys, model_namespace

NS = model_namespace("tier-test", "L4.H2.D32.bfloat16")


def _config(tmp_path: Path, **extra: object) -> KVMeshConfig:
    return KVMeshConfig.from_mapping({"socket_dir": str(tmp_path / "sock"), "instance": f"t-{uuid.uuid4().hex[:6]}",
                                      "l1_size": "32MiB", "l1_prefault": False, "http_port": 0, **extra})


def _chunks(keys, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 2, k.num_tokens, 2, 32, generator=generator).to(torch.bfloat16) for k in keys]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x.view(torch.uint8), y.view(torch.uint8)) for x, y in zip(a, b))


def test_a_restarted_daemon_finds_what_is_on_disk(tmp_path: Path) -> None:
    config = _config(tmp_path, disk_path=str(tmp_path / "disk"))
    keys = chunk_keys(list(range(1000, 1512)), NS, 128)
    chunks = _chunks(keys)
    with KVMeshClient(config) as client:
        client.put(keys, chunks)
        assert client.flush()["disk"]["stores"] == len(keys)
        client.shutdown_daemon()
    with KVMeshClient(config) as client:  # a new daemon, an empty L1
        try:
            assert client.stats()["l1"]["entries"] == 0
            assert client.lookup(keys) == len(keys)
            assert _same(client.get(keys), chunks)
        finally:
            client.shutdown_daemon()


def test_two_daemons_share_what_either_stored_through_redis(tmp_path: Path, redis_server: RedisServer) -> None:
    namespace = f"ns-{uuid.uuid4().hex[:6]}"
    first = _config(tmp_path / "a", redis_url=redis_server.url, redis_namespace=namespace)
    second = _config(tmp_path / "b", redis_url=redis_server.url, redis_namespace=namespace,
                     disk_path=str(tmp_path / "b-disk"))
    keys = chunk_keys(list(range(3000, 3384)), NS, 128)
    chunks = _chunks(keys, seed=4)
    with KVMeshClient(first) as a, KVMeshClient(second) as b:
        try:
            assert b.lookup(keys) == 0
            a.put(keys, chunks)
            a.flush()
            assert b.lookup(keys) == len(keys)
            assert _same(b.get(keys), chunks)
            assert b.stats()["l1"]["entries"] == len(keys)  # promoted into b's own L1
        finally:
            a.shutdown_daemon()
            b.shutdown_daemon()


def test_redis_down_then_back_never_fails_a_request(tmp_path: Path, redis_server_factory) -> None:  # noqa: ANN001
    server: RedisServer = redis_server_factory()
    config = _config(tmp_path, redis_url=server.url, redis_timeout_seconds=0.5)
    keys = chunk_keys(list(range(5000, 5512)), NS, 128)
    chunks = _chunks(keys, seed=9)
    with KVMeshClient(config) as client:
        try:
            server.stop()
            client.put(keys[:2], chunks[:2])  # L1 takes them; Redis writes fail behind the request
            client.flush()
            assert client.lookup(keys) == 2  # L1 hits; the dead tier is a miss
            assert _same(client.get(keys[:2]), chunks[:2])
            errors = client.stats()["redis"]["errors"]
            assert errors >= 1
            server.start()
            client.delete(keys[:2])
            import time

            time.sleep(5.5)  # the breaker's reset period: the next call probes Redis again
            client.put(keys[2:], chunks[2:])
            client.flush()
            assert client.stats()["redis"]["stores"] >= 2
            assert client.lookup(keys[2:]) == 2
        finally:
            client.shutdown_daemon()


def test_tiers_with_one_codec_spec_share_the_codec_so_entries_are_encoded_once(tmp_path: Path) -> None:
    from kvmesh.server.daemon import build_lower_tiers

    shared = build_lower_tiers(KVMeshConfig.from_mapping(
        {"disk_path": str(tmp_path / "a"), "redis_url": "redis://127.0.0.1:1/0", "codec": "lossless"}))
    assert shared[0].codec is shared[1].codec
    apart = build_lower_tiers(KVMeshConfig.from_mapping(
        {"disk_path": str(tmp_path / "b"), "redis_url": "redis://127.0.0.1:1/0", "disk_codec": "fp8"}))
    assert (apart[0].codec.name, apart[1].codec.name) == ("fp8", "raw")
