"""What left which tier, and when: what lets a lookup say that a missing chunk was stored once.

L1's evictions, a disk tier's evictions and entries dropped as corrupt when read back are recorded per key and
tier (the newest ``capacity`` keys); a chunk stored again leaves the record.  Told under the tiers' own locks,
so it only updates an ordered dict under a lock of its own.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Gone:
    """One tier lost a chunk: ``what`` happened (``evicted``, ``dropped as corrupt``) ``ago`` seconds ago."""

    tier: str
    what: str
    ago: float


class EvictionLog:
    def __init__(self, capacity: int = 65536, clock: Callable[[], float] = time.time) -> None:
        self.capacity = capacity
        self._clock = clock
        self._lock = threading.Lock()
        self._gone: OrderedDict[bytes, dict[str, tuple[str, float]]] = OrderedDict()

    def record(self, key: bytes, tier: str = "l1", what: str = "evicted") -> None:
        with self._lock:
            events = self._gone.get(key)
            if events is None:
                events = self._gone[key] = {}
            else:
                self._gone.move_to_end(key)
            events[tier] = (what, self._clock())
            while len(self._gone) > self.capacity:
                self._gone.popitem(last=False)

    def forget(self, key: bytes) -> None:
        with self._lock:
            self._gone.pop(key, None)

    def history(self, key: bytes) -> list[Gone]:
        """Where ``key`` went, oldest first (empty: not among the keys remembered)."""
        with self._lock:
            events = dict(self._gone.get(key, {}))
        now = self._clock()
        return [Gone(tier, what, max(0.0, now - when))
                for tier, (what, when) in sorted(events.items(), key=lambda item: item[1][1])]
