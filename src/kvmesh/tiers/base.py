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

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


@runtime_checkable
class Tier(Protocol):
    name: str

    def contains(self, key: bytes) -> bool: ...

    def lookup(self, keys: Sequence[bytes]) -> int:
        """How many of ``keys``, from the first, are present."""
        ...

    def get(self, key: bytes) -> bytes | None: ...

    def put(self, key: bytes, data: bytes | memoryview) -> bool: ...

    def delete(self, key: bytes) -> bool: ...

    def stats(self) -> TierStats: ...


@runtime_checkable
class PartialIndexed(Protocol):
    """A tier that can say which partial chunks it stores under a parent key.

    A partial chunk's key covers its exact tokens, so a prompt that continues
    them must enumerate a parent's partial children to find it (``kvmesh.partials``).
    ``add_partial`` is called only after the child entry was stored in this tier;
    ``partials`` returns only children the tier still holds.  Both turn the tier's
    own faults into a miss (False, ``[]``), counted in ``stats().errors``.
    """

    def add_partial(self, parent: bytes, child: bytes, tokens: int) -> bool: ...

    def partials(self, parent: bytes) -> list[tuple[bytes, int]]: ...
