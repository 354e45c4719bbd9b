"""The store's data: what a lookup found, how a lower tier is fed, who is told (entries: ``kvmesh.entry``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol

from kvmesh.codecs import Codec
from kvmesh.tiers.base import Tier

WritePolicy = Literal["write_behind", "write_through", "on_eviction"]
Admission = Literal["all", "on_reuse"]
Priority = Literal["idle", "normal"]


@dataclass(frozen=True, slots=True)
class Located:
    """What a lookup found: ``hits`` consecutive chunks in some tier; ``below_l1`` indexes not in L1 yet."""

    hits: int
    below_l1: list[int]
    found_in: dict[int, str] = field(default_factory=dict)  # below_l1 index -> the tier that holds it
    unavailable: list[str] = field(default_factory=list)  # lower tiers not asked (circuit open) or that failed


@dataclass(frozen=True, slots=True)
class LowerTier:
    """A tier below L1 and how entries reach it."""

    tier: Tier
    write_policy: WritePolicy = "write_behind"
    admission: Admission = "all"  # on_reuse: only chunks that two or more lookups asked for
    codec: Codec | None = None  # None: the store's codec


class StoreObserver(Protocol):
    """Where the store reports what it did (the daemon's metrics)."""

    def tier_read(self, tier: str, nbytes: int, seconds: float) -> None: ...

    def tier_write(self, tier: str, nbytes: int, seconds: float) -> None: ...

    def dropped_store(self, reason: str, key: bytes | None = None) -> None: ...

    def encoded(self, codec: str, raw_bytes: int, encoded_bytes: int, seconds: float) -> None: ...

    def decoded(self, raw_bytes: int, seconds: float) -> None: ...

    def tier_fault(self, tier: str, action: str) -> None:
        """A tier call that failed (I/O fault, corrupt entry) and became a miss; not a dropped store."""
        ...


class NullObserver:
    """An observer that ignores everything (a store without metrics)."""

    def tier_read(self, tier: str, nbytes: int, seconds: float) -> None:
        pass

    def tier_write(self, tier: str, nbytes: int, seconds: float) -> None:
        pass

    def dropped_store(self, reason: str, key: bytes | None = None) -> None:
        pass

    def encoded(self, codec: str, raw_bytes: int, encoded_bytes: int, seconds: float) -> None:
        pass

    def decoded(self, raw_bytes: int, seconds: float) -> None:
        pass

    def tier_fault(self, tier: str, action: str) -> None:
        pass
