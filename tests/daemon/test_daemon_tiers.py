"""The daemon with disk and Redis tiers: warm restart, a Redis shared by two daemons, faults as misses.

Partial chunks too: found from their parent key after a restart, from another daemon, with Redis down.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from kvmesh import wire
from kvmesh.client import KVMeshClient
from kvmesh.config import KVMeshConfig
from kvmesh.daemon.service import NodeDaemon
from kvmesh.entry import EntryMeta
from kvmesh.integrations.vllm.planner import match_prefix
from kvmesh.keys import chunk_keys, model_namespace, namespace_root
from redis_servers import RedisServer, free_port

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
    _a_new_daemon_serves(config, keys, chunks)


def _a_new_daemon_serves(config: KVMeshConfig, keys, chunks) -> None:
    """A daemon started now, with an empty L1, finds every chunk below it and loads the same bytes."""
    with KVMeshClient(config) as client:
        try:
            assert client.stats()["l1"]["entries"] == 0
            assert client.lookup(keys) == len(keys)
            assert _same(client.get(keys), chunks)
        finally:
            client.shutdown_daemon()


def test_written_on_eviction_nothing_goes_to_disk_until_a_graceful_shutdown_writes_it_all(tmp_path: Path) -> None:
    config = _config(tmp_path, disk_path=str(tmp_path / "disk"), disk_write_policy="on_eviction")
    keys = chunk_keys(list(range(3000, 3512)), NS, 128)
    chunks = _chunks(keys, seed=5)
    with KVMeshClient(config) as client:
        client.put(keys, chunks)
        time.sleep(0.5)
        assert client.stats()["disk"]["stores"] == 0  # L1 has room: nothing is due
        client.shutdown_daemon()  # graceful: what only L1 held goes down now
    _a_new_daemon_serves(config, keys, chunks)


def test_l1_full_by_value_a_prompt_loses_its_end_and_by_lru_its_head(tmp_path: Path) -> None:
    """Chunks of 1 MiB in an 8 MiB L1: prompt A (6 chunks), read back, then prompt B (4 chunks) needs room."""
    reachable = {}
    for policy in ("value", "lru"):
        config = _config(tmp_path / policy, l1_size="8MiB", l1_eviction=policy)
        prompt_a = chunk_keys(list(range(10_000, 10_000 + 6 * 1024)), NS, 1024)
        prompt_b = chunk_keys(list(range(50_000, 50_000 + 4 * 1024)), NS, 1024)
        with KVMeshClient(config) as client:
            try:
                client.put(prompt_a, _chunks(prompt_a, seed=1))
                assert _same(client.get(prompt_a), _chunks(prompt_a, seed=1))  # a load touches them in order
                client.put(prompt_b, _chunks(prompt_b, seed=2))
                assert client.stats()["l1"]["evictions"] == 2  # room for B: two of A's chunks go
                reachable[policy] = client.lookup(prompt_a)
            finally:
                client.shutdown_daemon()
    assert reachable["value"] == 4  # A lost its last two chunks: its first four are still served
    assert reachable["lru"] == 0  # LRU took A's first chunk, the least recently touched: nothing reachable


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


def test_redis_down_then_back_never_fails_a_request(tmp_path: Path, redis_server_factory) -> None:
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
    from kvmesh.store.build import build_lower_tiers

    shared = build_lower_tiers(KVMeshConfig.from_mapping(
        {"disk_path": str(tmp_path / "a"), "redis_url": "redis://127.0.0.1:1/0", "codec": "lossless"}))
    assert shared[0].codec is shared[1].codec
    apart = build_lower_tiers(KVMeshConfig.from_mapping(
        {"disk_path": str(tmp_path / "b"), "redis_url": "redis://127.0.0.1:1/0", "disk_codec": "fp8"}))
    assert (apart[0].codec.name, apart[1].codec.name) == ("fp8", "raw")


# ------------------------------------------------------------ partial chunks
@contextmanager
def _daemon(config: KVMeshConfig) -> Iterator[KVMeshClient]:
    """A real daemon serving in this process (no spawn to wait for on a busy machine), and a client of it."""
    daemon = NodeDaemon(config)
    thread = threading.Thread(target=daemon.serve_forever, daemon=True)
    thread.start()
    try:
        with KVMeshClient(KVMeshConfig.from_mapping({"autostart_daemon": False}, base=config)) as client:
            yield client
    finally:
        daemon.shutdown()
        thread.join(timeout=60)


def _store_prompt(client: KVMeshClient, tokens: list[int], chunk_size: int = 128,
                  seed: int = 0) -> tuple[list, list[torch.Tensor]]:
    """Store a prompt's chunks as the connector does: the partial tail names its parent."""
    keys = chunk_keys(tokens, NS, chunk_size, include_partial=True)
    chunks = _chunks(keys, seed)
    metas = [EntryMeta("bfloat16", tuple(c.shape)) for c in chunks]
    parents = [(keys[i - 1].digest if i else namespace_root(NS)) if k.num_tokens < chunk_size else None
               for i, k in enumerate(keys)]
    slots = client.reserve(keys, metas, parents)
    for slot, chunk in zip(slots, chunks):
        slot.tensor.copy_(chunk)
    client.commit(slots)
    return keys, chunks


def _raw_partials(client: KVMeshClient, keys) -> list[list]:
    reply = client._call(wire.Lookup([wire.ChunkRef(k.digest, k.num_tokens) for k in keys]))
    return [[p.key.hex(), p.tokens, p.resident] for p in reply.partials]


def test_a_restarted_daemon_offers_the_partial_on_disk_to_the_next_turn(tmp_path: Path) -> None:
    config = _config(tmp_path, disk_path=str(tmp_path / "disk"), prefetch=False)
    turn_1 = list(range(7000, 7000 + 2 * 128 + 45))
    turn_2 = turn_1 + list(range(100, 300))
    with _daemon(config) as client:
        keys_1, chunks_1 = _store_prompt(client, turn_1)
        assert client.flush()["disk"]["stores"] == 3
    with _daemon(config) as client:  # a new daemon, an empty L1, the same disk
        assert client.stats()["l1"]["entries"] == 0
        keys_2 = chunk_keys(turn_2, NS, 128, include_partial=True)
        assert _raw_partials(client, keys_2) == [[keys_1[2].hex, 45, False]]  # on disk, not in L1
        found = client.lookup_with_partials(keys_2)
        assert found.hits == 2 and [(p.digest, p.tokens, p.resident) for p in found.partials] == [
            (keys_1[2].digest, 45, False)]
        hit_keys = match_prefix(turn_2, keys_2, found.hits, [(p.digest, p.tokens) for p in found.partials], NS)
        assert hit_keys[-1].end == len(turn_1)  # down to the token
        assert _same(client.get(hit_keys), chunks_1)
        assert _raw_partials(client, keys_2) == [[keys_1[2].hex, 45, True]]  # acquire promoted it


def test_a_daemon_sharing_only_redis_is_offered_the_partial_another_stored(tmp_path: Path,
                                                                          redis_server: RedisServer) -> None:
    namespace = f"ns-{uuid.uuid4().hex[:6]}"
    first = _config(tmp_path / "a", redis_url=redis_server.url, redis_namespace=namespace)
    second = _config(tmp_path / "b", redis_url=redis_server.url, redis_namespace=namespace)
    tokens = list(range(8000, 8000 + 128 + 77))
    longer = chunk_keys(tokens + [1, 2, 3], NS, 128, include_partial=True)
    with _daemon(first) as a, _daemon(second) as b:
        assert b.lookup_with_partials(longer).partials == []
        keys, chunks = _store_prompt(a, tokens, seed=3)
        a.flush()
        found = b.lookup_with_partials(longer)
        assert found.hits == 1 and [(p.digest, p.tokens) for p in found.partials] == [(keys[1].digest, 77)]
        assert _same(b.get(keys), chunks)
        assert b.stats()["l1"]["entries"] == 2  # promoted into b's own L1


def test_with_redis_down_the_lookup_still_offers_what_l1_holds(tmp_path: Path) -> None:
    config = _config(tmp_path, redis_url=f"redis://127.0.0.1:{free_port()}", redis_timeout_seconds=0.5)
    tokens = list(range(9000, 9000 + 128 + 10))
    with _daemon(config) as client:
        keys, _ = _store_prompt(client, tokens)
        client.flush()
        longer = chunk_keys(tokens + [5] * 20, NS, 128, include_partial=True)
        assert _raw_partials(client, longer) == [[keys[1].hex, 10, True]]
        assert client.lookup_with_partials(chunk_keys(list(range(50, 400)), NS, 128)).partials == []
        assert client.stats()["redis"]["errors"] >= 1


def test_an_engine_at_work_holds_writes_behind_back_and_an_observer_does_not(tmp_path: Path) -> None:
    """While an engine talks to the daemon, nothing is written down; once it is quiet, everything is."""
    import time

    config = _config(tmp_path, disk_path=str(tmp_path / "disk"), prefetch=False, write_quiet_seconds=0.3)
    keys = chunk_keys(list(range(3000, 3000 + 3 * 128)), NS, 128)
    with _daemon(config) as observer, \
            KVMeshClient(KVMeshConfig.from_mapping({"autostart_daemon": False}, base=config),
                         engine={"role": "scheduler", "model": "m", "fingerprint": "fp"}) as engine:
        engine.put(keys, _chunks(keys))
        until = time.monotonic() + 1.0
        while time.monotonic() < until:  # an engine asking every 20 ms, as a scheduler does
            engine.lookup(keys)
            time.sleep(0.02)
        assert observer.stats()["disk"]["stores"] == 0
        for _ in range(20):  # an observer's questions do not hold the writer back
            observer.stats()
        assert observer.flush()["disk"]["stores"] == 3


def test_a_lookup_that_misses_holds_writes_behind_until_the_engine_stores_what_it_computed(tmp_path: Path) -> None:
    """A cold prefill sends nothing for seconds; its missed chunks keep the writer waiting until committed."""
    import time

    config = _config(tmp_path, disk_path=str(tmp_path / "disk"), prefetch=False, write_quiet_seconds=0.1)
    stored = chunk_keys(list(range(4000, 4000 + 128)), NS, 128)
    computing = chunk_keys(list(range(5000, 5000 + 2 * 128)), NS, 128)
    with _daemon(config) as observer, \
            KVMeshClient(KVMeshConfig.from_mapping({"autostart_daemon": False}, base=config),
                         engine={"role": "scheduler", "model": "m", "fingerprint": "fp"}) as engine:
        engine.put(stored, _chunks(stored))  # queued to be written down
        assert engine.lookup(computing) == 0  # a miss: the engine computes these two chunks now
        time.sleep(0.6)  # long past the quiet period
        assert observer.stats()["disk"]["stores"] == 0
        engine.put(computing, _chunks(computing, seed=1))  # what the prefill computed, committed
        assert observer.flush()["disk"]["stores"] == 3


def _health(port: int) -> tuple[int, dict]:
    import json
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_health_says_a_tier_is_down_while_requests_are_still_served(tmp_path: Path, redis_server_factory) -> None:
    from kvmesh.bench.servers import free_port

    server: RedisServer = redis_server_factory()
    port = free_port()
    config = _config(tmp_path, redis_url=server.url, redis_timeout_seconds=0.5, http_port=port)
    keys = chunk_keys(list(range(7000, 7512)), NS, 128)
    with KVMeshClient(config) as client:
        try:
            code, report = _health(port)
            assert (code, report["status"], report["tiers"]["redis"]["state"]) == (200, "ok", "up")
            server.stop()
            for _ in range(4):  # each lookup below L1 fails against the stopped server: the breaker opens
                assert client.lookup(keys) == 0
            code, report = _health(port)
            assert (code, report["status"], report["tiers"]["redis"]["state"]) == (200, "degraded", "circuit_open")
            assert report["problems"] == ["tier redis is circuit open"] and report["l1"]["state"] == "up"
        finally:
            client.shutdown_daemon()
