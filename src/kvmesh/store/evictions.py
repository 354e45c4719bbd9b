"""Which chunks L1 evicted, and when: what lets a lookup say that a missing chunk was stored once.

A bounded record (the newest ``capacity`` evictions); a chunk stored again leaves it.  Told of every eviction by
L1 under L1's lock, so it only appends to an ordered dict under a lock of its own.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable


class EvictionLog:
    def __init__(self, capacity: int = 65536, clock: Callable[[], float] = time.time) -> None:
        self.capacity = capacity
        self._clock = clock
        self._lock = threading.Lock()
        self._evicted: OrderedDict[bytes, float] = OrderedDict()

    def record(self, key: bytes) -> None:
        with self._lock:
            self._evicted[key] = self._clock()
            self._evicted.move_to_end(key)
            while len(self._evicted) > self.capacity:
                self._evicted.popitem(last=False)

    def forget(self, key: bytes) -> None:
        with self._lock:
            self._evicted.pop(key, None)

    def seconds_since(self, key: bytes) -> float | None:
        """How long ago L1 evicted ``key`` (None: not among the evictions remembered)."""
        with self._lock:
            when = self._evicted.get(key)
        return None if when is None else max(0.0, self._clock() - when)
