"""Leases: entries pinned in L1 for another process, given back by it or when they expire.

vLLM's scheduler pins the chunks it promised a load of, and its worker (another process) reads
them and releases the lease.  A worker that never does (a crashed engine) must not pin L1
forever, so every lease has a deadline; an expired one is released and counted by the caller.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from kvmesh.tiers.memory import Extent

Pin = tuple[bytes, Extent]


@dataclass(frozen=True, slots=True)
class Lease:
    deadline: float
    pins: tuple[Pin, ...]


class LeaseTable:
    """Leases by id; thread-safe.  ``release`` unpins one entry (the store's)."""

    def __init__(self, release: Callable[[bytes, Extent], None], seconds: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if seconds <= 0:
            raise ValueError(f"a lease lasts a positive time, got {seconds} seconds")
        self._release = release
        self._seconds = seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._leases: dict[str, Lease] = {}

    def grant(self, pins: Sequence[Pin]) -> str:
        """A new lease over ``pins`` (already pinned by the caller); its id."""
        lease_id = secrets.token_hex(8)
        with self._lock:
            self._leases[lease_id] = Lease(self._clock() + self._seconds, tuple(pins))
        return lease_id

    def give_back(self, lease_id: str) -> bool:
        """Unpin a lease's entries; False if no such lease is held (expired, or another daemon's)."""
        with self._lock:
            lease = self._leases.pop(lease_id, None)
        if lease is None:
            return False
        self._unpin(lease)
        return True

    def expire(self) -> int:
        """Unpin every lease past its deadline; how many there were."""
        now = self._clock()
        with self._lock:
            expired = [lease_id for lease_id, lease in self._leases.items() if lease.deadline < now]
            leases = [self._leases.pop(lease_id) for lease_id in expired]
        for lease in leases:
            self._unpin(lease)
        return len(leases)

    def __len__(self) -> int:
        with self._lock:
            return len(self._leases)

    def _unpin(self, lease: Lease) -> None:
        for key, extent in lease.pins:
            self._release(key, extent)
