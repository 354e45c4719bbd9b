"""Writes behind: a queue of committed entries, pinned in L1 until a writer thread has put them down.

Why: encoding and disk or Redis writes are slower than the engine's store into L1, so they run
after the request, on one thread in the idle scheduling class.  The queue is bounded in bytes (at
most half of L1 may wait pinned, so stores into L1 always find room); beyond that a store is dropped
and counted, never waited for.  The writer drains whatever is queued and writes it with one
``put_many`` per tier (one pipeline for Redis).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

from kvmesh.store.quiet import QuietGate
from kvmesh.store.threads import start_thread
from kvmesh.store.types import LowerTier, Priority, StoreObserver
from kvmesh.store.writer import Pinned, TierWriter
from kvmesh.tiers.memory import MemoryTier

log = logging.getLogger("kvmesh.store")

MAX_BATCH = 16  # entries per put_many
# ... and L1 bytes per put_many (the first entry is always taken): a batch that stays in the CPU's cache
# between its encode (checksum) and its write; a chunk of several MB goes down alone
MAX_BATCH_BYTES = 8 << 20


class WriteBehind:
    """The write-behind queue, its byte budget and its writer thread."""

    def __init__(self, l1: MemoryTier, writer: TierWriter, targets_for: Callable[[bytes], list[LowerTier]],
                 observer: StoreObserver, queue_bytes: int, priority: Priority,
                 gate: QuietGate | None = None, force_fraction: float = 0.5) -> None:
        self._l1 = l1
        self._gate = gate
        self._force_bytes = force_fraction * min(queue_bytes, l1.capacity // 2)
        self._writer = writer
        self._targets_for = targets_for
        self._observer = observer
        self._limit = min(queue_bytes, l1.capacity // 2)
        self._lock = threading.Lock()  # guards the pending byte count
        self._pending = 0
        self._queue: queue.Queue[Pinned | None] = queue.Queue()
        self.thread = start_thread("writer", self._loop, priority)

    def enqueue(self, key: bytes) -> None:
        """Queue a committed entry, pinned so L1 cannot evict it before it is written."""
        extent = self._l1.acquire(key)
        if extent is None:
            return
        with self._lock:
            if self._pending + extent.nbytes > self._limit:
                self._l1.release(key, extent)
                self._observer.dropped_store("write_queue_full")
                return
            self._pending += extent.nbytes
        self._queue.put(Pinned(key, extent))

    def flush(self, timeout: float) -> bool:
        """Wait until what is queued is written; False on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if self._pending == 0 and self._queue.unfinished_tasks == 0:
                    return True
            time.sleep(0.01)
        return False

    def close(self) -> None:
        self._queue.put(None)

    def _backlogged(self) -> bool:
        """Enough is waiting that it is written even while engines are served (delayed, never lost)."""
        with self._lock:
            return self._pending >= self._force_bytes

    def _loop(self) -> None:
        while (batch := self._take()) is not None:
            if self._gate is not None:
                self._gate.wait_until_quiet(self._backlogged)
            try:
                self._writer.write(batch, self._targets_for)
            except Exception:  # the writer thread must survive anything; logged with its traceback
                log.exception("write-behind of %d entries failed", len(batch))
            finally:
                for entry in batch:
                    self._l1.release(entry.key, entry.extent)
                with self._lock:
                    self._pending -= sum(entry.extent.nbytes for entry in batch)
                for _ in batch:
                    self._queue.task_done()

    def _take(self) -> list[Pinned] | None:
        """The next entry and whatever else is queued behind it (bounded); None when closed."""
        first = self._queue.get()
        if first is None:
            return None
        batch, nbytes = [first], first.extent.nbytes
        # held back by engines: one entry at a time, so a request that arrives meets at most one write
        most = 1 if self._gate is not None and self._gate.quiet_seconds else MAX_BATCH
        while len(batch) < most and nbytes < MAX_BATCH_BYTES:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:  # closing: write this batch, then stop
                self._queue.put(None)
                self._queue.task_done()
                break
            batch.append(item)
            nbytes += item.extent.nbytes
        return batch
