"""TieredStore: L1 in shared memory in front of slower tiers (disk, Redis) that hold encoded bytes.

Lookup walks L1 then the lower tiers and stops at the first chunk found
nowhere (a hit is always a prefix).  An entry enters through L1's two-phase
write; once committed it is encoded and written to each lower tier, behind the
request (``write_behind``: a bounded queue, dropped and counted when full) or
through (before the commit returns), per tier.  Acquiring an entry that only a
lower tier holds promotes it into L1 first (``promotion``), so readers always
copy from shared memory; a lookup that finds chunks below L1 starts promoting
them at once (prefetch), so the engine's load rarely waits for a disk.

Partial chunks (a prompt's tail) are indexed under their parent key in every
tier that holds them: L1's :class:`~kvmesh.store.partials.PartialIndex` when
they are committed, each lower tier's own index once the entry is written there.
:meth:`TieredStore.partials` asks all of them, so a prompt that continues a
stored tail finds it after a restart or from another node sharing Redis.

This class only composes those parts; each keeps its own lock.  A lower tier
that fails is a miss (and a count, ``guard``), never an error for the caller.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import replace
from functools import partial
from itertools import takewhile

import torch

from kvmesh.codecs import Codec, RawCodec
from kvmesh.entry import EntryMeta
from kvmesh.store.admission import Admission
from kvmesh.store.evictions import EvictionLog
from kvmesh.store.guard import TierGuard
from kvmesh.store.partials import PartialIndex
from kvmesh.store.promotion import Promoter
from kvmesh.store.quiet import QuietGate
from kvmesh.store.types import Located, LowerTier, NullObserver, Priority, StoreObserver
from kvmesh.store.write_back import WriteBack
from kvmesh.store.write_behind import WriteBehind
from kvmesh.store.writer import Pinned, TierWriter
from kvmesh.tensorbytes import tensor_bytes
from kvmesh.tiers.base import EntryInfo, PartialIndexed, Tier, TierStats
from kvmesh.tiers.breaker import failing
from kvmesh.tiers.memory import Extent, MemoryTier, Reservation, ReserveStatus

# a lookup starts promoting at most this many partial candidates found below L1 (the longest that fit)
PREFETCH_PARTIALS = 4


# why a store did not reach the tiers of a write policy, as a miss says it
DROPPED = {"write_queue_full": ("write_behind", "not written (the write queue was full)"),
           "evicted_unwritten": ("on_eviction", "not written (evicted from L1 before its write)")}


class _DropRecording:
    """The store's observer: the caller's, with dropped stores also recorded in the store's eviction log."""

    def __init__(self, observer: StoreObserver, store: TieredStore) -> None:
        self._observer = observer
        self._store = store

    def tier_read(self, tier: str, nbytes: int, seconds: float) -> None:
        self._observer.tier_read(tier, nbytes, seconds)

    def tier_write(self, tier: str, nbytes: int, seconds: float) -> None:
        self._observer.tier_write(tier, nbytes, seconds)

    def dropped_store(self, reason: str, key: bytes | None = None) -> None:
        self._store._store_dropped(reason, key)

    def encoded(self, codec: str, raw_bytes: int, encoded_bytes: int, seconds: float) -> None:
        self._observer.encoded(codec, raw_bytes, encoded_bytes, seconds)

    def decoded(self, raw_bytes: int, seconds: float) -> None:
        self._observer.decoded(raw_bytes, seconds)

    def tier_fault(self, tier: str, action: str) -> None:
        self._observer.tier_fault(tier, action)


class TieredStore:
    def __init__(self, l1: MemoryTier, lower: Sequence[LowerTier | Tier] = (), codec: Codec | None = None,
                 observer: StoreObserver | None = None, write_queue_bytes: int = 1 << 30,
                 prefetch: bool = True, prefetch_threads: int = 2,
                 partial_index: PartialIndex | None = None,
                 writer_priority: Priority = "idle", prefetch_priority: Priority = "idle",
                 quiet_gate: QuietGate | None = None) -> None:
        if prefetch_threads < 1:
            raise ValueError(f"prefetch_threads must be at least 1, got {prefetch_threads}")
        if l1.buffer is None:
            raise ValueError("the store's L1 tier must hold its buffer")
        self.l1 = l1
        self._buffer: memoryview = l1.buffer
        self.codec = codec or RawCodec()
        self.lower = [replace(t, codec=t.codec or self.codec) if isinstance(t, LowerTier)
                      else LowerTier(t, codec=self.codec) for t in lower]
        self._outer_observer = observer or NullObserver()
        self.observer = _DropRecording(self._outer_observer, self)
        self.prefetch_enabled = prefetch
        self.partial_index = partial_index or PartialIndex()  # L1's partial chunks by parent key
        self._guard = TierGuard(self.observer)
        self._admission = Admission(self.lower)
        self.evictions = EvictionLog()  # what left which tier, and when: a miss's explanation
        self._writer = TierWriter(self.tensor_at, self._guard, self.observer, self.partial_index,
                                  lost=self.evictions.record)
        self._lock = threading.Lock()  # guards the reserved partial chunks
        self._reserved_partials: dict[bytes, tuple[bytes, int]] = {}  # reserved, not yet committed
        self._behind: WriteBehind | None = None
        self._write_back: WriteBack | None = None
        self._promoter: Promoter | None = None
        l1.on_evict = self._l1_evicted
        for below in self.lower:
            if hasattr(below.tier, "on_evict"):  # a tier that evicts by itself (disk) says what
                below.tier.on_evict = partial(self.evictions.record, tier=below.tier.name)
        if self.lower:
            # idle: the writer runs only on CPU time nothing else wants (the engine's compute threads share
            # these cores; a writer at their priority slows every forward pass, docs/benchmarks.md)
            self._write_back = (WriteBack(l1, self.observer)
                                if any(t.write_policy == "on_eviction" for t in self.lower) else None)
            self._behind = WriteBehind(l1, self._writer, self._targets, self.observer, write_queue_bytes,
                                       writer_priority, quiet_gate, write_back=self._write_back)
            # several prefetchers: one chunk's read overlaps another's decode, and decoding uses every core
            self._promoter = Promoter(l1, self.lower, self._guard, self.observer, self.tensor_at,
                                      prefetch_threads, prefetch_priority,
                                      dropped=partial(self.evictions.record, what="dropped as corrupt"))

    def _store_dropped(self, reason: str, key: bytes | None = None) -> None:
        """A store that did not reach a lower tier: counted by the observer, and recorded against the tiers it
        was meant for (a later miss says so)."""
        self._outer_observer.dropped_store(reason, key)
        if key is None:
            return
        policy, what = DROPPED.get(reason, (None, None))
        for lower in self.lower:
            if what is not None and lower.write_policy == policy:
                self.evictions.record(key, lower.tier.name, what)

    def _l1_evicted(self, key: bytes) -> None:
        """L1 dropped ``key`` (under its lock): remembered, and handed to the write-back if it takes evictions."""
        self.evictions.record(key)
        if self._write_back is not None:
            self._write_back.evicted(key)

    @property
    def threads(self) -> list[threading.Thread]:
        """The background threads (the writer, then the prefetchers); none without lower tiers."""
        if self._behind is None or self._promoter is None:
            return []
        return [self._behind.thread, *self._promoter.threads]

    # ------------------------------------------------------------------ lookups
    def lookup(self, keys: Sequence[bytes]) -> int:
        """How many of ``keys``, from the first, some tier holds (promotion of those below L1 starts)."""
        return self.locate(keys).hits

    def locate(self, keys: Sequence[bytes], prefetch: bool = True) -> Located:
        """Consecutive hits across tiers, and which of them are not in L1 yet (their promotion starts now).

        ``prefetch`` False: a probe, which moves nothing and is not noted as asked for admission.
        """
        count = self.l1.lookup(keys) if prefetch else sum(1 for _ in takewhile(self.l1.contains, keys))
        if not self.lower or count == len(keys):
            return Located(count, [])
        if prefetch:
            self._admission.note_asked(keys[count:])
        position = count
        end = len(keys)
        if self._promoter is not None and self._promoter.unreadable:  # what this node cannot read is a miss
            end = next((i for i in range(count, len(keys)) if keys[i] in self._promoter.unreadable), end)
        found_in: dict[int, str] = {}
        unavailable: set[str] = set()
        while position < end:
            rest = keys[position:end]
            steps = []
            for lower in self.lower:  # a fault is a miss (None here, to name the tier that failed)
                step = self._guard.call(lower.tier.name, "lookup", partial(lower.tier.lookup, rest), None)
                if step is None:
                    unavailable.add(lower.tier.name)
                steps.append((lower.tier.name, step or 0))
            step = covered = 0
            for name, found in steps:  # each chunk is credited to the first tier (in order) that holds it
                if found > covered:
                    found_in.update(dict.fromkeys(range(position + covered, position + found), name))
                    covered = step = found
            if step == 0:  # chunks only L1 holds, after some below it (written on eviction, not yet written)
                step = sum(1 for _ in takewhile(self.l1.contains, rest))
            if step == 0:
                break
            position += step
        if position < len(keys):  # a miss: the tiers that were skipped or failed just now (its explanation)
            unavailable.update(t.tier.name for t in self.lower if failing(t.tier))
        below = [index for index in range(count, position) if not self.l1.contains(keys[index])]
        if prefetch and self.prefetch_enabled and self._promoter is not None:
            self._promoter.prefetch([keys[index] for index in below])
        return Located(position, below, {index: found_in[index] for index in below if index in found_in},
                       sorted(unavailable))

    def describe(self, keys: Sequence[bytes]) -> list[EntryInfo | None]:
        """Where each key is (L1 first, then the lower tiers in order), its bytes, age and codec; moves nothing."""
        described: list[EntryInfo | None] = []
        for key in keys:
            info = self.l1.describe(key)
            for lower in self.lower if info is None else ():
                describe = getattr(lower.tier, "describe", None)
                if describe is not None:
                    info = self._guard.call(lower.tier.name, "describe", partial(describe, key), None)
                if info is not None:
                    break
            described.append(info)
        return described

    def partials(self, parent: bytes, fits: int | None = None, prefetch: bool = True) -> list[tuple[bytes, int]]:
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
        if prefetch and self.prefetch_enabled and self._promoter is not None:
            below = [child for child, tokens in candidates
                     if (fits is None or tokens <= fits) and not self.l1.contains(child)]
            self._promoter.prefetch(below[:PREFETCH_PARTIALS])
        return candidates

    # ------------------------------------------------------------------- writes
    def reserve(self, key: bytes, nbytes: int, meta: str = "", parent: bytes | None = None,
                tokens: int = 0, start: int = 0, previous: bytes | None = None) -> Reservation:
        """Reserve an L1 extent; with ``parent``, a partial chunk of ``tokens`` tokens, indexed when committed.

        ``tokens``, ``start`` and ``previous`` (the chunk before it in its prompt) are what L1's eviction
        weighs (``tiers/eviction.py``).
        """
        if meta:
            EntryMeta.decode(meta)  # refuse a description we could not encode later
        if parent is not None and tokens < 1:
            raise ValueError(f"a partial chunk holds at least one token, got {tokens}")
        reservation = self.l1.reserve(key, nbytes, meta, start, tokens, previous)
        if parent is not None and reservation.status is ReserveStatus.OK:
            with self._lock:
                self._reserved_partials[key] = (parent, tokens)
        return reservation

    def commit(self, key: bytes) -> None:
        self.l1.commit(key)
        self.evictions.forget(key)
        with self._lock:
            partial = self._reserved_partials.pop(key, None)
        if partial is not None:
            self.partial_index.add(partial[0], key, partial[1])
        self._write_down(key)

    def abort(self, key: bytes) -> None:
        self.l1.abort(key)
        with self._lock:
            self._reserved_partials.pop(key, None)

    def put(self, key: bytes, chunk: torch.Tensor, view: str = "chunk", parent: bytes | None = None,
            tokens: int = 0) -> bool:
        """Store a tensor (a convenience for tests and tools; engines write into L1 directly)."""
        status = self._fill_l1(key, chunk, view)
        if status is ReserveStatus.OK:
            self.evictions.forget(key)
            if parent is not None:
                self.partial_index.add(parent, key, tokens)
            self._write_down(key)
        return status is not ReserveStatus.NO_ROOM

    def flush(self, timeout: float = 60.0) -> bool:
        """Write down what is queued and what waits for its eviction (tests, shutdown); False on timeout."""
        return self._behind is None or self._behind.flush(timeout)

    def _fill_l1(self, key: bytes, chunk: torch.Tensor, view: str = "chunk") -> ReserveStatus:
        """Copy a tensor into a new L1 entry and commit it (EXISTS: already there; NO_ROOM: not stored)."""
        meta = EntryMeta.of(chunk, view)
        reservation = self.l1.reserve(key, meta.nbytes, meta.encode())
        if reservation.status is ReserveStatus.OK:
            extent = reservation.granted
            self._buffer[extent.offset:extent.offset + extent.nbytes] = tensor_bytes(chunk)
            self.l1.commit(key)
        return reservation.status

    def _write_down(self, key: bytes) -> None:
        """Send a newly committed L1 entry to the lower tiers, through or behind, as each is configured."""
        if self._behind is None:
            return
        through = self._targets(key, "write_through")
        if through:
            extent = self.l1.acquire(key)
            if extent is not None:
                try:
                    self._writer.write([Pinned(key, extent)], lambda _key: through)
                finally:
                    self.l1.release(key, extent)
        if any(t.write_policy == "write_behind" for t in self.lower):
            self._behind.enqueue(key)
        if self._write_back is not None:
            self._write_back.mark(key)

    def _targets(self, key: bytes, policy: str) -> list[LowerTier]:
        return [t for t in self.lower if t.write_policy == policy and self._admission.admits(t, key)]

    # -------------------------------------------------------------------- reads
    def acquire(self, key: bytes, promote: bool = True) -> Extent | None:
        """Pin ``key`` in L1; with ``promote``, first bring it up from a lower tier (waits for the read)."""
        extent = self.l1.acquire(key)
        if extent is None and promote and self._promoter is not None and self._promoter.promote(key):
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
        return EntryMeta.decode(extent.meta).tensor_in(self._buffer, extent.offset)

    def delete(self, key: bytes) -> bool:
        removed = self.l1.delete(key)
        for lower in self.lower:
            removed = self._guard.call(lower.tier.name, "delete", partial(lower.tier.delete, key), False) or removed
        return removed

    def write_queue_bytes(self) -> int:
        """Bytes waiting to be written to the lower tiers (0 without them)."""
        return 0 if self._behind is None else self._behind.pending_bytes

    def stats(self) -> dict[str, TierStats]:
        tiers: list[MemoryTier | Tier] = [self.l1, *(t.tier for t in self.lower)]
        return {tier.name: tier.stats() for tier in tiers}

    def close(self, timeout: float = 10.0) -> None:
        """Stop the background threads, then close the lower tiers (``flush`` first to finish the writes)."""
        if self._behind is not None:
            self._behind.close()
        if self._promoter is not None:
            self._promoter.close()
        for thread in self.threads:
            thread.join(timeout)
        for lower in self.lower:
            self._guard.call(lower.tier.name, "close", lower.tier.close, None)
