"""TieredStore: L1 in shared memory in front of slower tiers that hold encoded bytes.

Lookup walks L1 then the lower tiers key by key and stops at the first chunk
found nowhere (a hit is always a prefix).  An entry enters through L1's
two-phase write and, once committed, is written through to the lower tiers in
their codec.  Acquiring an entry that only a lower tier holds promotes it into
L1 first, so readers always copy from shared memory.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvmesh.codecs import Codec, CorruptEntry, RawCodec, decode_any
from kvmesh.tensorbytes import tensor_bytes
from kvmesh.layout import DTYPES, dtype_name
from kvmesh.tiers.base import Tier, TierStats
from kvmesh.tiers.memory import Extent, MemoryTier, Reservation, ReserveStatus

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class TensorMeta:
    """dtype and shape of an L1 entry, kept beside it as a short string."""

    dtype: str
    shape: tuple[int, ...]

    def encode(self) -> str:
        return f"{self.dtype}:{','.join(map(str, self.shape))}"

    @classmethod
    def decode(cls, text: str) -> TensorMeta:
        dtype, _, shape = text.partition(":")
        if dtype not in DTYPES or not shape:
            raise ValueError(f"not a tensor description: {text!r}")
        return cls(dtype, tuple(int(part) for part in shape.split(",")))

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=DTYPES[self.dtype]).element_size()


class TieredStore:
    def __init__(self, l1: MemoryTier, lower: Sequence[Tier] = (), codec: Codec | None = None) -> None:
        if l1.buffer is None:
            raise ValueError("the store's L1 tier must hold its buffer")
        self.l1 = l1
        self.lower = list(lower)
        self.codec = codec or RawCodec()

    # ------------------------------------------------------------------ lookups
    def lookup(self, keys: Sequence[bytes]) -> int:
        count = self.l1.lookup(keys)
        for key in keys[count:]:
            if not any(tier.contains(key) for tier in self.lower):
                break
            count += 1
        return count

    # ------------------------------------------------------------------- writes
    def reserve(self, key: bytes, nbytes: int, meta: str = "") -> Reservation:
        if meta:
            TensorMeta.decode(meta)  # refuse a description we could not encode later
        return self.l1.reserve(key, nbytes, meta)

    def commit(self, key: bytes) -> None:
        self.l1.commit(key)
        if self.lower:
            self._write_through(key)

    def abort(self, key: bytes) -> None:
        self.l1.abort(key)

    def put(self, key: bytes, chunk: torch.Tensor) -> bool:
        """Store a tensor (a convenience for tests and tools; engines write into L1 directly)."""
        meta = TensorMeta(dtype_name(chunk.dtype), tuple(chunk.shape))
        reservation = self.reserve(key, meta.nbytes, meta.encode())
        if reservation.status is not ReserveStatus.OK:
            return reservation.status is ReserveStatus.EXISTS
        extent = reservation.extent
        self.l1.buffer[extent.offset:extent.offset + extent.nbytes] = tensor_bytes(chunk)
        self.commit(key)
        return True

    # -------------------------------------------------------------------- reads
    def acquire(self, key: bytes) -> Extent | None:
        extent = self.l1.acquire(key)
        if extent is None and self.lower and self._promote(key):
            extent = self.l1.acquire(key)
        return extent

    def release(self, key: bytes, extent: Extent) -> None:
        self.l1.release(key, extent)

    def get(self, key: bytes) -> torch.Tensor | None:
        extent = self.acquire(key)
        if extent is None:
            return None
        try:
            return self.tensor_at(extent).clone()
        finally:
            self.release(key, extent)

    def tensor_at(self, extent: Extent) -> torch.Tensor:
        """A tensor viewing an L1 extent in place (valid while the extent is pinned)."""
        meta = TensorMeta.decode(extent.meta)
        raw = torch.frombuffer(self.l1.buffer, dtype=torch.uint8, count=meta.nbytes, offset=extent.offset)
        return raw.view(DTYPES[meta.dtype]).view(meta.shape)

    def delete(self, key: bytes) -> bool:
        removed = self.l1.delete(key)
        for tier in self.lower:
            removed = tier.delete(key) or removed
        return removed

    def stats(self) -> dict[str, TierStats]:
        return {tier.name: tier.stats() for tier in [self.l1, *self.lower]}

    # ---------------------------------------------------------------- internals
    def _write_through(self, key: bytes) -> None:
        extent = self.l1.acquire(key)
        if extent is None:
            return
        try:
            encoded = self.codec.encode(self.tensor_at(extent))
        finally:
            self.l1.release(key, extent)
        for tier in self.lower:
            try:
                tier.put(key, encoded)
            except Exception:  # a failing lower tier must never fail a store
                log.warning("store to tier %s failed", tier.name, exc_info=True)

    def _promote(self, key: bytes) -> bool:
        for tier in self.lower:
            data = tier.get(key)
            if data is None:
                continue
            try:
                chunk = decode_any(data)
            except CorruptEntry as err:
                log.warning("tier %s: dropping corrupt entry %s: %s", tier.name, key.hex(), err)
                tier.delete(key)
                continue
            meta = TensorMeta(dtype_name(chunk.dtype), tuple(chunk.shape))
            reservation = self.l1.reserve(key, meta.nbytes, meta.encode())
            if reservation.status is ReserveStatus.EXISTS:
                return True
            if reservation.status is not ReserveStatus.OK:
                return False
            extent = reservation.extent
            self.l1.buffer[extent.offset:extent.offset + extent.nbytes] = tensor_bytes(chunk)
            self.l1.commit(key)
            return True
        return False

