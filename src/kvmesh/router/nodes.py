"""Which node daemon serves an engine, and how much of a prompt that node holds.

An engine's scheduler registers with its daemon what names its chunks (model fingerprint, page format,
chunk size, the HTTP port ``kvmesh serve`` gave it).  The router finds a local engine's daemon by that port
among the daemons of this user's socket directory, or by the instance named in ``--engine URL@instance``.
A daemon that cannot be reached is not an error: its engine is still used, with no credit for its cache.
"""

from __future__ import annotations

import dataclasses
import logging
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

from kvmesh import wire
from kvmesh.client import CacheFault, ConfigMismatch, KVMeshClient
from kvmesh.config import KVMeshConfig
from kvmesh.keys import ChunkKey, Namespace, PartKeys, chunk_keys, model_namespace

T = TypeVar("T")
log = logging.getLogger("kvmesh.router")

NODE_FAULTS = (CacheFault, ConfigMismatch, OSError)  # a node that cannot be asked costs routing quality only


class RouterConfigError(ValueError):
    """A router argument that cannot work (named in the message)."""


@dataclass(frozen=True, slots=True)
class EngineKeys:
    """What the engine's scheduler registered with its daemon: enough to name its chunks."""

    model: str
    model_identity: str
    layout_fingerprint: str
    namespace: Namespace  # the engine's default namespace (its tenant salt, no cache salt, no LoRA)
    chunk_size: int
    partial_chunks: bool
    tp_world: int = 1
    groups: int = 1
    state_block: int = 0  # models with recurrent state: hits end at a multiple of it, before the last token
    api_port: int | None = None

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> EngineKeys:
        return cls(str(record["model"]), str(record["fingerprint"]), str(record["layout_fingerprint"]),
                   Namespace(bytes.fromhex(str(record["namespace"]))), int(record["chunk_size"]),
                   bool(record.get("partial_chunks", True)), int(record.get("tp_world", 1)),
                   int(record.get("groups", 1)), int(record.get("state_block", 0)),
                   int(record["api_port"]) if record.get("api_port") is not None else None)

    def namespace_for(self, tenant_salt: str, cache_salt: str | None) -> Namespace | None:
        """The namespace of a request with ``cache_salt``; None where the router's tenant salt is not the
        engine's (it cannot name such a request's chunks)."""
        if not cache_salt:
            return self.namespace
        if model_namespace(self.model_identity, self.layout_fingerprint, tenant_salt) != self.namespace:
            return None
        return model_namespace(self.model_identity, self.layout_fingerprint, f"{tenant_salt}|salt:{cache_salt}")

    def keys(self, tokens: list[int], namespace: Namespace) -> list[ChunkKey]:
        return chunk_keys(tokens, namespace, self.chunk_size, include_partial=self.partial_chunks)


@dataclass(frozen=True, slots=True)
class Held:
    """The leading tokens of a prompt that a node holds, and how many of them are below its L1."""

    tokens: int = 0
    below_l1: int = 0


def _registered(records: list[dict[str, Any]], port: int | None, model: str | None) -> dict[str, Any] | None:
    """The scheduler record of the engine on ``port`` (or, without a port, the one serving ``model``)."""
    schedulers = [r for r in records if r.get("role") == "scheduler" and r.get("namespace")
                  and r.get("layout_fingerprint")]
    if port is not None:
        for record in schedulers:
            if record.get("api_port") == port:
                return record
    if model is not None:
        serving = [r for r in schedulers if r.get("model") == model]
        if len(serving) == 1:
            return serving[0]
    return None


def is_local(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    return host in ("localhost", "127.0.0.1", "::1", "0.0.0.0", socket.gethostname())


class NodeLink:
    """One node daemon, asked on the router's behalf (thread-safe; reconnects after a fault)."""

    def __init__(self, config: KVMeshConfig, instance: str) -> None:
        self.config = dataclasses.replace(config, instance=instance, autostart_daemon=False)
        self.instance = instance
        self._client: KVMeshClient | None = None
        self._lock = threading.Lock()

    def _connected(self) -> KVMeshClient:
        if self._client is None:
            self._client = KVMeshClient(self.config, check_config=False)
        return self._client

    def _call(self, action: Callable[[KVMeshClient], T]) -> T:
        """``action`` on this node's connection, one caller at a time; a fault drops the connection (the next
        call makes a new one) and goes to the caller."""
        with self._lock:
            try:
                return action(self._connected())
            except NODE_FAULTS:
                self._drop()
                raise

    def records(self) -> list[dict[str, Any]]:
        """The engines connected to this daemon, as they registered."""
        return self._call(lambda client: list(client.info().get("engines", [])))

    def pin(self, keys: list[ChunkKey], seconds: float) -> wire.PinEntriesReply:
        """Keep these entries in this node's L1 for ``seconds`` (``kvmesh prewarm --pin``)."""
        return self._call(lambda client: client.pin(keys, seconds))

    def unpin(self, keys: list[ChunkKey], every: bool = False) -> int:
        return self._call(lambda client: client.unpin(keys, every))

    def held(self, engine: EngineKeys, tokens: list[int], namespace: Namespace) -> Held:
        """The leading tokens of ``tokens`` this node holds for ``engine``: a probe, which moves nothing
        between tiers and is not counted as a lookup.  Every part (tensor-parallel rank, KV cache group)
        must hold a chunk for it to count, as in the engine's own lookup."""
        from kvmesh.integrations.vllm.planner import end_at_state, held_by_every_part, lookup_parts

        keys = engine.keys(tokens, namespace)
        if not keys:
            return Held()
        parts = PartKeys.every_part(engine.tp_world, engine.groups)
        per_part, found = self._call(lambda client: lookup_parts(client, tokens, keys, namespace, parts,
                                                                 count=False, prefetch=False))
        held = held_by_every_part(per_part)
        if engine.state_block:  # a hybrid model's hit ends at a stored state, as its scheduler cuts it
            end_at_state(held, len(tokens), engine.state_block)
        end = held[-1].end if held else 0
        below = set().union(*(result.below_l1 for result in found))
        below_tokens = sum(min(key.end, end) - key.start for index, key in enumerate(keys)
                           if index in below and key.start < end)
        return Held(end, below_tokens)

    def _drop(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def close(self) -> None:
        with self._lock:
            self._drop()


def local_instances(config: KVMeshConfig) -> list[str]:
    """The daemons of this user's socket directory (one socket per instance)."""
    directory = config.socket_path().parent
    if not directory.is_dir():
        return []
    return sorted(path.stem for path in directory.glob("*.sock"))


def find_node(config: KVMeshConfig, url: str, model: str | None, instance: str | None,
              links: dict[str, NodeLink]) -> tuple[NodeLink, EngineKeys] | None:
    """The daemon that serves the engine at ``url`` and what its scheduler registered, or None.

    ``instance`` names the daemon (``--engine URL@instance``); otherwise a local engine is found by its port
    among this user's daemons.  ``links`` keeps one link per daemon (engines may share one).
    """
    port = urlsplit(url).port
    candidates = [instance] if instance else (local_instances(config) if is_local(url) else [])
    for name in candidates:
        kept = links.get(name)
        link = kept or NodeLink(config, name)
        try:
            record = _registered(link.records(), port, model if instance else None)
        except NODE_FAULTS as err:
            log.info("kvmesh router: the daemon %r did not answer (%s)", name, err)
            record = None
        if record is not None:
            links[name] = link
            return link, EngineKeys.from_record(record)
        if kept is None:  # another engine's daemon: let go of its connection and segment
            link.close()
    return None
