"""Eviction policy, kept apart from the medium it evicts from.

The policy only orders keys; the tier decides which of them may go (a pinned
entry may not) and frees the bytes.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from itertools import islice


class LRUPolicy:
    """Least recently used first."""

    def __init__(self) -> None:
        self._order: OrderedDict[bytes, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, key: bytes) -> bool:
        return key in self._order

    def add(self, key: bytes) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def touch(self, key: bytes) -> None:
        if key in self._order:
            self._order.move_to_end(key)

    def remove(self, key: bytes) -> None:
        self._order.pop(key, None)

    def candidates(self) -> Iterator[bytes]:
        """Keys from the first to evict to the last, taken lazily: safe to remove while iterating.

        An eviction usually needs the first key or few; copying the whole order (every entry of a full L1,
        under its lock, on every store) made each store O(entries).  Keys are read in growing prefixes and
        each yielded once, so taking ``k`` keys past ``p`` kept (pinned) ones costs O(k + p) amortized.
        """
        yielded: set[bytes] = set()
        width = 16
        while True:
            covered_all = width >= len(self._order)  # this prefix holds every key there is now
            fresh = [key for key in islice(self._order, width) if key not in yielded]
            for key in fresh:
                if key in self._order:  # not removed by the caller meanwhile
                    yielded.add(key)
                    yield key
            if covered_all:
                return
            width *= 2
