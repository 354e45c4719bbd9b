"""The tier-fault guard: a tier's I/O fault or corrupt entry becomes a miss, counted and logged once.

Only :class:`OSError` and :class:`~kvmesh.codecs.base.CorruptEntry` are faults of the cache; anything
else a tier raises is a bug and goes through.  Faults are counted by the tier and the action that
failed (``disk_lookup``, ``redis_get``); a failed put is also a dropped store, since an entry that was
meant for the tier did not reach it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TypeVar

from kvmesh.codecs.base import CorruptEntry
from kvmesh.store.types import StoreObserver

log = logging.getLogger("kvmesh.store")

T = TypeVar("T")


class TierGuard:
    """Runs tier calls for the store; thread-safe."""

    def __init__(self, observer: StoreObserver) -> None:
        self._observer = observer
        self._lock = threading.Lock()
        self._warned: set[tuple[str, str]] = set()

    def call(self, tier: str, action: str, call: Callable[[], T], default: T) -> T:
        """``call()``, or ``default`` if it raised a cache fault (logged once per tier and action)."""
        try:
            return call()
        except (OSError, CorruptEntry) as err:
            self.fault(tier, action, err)
            return default

    def fault(self, tier: str, action: str, err: BaseException) -> None:
        """Count (and the first time, log) a fault of ``tier`` while doing ``action``."""
        with self._lock:
            first = (tier, action) not in self._warned
            self._warned.add((tier, action))
        if first:
            log.warning("tier %s: %s failed (%s); treating as a miss", tier, action, err)
        self._observer.tier_fault(tier, action)
        if action == "put":
            self._observer.dropped_store(f"{tier}_put_error")
