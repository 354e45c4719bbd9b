"""Writing pinned L1 entries down: encode each once per distinct codec, then one ``put_many`` per tier.

Shared by write-through (one entry, before the commit returns) and write-behind (what the queue held).
A raw entry goes down as the codec's header plus a view of the pinned extent: no copy of the chunk.
A partial chunk is indexed in a tier only after its entry's put there succeeded.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch

from kvmesh.codecs import Codec, RawCodec, encode_for_tier
from kvmesh.entry import EntryMeta
from kvmesh.store.guard import TierGuard
from kvmesh.store.partials import PartialIndex
from kvmesh.store.types import LowerTier, StoreObserver
from kvmesh.tiers.base import Buffer, PartialIndexed
from kvmesh.tiers.memory import Extent


@dataclass(frozen=True, slots=True)
class Pinned:
    """An L1 entry pinned for as long as it is being written down."""

    key: bytes
    extent: Extent


class TierWriter:
    """Encodes pinned entries and puts them into the lower tiers that admit them."""

    def __init__(self, tensor_at: Callable[[Extent], torch.Tensor], guard: TierGuard, observer: StoreObserver,
                 partial_index: PartialIndex, lost: Callable[..., None] | None = None) -> None:
        self._tensor_at = tensor_at
        self._guard = guard
        self._observer = observer
        self._partials = partial_index
        self._lost = lost  # told (key, tier, what) of each entry a tier did not take: a miss's explanation

    def write(self, entries: Sequence[Pinned], targets_for: Callable[[bytes], list[LowerTier]]) -> None:
        """Write each entry to ``targets_for(key)``; faults are misses (counted by the guard)."""
        batches: dict[int, tuple[LowerTier, list[tuple[bytes, tuple[Buffer, ...]]]]] = {}
        for entry in entries:
            targets = targets_for(entry.key)
            encoded: dict[int, tuple[Buffer, ...]] = {}
            for target in targets:
                codec = target.codec  # set for every tier by the store
                assert codec is not None
                if id(codec) not in encoded:
                    encoded[id(codec)] = self._encode(codec, entry)
                batches.setdefault(id(target), (target, []))[1].append((entry.key, encoded[id(codec)]))
        for target, items in batches.values():
            self._put(target, items)

    def _encode(self, codec: Codec, entry: Pinned) -> tuple[Buffer, ...]:
        """The entry's bytes as ``codec`` writes them, naming its key (checked when it is read back)."""
        meta = EntryMeta.decode(entry.extent.meta)
        started = time.perf_counter()
        chunk = self._tensor_at(entry.extent)
        if isinstance(codec, RawCodec):  # header + a view of the pinned extent
            parts: tuple[Buffer, ...] = tuple(codec.encode_parts(chunk, meta.view, entry.key))
            name = codec.name
        else:
            result = encode_for_tier(codec, chunk, meta.view, entry.key)
            parts, name = (result.data,), result.codec
        self._observer.encoded(name, meta.nbytes, sum(memoryview(p).nbytes for p in parts),
                               time.perf_counter() - started)
        return parts

    def _put(self, target: LowerTier, items: list[tuple[bytes, tuple[Buffer, ...]]]) -> None:
        tier = target.tier
        started = time.perf_counter()
        stored = self._guard.call(tier.name, "put", partial(tier.put_many, items), [False] * len(items))
        seconds = time.perf_counter() - started
        written = [(key, parts) for (key, parts), ok in zip(items, stored) if ok]
        if self._lost is not None and len(written) < len(items):
            for (key, _), ok in zip(items, stored):
                if not ok:
                    self._lost(key, tier.name, "not written (the tier refused it or failed)")
        if written:
            nbytes = sum(memoryview(p).nbytes for _, parts in written for p in parts)
            self._observer.tier_write(tier.name, nbytes, seconds)
        if isinstance(tier, PartialIndexed):
            for key, _ in written:
                parent = self._partials.parent_of(key)
                if parent is not None:  # a fault is the tier's: counted there, a later miss
                    tier.add_partial(parent[0], key, parent[1])
