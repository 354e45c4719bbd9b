"""on_reuse admission: a lower tier takes only chunks that two or more lookups asked for.

A chunk that one prompt computed and nobody asked for again is not worth a Redis round trip;
counting the lookups that missed it tells the ones that recur.  The count is bounded (oldest first out).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence

from kvmesh.store.types import LowerTier

MAX_TRACKED = 1_000_000
REUSE_LOOKUPS = 2


class Admission:
    """Lookups per missed key, and which lower tiers admit which keys."""

    def __init__(self, lower: Sequence[LowerTier], limit: int = MAX_TRACKED) -> None:
        self._counting = any(t.admission == "on_reuse" for t in lower)
        self._limit = limit
        self._lock = threading.Lock()
        self._asked: OrderedDict[bytes, int] = OrderedDict()

    def note_asked(self, keys: Sequence[bytes]) -> None:
        """Lookups asked for ``keys`` (not in L1)."""
        if not self._counting:
            return
        with self._lock:
            for key in keys:
                self._asked[key] = self._asked.get(key, 0) + 1
                self._asked.move_to_end(key)
            while len(self._asked) > self._limit:
                self._asked.popitem(last=False)

    def admits(self, target: LowerTier, key: bytes) -> bool:
        if target.admission == "all":
            return True
        with self._lock:
            return self._asked.get(key, 0) >= REUSE_LOOKUPS
