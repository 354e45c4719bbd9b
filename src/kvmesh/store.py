"""TieredStore: L1 in shared memory in front of slower tiers (disk, Redis) that hold encoded bytes.

Lookup walks L1 then the lower tiers and stops at the first chunk found
nowhere (a hit is always a prefix).  An entry enters through L1's two-phase
write; once committed it is encoded and written to each lower tier, behind the
request (a bounded queue: when it is full the write is dropped and counted,
never waited for) or through (before the commit returns), per tier.  Acquiring
an entry that only a lower tier holds promotes it into L1 first, so readers
always copy from shared memory; a lookup that finds chunks below L1 starts
promoting them at once (prefetch), so the engine's load rarely waits for a disk.

Partial chunks (a prompt's tail) are indexed under their parent key in every
tier that holds them: L1's :class:`~kvmesh.partials.PartialIndex` when they are
committed, each lower tier's own index once the entry is written there.
:meth:`TieredStore.partials` asks all of them, so a prompt that continues a
stored tail finds it after a restart or from another node sharing Redis.

Every method is safe to call from several threads.  A lower tier that fails is
a miss (and a count), never an error for the caller.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal, Protocol

import numpy as np
import torch

from kvmesh.codecs import Codec, CorruptEntry, RawCodec, decode_any, encode_for_tier, header_view
from kvmesh.codecs.base import read_header
from kvmesh.entry import DTYPES, EntryMeta, dtype_name
from kvmesh.partials import PartialIndex
from kvmesh.tensorbytes import tensor_bytes
from kvmesh.tiers.base import PartialIndexed, Tier, TierStats
from kvmesh.tiers.memory import Extent, MemoryTier, Reservation, ReserveStatus

log = logging.getLogger(__name__)

WritePolicy = Literal["write_behind", "write_through"]
Admission = Literal["all", "on_reuse"]
# a lookup starts promoting at most this many partial candidates found below L1 (the longest that fit)
PREFETCH_PARTIALS = 4


# The description of an L1 entry is kvmesh.entry's: the store's uses move to that name after its split.
TensorMeta = EntryMeta


@dataclass(frozen=True, slots=True)
class Located:
    """What a lookup found: ``hits`` consecutive chunks in some tier; ``below_l1`` indexes not in L1 yet."""

    hits: int
    below_l1: list[int]


@dataclass(frozen=True, slots=True)
class LowerTier:
    """A tier below L1 and how entries reach it."""

    tier: Tier
    write_policy: WritePolicy = "write_behind"
    admission: Admission = "all"  # on_reuse: only chunks that two or more lookups asked for
    codec: Codec | None = None  # None: the store's codec


class StoreObserver(Protocol):
    """Where the store reports what it did (the daemon's metrics)."""

    def tier_read(self, tier: str, nbytes: int, seconds: float) -> None: ...

    def tier_write(self, tier: str, nbytes: int, seconds: float) -> None: ...

    def dropped_store(self, reason: str) -> None: ...

    def encoded(self, codec: str, raw_bytes: int, encoded_bytes: int, seconds: float) -> None: ...

    def decoded(self, raw_bytes: int, seconds: float) -> None: ...


class _NullObserver:
    def tier_read(self, tier: str, nbytes: int, seconds: float) -> None:
        pass

    def tier_write(self, tier: str, nbytes: int, seconds: float) -> None:
        pass

    def dropped_store(self, reason: str) -> None:
        pass

    def encoded(self, codec: str, raw_bytes: int, encoded_bytes: int, seconds: float) -> None:
        pass

    def decoded(self, raw_bytes: int, seconds: float) -> None:
        pass


def _run_when_idle() -> None:
    """Put the calling thread in the idle scheduling class (else at the lowest nice); best effort.

    Linux schedules a SCHED_IDLE thread only on a core no normal thread wants, and preempts it as soon
    as one does, so writes behind and promotions never take time from an engine's compute threads.
    """
    tid = threading.get_native_id()
    try:
        os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
        return
    except (AttributeError, OSError):
        pass
    try:
        os.setpriority(os.PRIO_PROCESS, tid, 19)
    except (AttributeError, OSError):
        log.debug("cannot lower a background thread's priority", exc_info=True)


def _joined(parts: Sequence[bytes | memoryview]) -> bytes | memoryview:
    """The parts as one buffer; the copy runs with the GIL released (numpy), unlike ``bytes.join``."""
    if len(parts) == 1:
        return parts[0]
    views = [memoryview(part).cast("B") for part in parts]
    out = np.empty(sum(view.nbytes for view in views), dtype=np.uint8)
    at = 0
    for view in views:
        np.copyto(out[at:at + view.nbytes], np.frombuffer(view, dtype=np.uint8))
        at += view.nbytes
    return memoryview(out)


class TieredStore:
    def __init__(self, l1: MemoryTier, lower: Sequence[LowerTier | Tier] = (), codec: Codec | None = None,
                 observer: StoreObserver | None = None, write_queue_bytes: int = 1 << 30,
                 prefetch: bool = True, prefetch_threads: int = 2,
                 partial_index: PartialIndex | None = None,
                 writer_priority: Literal["idle", "normal"] = "idle",
                 prefetch_priority: Literal["idle", "normal"] = "idle") -> None:
        if prefetch_threads < 1:
            raise ValueError(f"prefetch_threads must be at least 1, got {prefetch_threads}")
        if l1.buffer is None:
            raise ValueError("the store's L1 tier must hold its buffer")
        self.l1 = l1
        self.codec = codec or RawCodec()
        self.lower = [replace(t, codec=t.codec or self.codec) if isinstance(t, LowerTier)
                      else LowerTier(t, codec=self.codec) for t in lower]
        self.observer = observer or _NullObserver()
        self.prefetch_enabled = prefetch
        self._write_queue_bytes = write_queue_bytes
        # idle: the write-behind thread runs only on CPU time nothing else wants (the engine's compute threads
        # share these cores; a writer at their priority slows every forward pass, docs/benchmarks.md)
        self._writer_priority = writer_priority
        self._prefetch_priority = prefetch_priority  # idle: promotions too yield every core to the engine
        self._pending_bytes = 0
        self._pending_lock = threading.Lock()
        self._writes: queue.Queue[tuple[bytes, Extent] | None] = queue.Queue()
        self._warned: set[tuple[str, str]] = set()
        self._prefetches: queue.Queue[bytes | None] = queue.Queue()
        self._prefetching: set[bytes] = set()
        self._promoting: dict[bytes, threading.Event] = {}
        self._asked: OrderedDict[bytes, int] = OrderedDict()  # lookups per missed key, for on_reuse admission
        self.partial_index = partial_index or PartialIndex()  # L1's partial chunks by parent key
        self._reserved_partials: dict[bytes, tuple[bytes, int]] = {}  # reserved, not yet committed
        self._threads: list[threading.Thread] = []
        if self.lower:
            # several prefetchers: one chunk's read overlaps another's decode, and decoding uses every core
            workers = [("writer", self._write_loop)] + [(f"prefetcher-{i}", self._prefetch_loop)
                                                        for i in range(prefetch_threads)]
            for name, target in workers:
                thread = threading.Thread(target=target, name=f"kvmesh-{name}", daemon=True)
                thread.start()
                self._threads.append(thread)

    # ------------------------------------------------------------------ lookups
    def lookup(self, keys: Sequence[bytes]) -> int:
        """How many of ``keys``, from the first, some tier holds (promotion of those below L1 starts)."""
        return self.locate(keys).hits

    def locate(self, keys: Sequence[bytes]) -> Located:
        """Consecutive hits across tiers, and which of them are not in L1 yet (their promotion starts now)."""
        count = self.l1.lookup(keys)
        if not self.lower or count == len(keys):
            return Located(count, [])
        self._note_asked(keys[count:])
        position = count
        while position < len(keys):
            step = 0
            for lower in self.lower:
                step = max(step, self._guard(lower.tier, "lookup", lambda t=lower.tier: t.lookup(keys[position:]), 0))
            if step == 0:
                break
            position += step
        below = [index for index in range(count, position) if not self.l1.contains(keys[index])]
        if self.prefetch_enabled:
            for index in below:
                self._start_prefetch(keys[index])
        return Located(position, below)

    def partials(self, parent: bytes, fits: int | None = None) -> list[tuple[bytes, int]]:
        """(key, tokens) of the partial chunks stored under ``parent`` in any tier, longest first.

        Each is present somewhere (index lines whose entry is gone are dropped).
        Those below L1 that hold at most ``fits`` tokens (the rest of the prompt,
        when known) start promoting into L1 at once, the longest first, as a
        lookup does for full chunks.
        """
        found: dict[bytes, int] = {}
        gone = []
        for child, tokens in self.partial_index.children(parent):
            if self.l1.contains(child):
                found[child] = tokens
            else:
                gone.append(child)
        if gone:  # evicted from L1; a lower tier's index still names them if they were written down
            self.partial_index.discard(parent, gone)
        for lower in self.lower:
            if isinstance(lower.tier, PartialIndexed):  # the tier turns its own faults into []
                for child, tokens in lower.tier.partials(parent):
                    found.setdefault(child, tokens)
        candidates = sorted(found.items(), key=lambda item: -item[1])
        if self.prefetch_enabled and self.lower:
            below = [child for child, tokens in candidates
                     if (fits is None or tokens <= fits) and not self.l1.contains(child)]
            for child in below[:PREFETCH_PARTIALS]:
                self._start_prefetch(child)
        return candidates

    # ------------------------------------------------------------------- writes
    def reserve(self, key: bytes, nbytes: int, meta: str = "", parent: bytes | None = None,
                tokens: int = 0) -> Reservation:
        """Reserve an L1 extent; ``parent`` and ``tokens`` name a partial chunk, indexed when committed."""
        if meta:
            TensorMeta.decode(meta)  # refuse a description we could not encode later
        if parent is not None and tokens < 1:
            raise ValueError(f"a partial chunk holds at least one token, got {tokens}")
        reservation = self.l1.reserve(key, nbytes, meta)
        if parent is not None and reservation.status is ReserveStatus.OK:
            with self._pending_lock:
                self._reserved_partials[key] = (parent, tokens)
        return reservation

    def commit(self, key: bytes) -> None:
        self.l1.commit(key)
        with self._pending_lock:
            partial = self._reserved_partials.pop(key, None)
        if partial is not None:
            self.partial_index.add(partial[0], key, partial[1])
        self._write_down(key)

    def _write_down(self, key: bytes) -> None:
        """Send a newly committed L1 entry to the lower tiers, through or behind, as each is configured."""
        if not self.lower:
            return
        through = [t for t in self.lower if t.write_policy == "write_through" and self._admits(t, key)]
        if through:
            self._write_through(key, through)
        if any(t.write_policy == "write_behind" for t in self.lower):
            self._enqueue_write(key)

    def abort(self, key: bytes) -> None:
        self.l1.abort(key)
        with self._pending_lock:
            self._reserved_partials.pop(key, None)

    def put(self, key: bytes, chunk: torch.Tensor, view: str = "chunk", parent: bytes | None = None,
            tokens: int = 0) -> bool:
        """Store a tensor (a convenience for tests and tools; engines write into L1 directly)."""
        status = self._fill_l1(key, chunk, view)
        if status is ReserveStatus.OK:
            if parent is not None:
                self.partial_index.add(parent, key, tokens)
            self._write_down(key)
        return status is not ReserveStatus.NO_ROOM

    def _fill_l1(self, key: bytes, chunk: torch.Tensor, view: str = "chunk") -> ReserveStatus:
        """Copy a tensor into a new L1 entry and commit it (EXISTS: already there; NO_ROOM: not stored)."""
        meta = TensorMeta(dtype_name(chunk.dtype), tuple(chunk.shape), view)
        reservation = self.l1.reserve(key, meta.nbytes, meta.encode())
        if reservation.status is ReserveStatus.OK:
            extent = reservation.extent
            self.l1.buffer[extent.offset:extent.offset + extent.nbytes] = tensor_bytes(chunk)
            self.l1.commit(key)
        return reservation.status

    def flush(self, timeout: float = 60.0) -> bool:
        """Wait until queued write-behind stores are done (tests, shutdown); False on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._pending_lock:
                if self._pending_bytes == 0 and self._writes.unfinished_tasks == 0:
                    return True
            time.sleep(0.01)
        return False

    # -------------------------------------------------------------------- reads
    def acquire(self, key: bytes, promote: bool = True) -> Extent | None:
        """Pin ``key`` in L1; with ``promote``, first bring it up from a lower tier (waits for the read)."""
        extent = self.l1.acquire(key)
        if extent is None and promote and self.lower and self._promote(key):
            extent = self.l1.acquire(key)
        return extent

    def release(self, key: bytes, extent: Extent) -> None:
        self.l1.release(key, extent)

    def get(self, key: bytes) -> torch.Tensor | None:
        extent = self.acquire(key)
        if extent is None:
            return None
        try:
            return self.tensor_at(extent).clone()
        finally:
            self.release(key, extent)

    def tensor_at(self, extent: Extent) -> torch.Tensor:
        """A tensor viewing an L1 extent in place (valid while the extent is pinned)."""
        meta = TensorMeta.decode(extent.meta)
        raw = torch.frombuffer(self.l1.buffer, dtype=torch.uint8, count=meta.nbytes, offset=extent.offset)
        return raw.view(DTYPES[meta.dtype]).view(meta.shape)

    def delete(self, key: bytes) -> bool:
        removed = self.l1.delete(key)
        for lower in self.lower:
            removed = self._guard(lower.tier, "delete", lambda t=lower.tier: t.delete(key), False) or removed
        return removed

    def stats(self) -> dict[str, TierStats]:
        return {tier.name: tier.stats() for tier in [self.l1, *(t.tier for t in self.lower)]}

    def close(self) -> None:
        for _ in self._threads:
            self._writes.put(None)
            self._prefetches.put(None)

    # ------------------------------------------------------------ write behind
    def _enqueue_write(self, key: bytes) -> None:
        """Queue a committed entry for the lower tiers, pinned so L1 cannot evict it before it is written."""
        extent = self.l1.acquire(key)
        if extent is None:
            return
        with self._pending_lock:
            # at most half of L1 may wait pinned, so stores into L1 always find room
            limit = min(self._write_queue_bytes, self.l1.capacity // 2)
            if self._pending_bytes + extent.nbytes > limit:
                self.l1.release(key, extent)
                self.observer.dropped_store("write_queue_full")
                return
            self._pending_bytes += extent.nbytes
        self._writes.put((key, extent))

    def _write_loop(self) -> None:
        if self._writer_priority == "idle":
            _run_when_idle()
        while (item := self._writes.get()) is not None:
            key, extent = item
            try:
                self._write_lower(key, extent, [t for t in self.lower
                                                if t.write_policy == "write_behind" and self._admits(t, key)])
            except Exception:  # noqa: BLE001 - the writer thread must survive anything
                log.warning("write-behind of %s failed", key.hex(), exc_info=True)
            finally:
                self.l1.release(key, extent)
                with self._pending_lock:
                    self._pending_bytes -= extent.nbytes
                self._writes.task_done()

    def _write_through(self, key: bytes, targets: list[LowerTier]) -> None:
        extent = self.l1.acquire(key)
        if extent is None:
            return
        try:
            self._write_lower(key, extent, targets)
        finally:
            self.l1.release(key, extent)

    def _write_lower(self, key: bytes, extent: Extent, targets: list[LowerTier]) -> None:
        """Encode a pinned L1 entry once per distinct codec and put it into each target tier."""
        if not targets:
            return
        meta = TensorMeta.decode(extent.meta)
        encoded: dict[int, tuple[bytes | memoryview, ...]] = {}
        for target in targets:
            codec = target.codec  # set for every tier in __init__
            if id(codec) not in encoded:
                started = time.perf_counter()
                if isinstance(codec, RawCodec):  # header + a view of the pinned extent: no copy of the chunk
                    parts: tuple[bytes | memoryview, ...] = codec.encode_parts(self.tensor_at(extent), meta.view)
                    name = codec.name
                else:
                    result = encode_for_tier(codec, self.tensor_at(extent), meta.view)
                    parts, name = (result.data,), result.codec
                encoded[id(codec)] = parts
                self.observer.encoded(name, meta.nbytes, sum(len(p) for p in parts), time.perf_counter() - started)
            parts = encoded[id(codec)]
            # a tier that takes parts writes them as they lie; any other gets one joined copy
            data = parts if getattr(target.tier, "accepts_parts", False) else _joined(parts)
            nbytes = sum(memoryview(p).nbytes for p in parts)
            started = time.perf_counter()
            if self._guard(target.tier, "put", lambda t=target.tier, d=data: t.put(key, d), False):
                self.observer.tier_write(target.tier.name, nbytes, time.perf_counter() - started)
                self._index_partial(target.tier, key)

    def _index_partial(self, tier: Tier, key: bytes) -> None:
        """After ``key`` was written to ``tier``: if it is a partial chunk, index it there under its parent."""
        partial = self.partial_index.parent_of(key)
        if partial is not None and isinstance(tier, PartialIndexed):
            tier.add_partial(partial[0], key, partial[1])  # a fault is the tier's: counted there, a later miss

    def _note_asked(self, keys: Sequence[bytes]) -> None:
        if not any(t.admission == "on_reuse" for t in self.lower):
            return
        with self._pending_lock:
            for key in keys:
                self._asked[key] = self._asked.get(key, 0) + 1
                self._asked.move_to_end(key)
            while len(self._asked) > 1_000_000:
                self._asked.popitem(last=False)

    def _admits(self, target: LowerTier, key: bytes) -> bool:
        if target.admission == "all":
            return True
        with self._pending_lock:
            return self._asked.get(key, 0) >= 2

    # ------------------------------------------------------- promotion, prefetch
    def _start_prefetch(self, key: bytes) -> None:
        with self._pending_lock:
            if key in self._prefetching or self.l1.contains(key):
                return
            self._prefetching.add(key)
        self._prefetches.put(key)

    def _prefetch_loop(self) -> None:
        if self._prefetch_priority == "idle":
            _run_when_idle()
        while (key := self._prefetches.get()) is not None:
            try:
                self._promote(key)
            except Exception:  # noqa: BLE001 - a failed prefetch is a later miss
                log.warning("prefetch of %s failed", key.hex(), exc_info=True)
            finally:
                with self._pending_lock:
                    self._prefetching.discard(key)

    def _promote(self, key: bytes) -> bool:
        """Bring ``key`` into L1 from the first lower tier that has it; one thread per key does the work."""
        with self._pending_lock:
            if self.l1.contains(key):
                return True
            running = self._promoting.get(key)
            if running is None:
                self._promoting[key] = threading.Event()
        if running is not None:  # another thread (the prefetcher, say) is bringing it up: wait for it
            running.wait(timeout=30)
            return self.l1.contains(key)
        try:
            return self._promote_now(key)
        finally:
            with self._pending_lock:
                self._promoting.pop(key).set()

    def _promote_now(self, key: bytes) -> bool:
        for lower in self.lower:
            tier = lower.tier
            started = time.perf_counter()
            data = self._guard(tier, "get", lambda t=tier: t.get(key), None)
            if data is None:
                continue
            self.observer.tier_read(tier.name, len(data), time.perf_counter() - started)
            try:
                header = read_header(data)
                meta = TensorMeta(dtype_name(header.dtype), header.shape, header_view(header))
            except (CorruptEntry, ValueError) as err:
                self._drop_corrupt(tier, key, err)
                continue
            reservation = self.l1.reserve(key, meta.nbytes, meta.encode())
            if reservation.status is not ReserveStatus.OK:
                return reservation.status is ReserveStatus.EXISTS
            try:  # decode straight into the L1 extent: no temporary tensor, no second copy
                started = time.perf_counter()
                decode_any(data, out=self.tensor_at(reservation.extent))
                self.observer.decoded(meta.nbytes, time.perf_counter() - started)
            except CorruptEntry as err:
                self.l1.abort(key)
                self._drop_corrupt(tier, key, err)
                continue
            except BaseException:
                self.l1.abort(key)
                raise
            self.l1.commit(key)
            return True
        return False

    def _drop_corrupt(self, tier: Tier, key: bytes, err: Exception) -> None:
        log.warning("tier %s: dropping corrupt entry %s: %s", tier.name, key.hex(), err)
        self._guard(tier, "delete", lambda: tier.delete(key), False)
        self.observer.dropped_store(f"corrupt_{tier.name}")

    def _guard(self, tier: Tier, action: str, call, default):  # noqa: ANN001, ANN202
        """Run a tier call; an I/O fault it raises is logged once per (tier, action) and becomes ``default``."""
        try:
            return call()
        except (OSError, CorruptEntry) as err:  # I/O faults a tier did not absorb: a miss; anything else is a bug
            marker = (tier.name, action)
            if marker not in self._warned:
                self._warned.add(marker)
                log.warning("tier %s: %s failed (%s); treating as a miss", tier.name, action, err)
            self.observer.dropped_store(f"{tier.name}_{action}_error")
            return default
