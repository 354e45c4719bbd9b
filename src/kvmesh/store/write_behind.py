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
from kvmesh.store.write_back import WriteBack
from kvmesh.store.writer import Pinned, TierWriter
from kvmesh.tiers.memory import MemoryTier

log = logging.getLogger("kvmesh.store")

MAX_BATCH = 16  # entries per put_many
REFILL_SECONDS = 0.1  # how often an idle writer asks the write-back what is due
# ... and L1 bytes per put_many (the first entry is always taken): a batch that stays in the CPU's cache
# between its encode (checksum) and its write; a chunk of several MB goes down alone
MAX_BATCH_BYTES = 8 << 20


class WriteBehind:
    """The write-behind queue, its byte budget and its writer thread."""

    def __init__(self, l1: MemoryTier, writer: TierWriter, targets_for: Callable[[bytes, str], list[LowerTier]],
                 observer: StoreObserver, queue_bytes: int, priority: Priority,
                 gate: QuietGate | None = None, force_fraction: float = 0.5,
                 write_back: WriteBack | None = None) -> None:
        self._l1 = l1
        self._write_back = write_back
        self._gate = gate
        self._force_bytes = force_fraction * min(queue_bytes, l1.capacity // 2)
        self._writer = writer
        self._targets_for = targets_for
        self._observer = observer
        self._limit = min(queue_bytes, l1.capacity // 2)
        self._lock = threading.Lock()  # guards the pending byte count
        self._pending = 0
        self._queue: queue.Queue[tuple[Pinned, str] | None] = queue.Queue()
        self.thread = start_thread("writer", self._loop, priority)

    @property
    def pending_bytes(self) -> int:
        """Bytes queued or being written down (the queue's depth, against its budget)."""
        with self._lock:
            return self._pending

    def enqueue(self, key: bytes, policy: str = "write_behind") -> str:
        """Queue a committed entry for the tiers of ``policy``, pinned so L1 cannot evict it before it is written.

        Returns "queued", "gone" (no longer in L1) or "full": a store written behind is then dropped and
        counted; one written on eviction stays due (``write_back``).
        """
        extent = self._l1.acquire(key)
        if extent is None:
            return "gone"
        with self._lock:
            if self._pending + extent.nbytes > self._limit:
                self._l1.release(key, extent)
                if policy == "write_behind":
                    self._observer.dropped_store("write_queue_full", key)
                return "full"
            self._pending += extent.nbytes
        self._queue.put((Pinned(key, extent), policy))
        return "queued"

    def flush(self, timeout: float) -> bool:
        """Wait until what is queued is written, dirty entries written back included; False on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._write_back is not None:
                self._write_back.drain(self._take_back)
            with self._lock:
                if self._pending == 0 and self._queue.unfinished_tasks == 0 and \
                        (self._write_back is None or not self._write_back.dirty):
                    return True
            time.sleep(0.01)
        return False

    def _targets_of(self, policy: str) -> Callable[[bytes], list[LowerTier]]:
        return lambda key: self._targets_for(key, policy)

    def _take_back(self, key: bytes) -> bool:
        """Queue a dirty entry for the tiers that take entries on eviction; False when the queue is full."""
        status = self.enqueue(key, "on_eviction")
        if status == "gone" and self._write_back is not None:  # evicted or deleted meanwhile: nothing to write
            self._write_back.written(key)
        return status != "full"

    def close(self) -> None:
        self._queue.put(None)

    def _backlogged(self) -> bool:
        """Enough is waiting that it is written even while engines are served (delayed, never lost).

        So is what L1 is about to evict unwritten (``WriteBack.urgent``).
        """
        if self._write_back is not None and self._write_back.urgent():
            return True
        with self._lock:
            return self._pending >= self._force_bytes

    def _loop(self) -> None:
        while (batch := self._take()) is not None:
            if not batch:
                continue
            if self._gate is not None:
                self._gate.wait_until_quiet(self._backlogged)
            try:
                for policy in dict.fromkeys(policy for _, policy in batch):
                    self._writer.write([entry for entry, p in batch if p == policy], self._targets_of(policy))
            except Exception:  # the writer thread must survive anything; logged with its traceback
                log.exception("write-behind of %d entries failed", len(batch))
            finally:
                for entry, policy in batch:
                    self._l1.release(entry.key, entry.extent)
                    if policy == "on_eviction" and self._write_back is not None:
                        self._write_back.written(entry.key)  # a failed write was counted by the tier's guard
                with self._lock:
                    self._pending -= sum(entry.extent.nbytes for entry, _ in batch)
                for _ in batch:
                    self._queue.task_done()

    def _take(self) -> list[tuple[Pinned, str]] | None:
        """The next entry and whatever else is queued behind it (bounded); None when closed.

        With nothing queued, every ``REFILL_SECONDS`` it hands over what the write-back says is due
        (an empty batch when nothing is).
        """
        try:
            first = self._queue.get(timeout=REFILL_SECONDS if self._write_back is not None else None)
        except queue.Empty:
            if self._write_back is not None:
                self._write_back.due(self._take_back)
            return []
        if first is None:
            return None
        batch, nbytes = [first], first[0].extent.nbytes
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
            nbytes += item[0].extent.nbytes
        return batch
