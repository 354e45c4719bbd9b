"""What every storage tier offers: a small protocol over immutable, content-addressed entries.

Entries are keyed by chunk digests (``bytes``) and never change once written,
so putting a key that exists is a no-op.  Every tier counts what happens to it
in a :class:`TierStats`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Protocol, runtime_checkable


@dataclass(slots=True)
class TierStats:
    entries: int = 0
    bytes_used: int = 0
    capacity: int = 0
    hits: int = 0
    misses: int = 0
    stores: int = 0
    rejected_stores: int = 0
    evictions: int = 0
    errors: int = 0
    pinned_entries: int = 0  # L1: entries a user pinned (kept from eviction)
    pinned_bytes: int = 0

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class EntryInfo:
    """One stored entry as ``kvmesh explain`` shows it: where, how large, how old, how encoded."""

    tier: str
    nbytes: int
    # seconds: since stored (L1), since written or last read (disk: its mtime), since stored where a TTL tells
    # (Redis); -1: not known
    age: float
    codec: str  # "raw" in L1 (it holds what engines copy); below it as the entry's header names it, "?" unreadable


Buffer = bytes | memoryview
# what a put takes: one buffer, or parts whose concatenation is the entry (written as they lie, no copy)
Value = Buffer | Sequence[Buffer]


@runtime_checkable
class Tier(Protocol):
    """A tier below L1, batch first: the store moves several keys per call (one pipeline for Redis).

    Values are a codec's self-checking entries (``codecs.base``); a tier adds no framing of its own.
    Each tier turns its own I/O faults into misses, counted in ``stats().errors``; what it raises
    (``OSError``, ``CorruptEntry``) the store's guard turns into a miss too.
    """

    name: str

    def lookup(self, keys: Sequence[bytes]) -> int:
        """How many of ``keys``, from the first, are present."""
        ...

    def get_many(self, keys: Sequence[bytes]) -> list[Buffer | None]:
        """The entries of ``keys``, None where absent (or found damaged, then dropped and counted)."""
        ...

    def put_many(self, items: Sequence[tuple[bytes, Value]]) -> list[bool]:
        """Store entries (a key already there is left as it is); per item, whether it is now stored."""
        ...

    def delete(self, key: bytes) -> bool: ...

    def stats(self) -> TierStats: ...

    def close(self) -> None:
        """Let go of connections and files; the tier is not used afterwards."""
        ...


@runtime_checkable
class PartialIndexed(Protocol):
    """A tier that can say which partial chunks it stores under a parent key.

    A partial chunk's key covers its exact tokens, so a prompt that continues
    them must enumerate a parent's partial children to find it (``kvmesh.store.partials``).
    ``add_partial`` is called only after the child entry was stored in this tier;
    ``partials`` returns only children the tier still holds.  Both turn the tier's
    own faults into a miss (False, ``[]``), counted in ``stats().errors``.
    """

    def add_partial(self, parent: bytes, child: bytes, tokens: int) -> bool: ...

    def partials(self, parent: bytes) -> list[tuple[bytes, int]]: ...
