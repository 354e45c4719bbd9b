"""Writing on eviction: L1 as the write-back cache of the tiers below it.

Why: writing every stored chunk through to disk costs I/O that grows with the prefill rate (on a GPU
server, gigabytes per second).  A chunk that stays in L1 need not be on disk until it leaves: with the
``on_eviction`` policy a chunk goes down only when it is about to leave L1, and at a graceful shutdown.

How: a committed chunk is *dirty* until written.  Once L1 has less free room than ``clean_fraction`` of it,
the writer keeps the chunks its eviction policy would take next, that much of them, written down: when an
eviction comes, its victims are already on disk.  A dirty chunk that L1 evicts anyway (stores faster than the disk)
is a dropped store, counted as ``evicted_unwritten``, never waited for.  A crash loses what was dirty; a
graceful shutdown (``flush``) writes it all.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from kvmesh.store.types import StoreObserver
from kvmesh.tiers.memory import MemoryTier

CLEAN_FRACTION = 0.25


class WriteBack:
    """Which L1 chunks the on-eviction tiers still need, and which of them are due now."""

    def __init__(self, l1: MemoryTier, observer: StoreObserver, clean_fraction: float = CLEAN_FRACTION) -> None:
        if not 0 < clean_fraction <= 1:
            raise ValueError(f"clean_fraction must be in (0, 1], got {clean_fraction}")
        self._l1 = l1
        self._observer = observer
        self._clean_bytes = int(clean_fraction * l1.capacity)
        self._lock = threading.Lock()
        self._dirty: set[bytes] = set()
        self._queued: set[bytes] = set()  # handed to the writer, not written yet

    def mark(self, key: bytes) -> None:
        """``key`` was committed to L1 and is not below it yet."""
        with self._lock:
            self._dirty.add(key)

    def evicted(self, key: bytes) -> None:
        """L1 let ``key`` go (called under L1's lock: cheap, and never calls back into L1)."""
        with self._lock:
            lost = key in self._dirty and key not in self._queued
            self._dirty.discard(key)
        if lost:
            self._observer.dropped_store("evicted_unwritten", key)

    def due(self, take: Callable[[bytes], bool]) -> int:
        """Hand ``take`` the dirty chunks among the next to be evicted, in eviction order; how many it took.

        Nothing is due while L1 has at least ``clean_fraction`` of its room free.  ``take`` returns False
        when the writer has no room for more now (they stay dirty and are due again).
        """
        if self._free() >= self._clean_bytes:
            return 0
        return self._hand_over(self._l1.next_to_evict(self._clean_bytes), take)

    def urgent(self) -> bool:
        """L1 is so nearly full that what is due must go down now, even while engines are being served."""
        return self._free() < self._clean_bytes // 2

    def _free(self) -> int:
        return self._l1.capacity - self._l1.used

    def drain(self, take: Callable[[bytes], bool]) -> int:
        """Hand over every dirty chunk (a graceful shutdown, or ``flush``)."""
        with self._lock:
            keys = list(self._dirty)
        return self._hand_over(keys, take)

    def written(self, key: bytes) -> None:
        """The writer is done with ``key`` (written, or failed and counted by the tier's guard)."""
        with self._lock:
            self._dirty.discard(key)
            self._queued.discard(key)

    @property
    def dirty(self) -> int:
        with self._lock:
            return len(self._dirty)

    def _hand_over(self, keys: list[bytes], take: Callable[[bytes], bool]) -> int:
        taken = 0
        for key in keys:
            with self._lock:
                if key not in self._dirty or key in self._queued:
                    continue
                self._queued.add(key)
            if not take(key):
                with self._lock:
                    self._queued.discard(key)
                break
            taken += 1
        return taken
