"""Promotion: bringing entries up from a lower tier into L1, on demand or ahead of it (prefetch).

Why one coordinator: a lookup that finds chunks below L1 starts promoting them at once while the
scheduler may already be pinning the same chunks, so each key is promoted by one thread and the
others wait for it (a lease never comes back short).  Prefetch threads take what is queued in small
batches and read each batch from a tier with one ``get_many`` (one round trip to Redis); each entry
is decoded straight into its L1 extent, and the codec header's checksums make a damaged entry a miss
that is dropped from its tier and counted; so does a header that names another key (a file or value
holding another chunk's valid entry is never served as this one).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from functools import partial

import torch

from kvmesh.codecs import CorruptEntry, UnreadableEntry, decode_any
from kvmesh.codecs.base import read_header
from kvmesh.store.guard import TierGuard
from kvmesh.store.threads import set_scheduling, start_thread
from kvmesh.store.types import LowerTier, Priority, StoreObserver
from kvmesh.tiers.base import Buffer
from kvmesh.tiers.memory import Extent, MemoryTier, ReserveStatus

log = logging.getLogger("kvmesh.store")

MAX_BATCH = 4  # keys a prefetch thread reads together (more would keep the other threads idle)
WAIT_SECONDS = 30.0  # how long a reader waits for another thread's promotion of the same key
MAX_UNREADABLE = 65536  # entries this node found it cannot read, remembered so lookups stop offering them


class Promoter:
    """Per-key single-flight promotion into L1, and the prefetch threads that start it early."""

    def __init__(self, l1: MemoryTier, lower: Sequence[LowerTier], guard: TierGuard, observer: StoreObserver,
                 tensor_at: Callable[[Extent], torch.Tensor], threads: int, priority: Priority,
                 dropped: Callable[..., None] | None = None) -> None:
        if threads < 1:
            raise ValueError(f"prefetch_threads must be at least 1, got {threads}")
        self._l1 = l1
        self._lower = list(lower)
        self._guard = guard
        self._observer = observer
        self._tensor_at = tensor_at
        self._dropped = dropped  # told (key, tier=name) of each corrupt entry dropped: a miss's explanation
        self._lock = threading.Lock()  # guards the tables below
        self.unreadable: dict[bytes, None] = {}  # intact entries of a newer format or codec, oldest first
        self._queued: set[bytes] = set()
        self._promoting: dict[bytes, threading.Event] = {}
        self._queue: queue.Queue[bytes | None] = queue.Queue()
        self._count = threads
        self._priority = priority
        self._boosted = False  # idle-class threads moved to normal priority while an engine waits on them
        self.threads = [start_thread(f"prefetcher-{i}", self._loop, priority) for i in range(threads)]

    def prefetch(self, keys: Sequence[bytes]) -> None:
        """Start promoting ``keys`` (those not in L1 or on their way already) on the prefetch threads.

        Asked again for a key still on its way up, the promotion has someone waiting for it (an engine's
        scheduler asks again while it skips the request): idle-class threads then run at normal priority
        until the queue is empty.
        """
        waited_on = False
        for key in keys:
            with self._lock:
                if key in self._queued or key in self._promoting:
                    waited_on = True
                    continue
                if self._l1.contains(key):
                    continue
                self._queued.add(key)
            self._queue.put(key)
        if waited_on:
            self._set_boost(True)

    def promote(self, key: bytes) -> bool:
        """Bring ``key`` into L1 now (or wait for the thread doing it); whether it is there."""
        claimed, waits = self._claim([key])
        for event in waits:
            event.wait(timeout=WAIT_SECONDS)
        if claimed:
            try:
                self._bring_up(claimed)
            finally:
                self._finish(claimed)
        return self._l1.contains(key)

    def close(self) -> None:
        for _ in self.threads:
            self._queue.put(None)

    # ------------------------------------------------------------------ internals
    def _loop(self) -> None:
        while (batch := self._take()) is not None:
            with self._lock:
                self._queued.difference_update(batch)
            claimed, _ = self._claim(batch)  # keys another thread is promoting are its business
            try:
                self._bring_up(claimed)
            except Exception:  # the prefetch thread must survive; logged with its traceback
                log.exception("prefetch of %d entries failed", len(claimed))
            finally:
                self._finish(claimed)
            if self._queue.empty():
                self._set_boost(False)

    def _set_boost(self, boosted: bool) -> None:
        """Move the idle-class prefetch threads to normal priority (True) or back to the idle class."""
        if self._priority != "idle":
            return
        with self._lock:
            if self._boosted == boosted or (not boosted and self._promoting):
                return
            self._boosted = boosted
        for thread in self.threads:
            if thread.native_id is not None:
                set_scheduling(thread.native_id, idle=not boosted)

    def _take(self) -> list[bytes] | None:
        """The next queued key and this thread's share of those behind it; None when closed."""
        first = self._queue.get()
        if first is None:
            return None
        batch = [first]
        share = min(MAX_BATCH, 1 + self._queue.qsize() // self._count)
        while len(batch) < share:
            try:
                key = self._queue.get_nowait()
            except queue.Empty:
                break
            if key is None:  # closing: promote this batch, then stop
                self._queue.put(None)
                break
            batch.append(key)
        return batch

    def _claim(self, keys: Sequence[bytes]) -> tuple[list[bytes], list[threading.Event]]:
        """The keys this thread will promote, and the events of those another thread is promoting."""
        claimed, waits = [], []
        with self._lock:
            for key in keys:
                if self._l1.contains(key):
                    continue
                running = self._promoting.get(key)
                if running is None:
                    self._promoting[key] = threading.Event()
                    claimed.append(key)
                else:
                    waits.append(running)
        return claimed, waits

    def _finish(self, keys: Sequence[bytes]) -> None:
        with self._lock:
            for key in keys:
                event = self._promoting.pop(key, None)
                if event is not None:
                    event.set()

    def _bring_up(self, keys: list[bytes]) -> None:
        """Read ``keys`` from the first lower tier that has each (one ``get_many`` per tier) into L1."""
        remaining = keys
        for lower in self._lower:
            if not remaining:
                return
            tier = lower.tier
            started = time.perf_counter()
            nothing: list[Buffer | None] = [None] * len(remaining)
            values = self._guard.call(tier.name, "get", partial(tier.get_many, remaining), nothing)
            seconds = time.perf_counter() - started
            found: list[tuple[bytes, Buffer]] = []
            missed: list[bytes] = []
            for key, value in zip(remaining, values):
                if value is None:
                    missed.append(key)
                else:
                    found.append((key, value))
            if found:
                self._observer.tier_read(tier.name, sum(memoryview(v).nbytes for _, v in found), seconds)
            for key, data in found:
                if self._decode_into_l1(lower, key, data):
                    self._finish([key])  # its readers need not wait for the rest of the batch
                else:
                    missed.append(key)  # corrupt here: the next tier may hold a good copy
            again = set(missed)
            remaining = [key for key in remaining if key in again]

    def _decode_into_l1(self, lower: LowerTier, key: bytes, data: Buffer) -> bool:
        """Decode an entry straight into a new L1 extent; False if it is corrupt (then dropped and counted).

        True also when L1 has no room or already holds the key: nothing more to try for it.
        """
        try:
            meta = read_header(data, expected_key=key).meta
        except CorruptEntry as err:
            self._drop_corrupt(lower, key, err)
            return False
        except UnreadableEntry as err:
            self._leave_unreadable(lower, key, err)
            return False
        reservation = self._l1.reserve(key, meta.nbytes, meta.encode())
        if reservation.status is not ReserveStatus.OK or reservation.extent is None:
            return True
        try:
            started = time.perf_counter()
            decode_any(data, out=self._tensor_at(reservation.extent))
            self._observer.decoded(meta.nbytes, time.perf_counter() - started)
        except CorruptEntry as err:
            self._l1.abort(key)
            self._drop_corrupt(lower, key, err)
            return False
        except UnreadableEntry as err:
            self._l1.abort(key)
            self._leave_unreadable(lower, key, err)
            return False
        except BaseException:
            self._l1.abort(key)
            raise
        self._l1.commit(key)
        return True

    def _leave_unreadable(self, lower: LowerTier, key: bytes, err: Exception) -> None:
        """An intact entry this node cannot read (a rolling upgrade): a miss; the entry stays for others.

        Counted as ``<tier>_unreadable`` and logged once; the key is remembered so that lookups stop
        offering it (a request would otherwise wait for a promotion that cannot succeed).
        """
        self._guard.fault(lower.tier.name, "unreadable", err)
        with self._lock:
            self.unreadable[key] = None
            while len(self.unreadable) > MAX_UNREADABLE:
                self.unreadable.pop(next(iter(self.unreadable)))

    def _drop_corrupt(self, lower: LowerTier, key: bytes, err: Exception) -> None:
        tier = lower.tier
        log.debug("tier %s: dropping corrupt entry %s: %s", tier.name, key.hex(), err)
        self._guard.fault(tier.name, "corrupt", err)
        self._guard.call(tier.name, "delete", partial(tier.delete, key), False)
        if self._dropped is not None:
            self._dropped(key, tier=tier.name)
