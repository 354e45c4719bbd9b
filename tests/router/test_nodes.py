"""The router's side of a node daemon, against real daemons: finding an engine's daemon, and the probe."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import torch

from kvmesh.client import KVMeshClient
from kvmesh.config import KVMeshConfig
from kvmesh.entry import EntryMeta
from kvmesh.keys import PartKeys, chunk_keys, model_namespace
from kvmesh.router.nodes import EngineKeys, NodeLink, find_node

IDENTITY, LAYOUT, CHUNK = "router-test-model", "L4.H2.D32.bfloat16.pages16.chunk", 128
NAMESPACE = model_namespace(IDENTITY, LAYOUT, "tenant")


def _config(tmp_path: Path, **extra: object) -> KVMeshConfig:
    return KVMeshConfig.from_mapping({"socket_dir": str(tmp_path / "sock"), "instance": f"r-{uuid.uuid4().hex[:6]}",
                                      "l1_size": "32MiB", "l1_prefault": False, "http_port": 0, **extra})


def _record(port: int | None = 8123, model: str = "/models/demo", **extra: object) -> dict[str, object]:
    record: dict[str, object] = {"role": "scheduler", "model": model, "fingerprint": IDENTITY,
                                 "layout_fingerprint": LAYOUT, "namespace": NAMESPACE.hex(), "chunk_size": CHUNK,
                                 "partial_chunks": True, **extra}
    if port is not None:
        record["api_port"] = port
    return record


def _chunks(keys) -> list[torch.Tensor]:
    return [torch.randn(4, 2, k.num_tokens, 2, 32).to(torch.bfloat16) for k in keys]


def _store_with_parents(client: KVMeshClient, keys, parents) -> None:
    """As the connector stores: a partial chunk names the chunk before it, so a longer prompt finds it."""
    chunks = _chunks(keys)
    slots = client.reserve(keys, [EntryMeta("bfloat16", tuple(c.shape)) for c in chunks], parents)
    for slot, chunk in zip(slots, chunks):
        slot.tensor.copy_(chunk)
    client.commit(slots)


def test_a_local_engines_daemon_is_found_by_the_port_its_scheduler_registered(tmp_path: Path) -> None:
    first, second = _config(tmp_path), _config(tmp_path)
    links: dict[str, NodeLink] = {}
    with KVMeshClient(first, engine=_record(8123)), KVMeshClient(second, engine=_record(8124)):
        link, keys = find_node(first, "http://127.0.0.1:8124", "/models/demo", None, links)  # type: ignore[misc]
        assert link.instance == second.instance and keys.api_port == 8124 and keys.namespace == NAMESPACE
        assert find_node(first, "http://127.0.0.1:8125", "/models/demo", None, links) is None
        # a remote engine's daemon is not guessed: it is named, or the engine gets no cache credit
        assert find_node(first, "http://10.1.2.3:8124", "/models/demo", None, links) is None
        named = find_node(first, "http://10.1.2.3:8000", "/models/demo", first.instance, links)
        assert named is not None and named[0].instance == first.instance
        for link in links.values():
            link.close()
        for config in (first, second):
            with KVMeshClient(config, check_config=False) as client:
                client.shutdown_daemon()


def test_the_probe_counts_the_prefix_a_node_holds_and_moves_nothing(tmp_path: Path) -> None:
    """Entries only on disk (a restarted daemon): the probe counts them as below L1 and promotes none, and
    the daemon's lookup metrics do not count it; an engine's lookup then starts their promotion."""
    config = _config(tmp_path, disk_path=str(tmp_path / "disk"))
    tokens = list(range(1000, 1000 + 3 * CHUNK + 50))
    keys = chunk_keys(tokens, NAMESPACE, CHUNK, include_partial=True)  # three full chunks and a partial one
    with KVMeshClient(config) as client:
        client.put(keys[:2], _chunks(keys[:2]))
        client.flush()
        client.shutdown_daemon()
    engine = EngineKeys.from_record(_record())
    link = NodeLink(config, config.instance)
    with KVMeshClient(config) as client:
        try:
            lookups = client.metrics().get("kvmesh_lookups_total", 0.0)
            held = link.held(engine, tokens, NAMESPACE)
            assert (held.tokens, held.below_l1) == (2 * CHUNK, 2 * CHUNK)
            time.sleep(0.5)
            assert client.stats()["l1"]["entries"] == 0  # nothing promoted
            assert client.metrics().get("kvmesh_lookups_total", 0.0) == lookups
            _store_with_parents(client, keys[2:], [None, keys[2].digest])  # the rest, the partial naming its parent
            assert link.held(engine, tokens, NAMESPACE).tokens == len(tokens)
            assert link.held(engine, tokens + [7], NAMESPACE).tokens == len(tokens)  # a longer prompt
            assert link.held(engine, tokens[:-1], NAMESPACE).tokens == 3 * CHUNK  # the partial does not fit
            assert client.lookup(keys) == len(keys)  # an engine's lookup promotes what is below L1
            deadline = time.monotonic() + 10
            while client.stats()["l1"]["entries"] < len(keys) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert client.stats()["l1"]["entries"] == len(keys)
        finally:
            link.close()
            client.shutdown_daemon()


def test_a_chunk_counts_only_where_every_part_is_stored_and_a_hybrids_hit_ends_at_a_state(tmp_path: Path) -> None:
    config = _config(tmp_path)
    tokens = list(range(5000, 5000 + 2 * CHUNK))
    keys = chunk_keys(tokens, NAMESPACE, CHUNK)
    ranks = EngineKeys.from_record(_record(tp_world=2))
    link = NodeLink(config, config.instance)
    with KVMeshClient(config) as client:
        try:
            client.put([PartKeys(0, 2).key(k) for k in keys], _chunks(keys))
            assert link.held(ranks, tokens, NAMESPACE).tokens == 0  # rank 1's heads are missing
            client.put([PartKeys(1, 2).key(k) for k in keys[:1]], _chunks(keys[:1]))
            assert link.held(ranks, tokens, NAMESPACE).tokens == CHUNK
            client.put(keys, _chunks(keys))
            hybrid = EngineKeys.from_record(_record(state_block=CHUNK))
            # stored to the end, but a hybrid's hit ends at a block's end before the last token
            assert link.held(hybrid, tokens, NAMESPACE).tokens == CHUNK
        finally:
            link.close()
            client.shutdown_daemon()


def test_a_cache_salt_is_named_only_with_the_engines_tenant_salt() -> None:
    engine = EngineKeys.from_record(_record())
    assert engine.namespace_for("anything", None) == NAMESPACE
    assert engine.namespace_for("tenant", "user-7") == model_namespace(IDENTITY, LAYOUT, "tenant|salt:user-7")
    assert engine.namespace_for("another tenant", "user-7") is None  # the router cannot name those chunks
