"""L1: entries in one byte arena (a shared-memory segment on a node), with a budget and LRU eviction.

Writes are two-phase: :meth:`MemoryTier.reserve` hands out an extent that
nobody else can see, the writer fills it (in another process, through shared
memory), and :meth:`commit` makes it visible; :meth:`abort` gives it back.
Readers :meth:`acquire` an entry, which pins it (a pinned entry is never evicted
or reused) until they :meth:`release` it.  The tier only does bookkeeping on
offsets; the bytes move in whichever process maps the arena.

A user may also :meth:`keep` entries (``kvmesh prewarm --pin``: a system prompt, an agent's tool definitions)
until a deadline or until :meth:`unkeep`: eviction passes over them, within ``keep_budget`` bytes, so
that a flood of other prompts never drops them.  Kept entries can still be deleted (a corrupt entry).
"""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from kvmesh.tiers.arena import ExtentAllocator
from kvmesh.tiers.base import EntryInfo, TierStats, Value
from kvmesh.tiers.buffers import joined, parts_of
from kvmesh.tiers.eviction import EvictionPolicy, LRUPolicy


class ReserveStatus(enum.Enum):
    OK = "ok"
    EXISTS = "exists"  # committed or being written by someone else: nothing to do
    NO_ROOM = "no_room"  # everything that could be evicted is pinned or being written


@dataclass(frozen=True, slots=True)
class Extent:
    offset: int
    nbytes: int
    meta: str = ""


@dataclass(frozen=True, slots=True)
class Reservation:
    status: ReserveStatus
    extent: Extent | None = None  # set exactly when status is OK

    @property
    def granted(self) -> Extent:
        """The reserved extent; asking for it when nothing was reserved is a caller's bug."""
        if self.extent is None:
            raise RuntimeError(f"no extent was reserved (status {self.status.name})")
        return self.extent


@dataclass(frozen=True, slots=True)
class KeepResult:
    kept: int  # entries kept from eviction now
    missing: int  # not in L1 (never stored, evicted, or only below L1)
    over_budget: int  # not kept: keeping them would pass ``keep_budget``


@dataclass(slots=True)
class _Entry:
    extent: Extent
    committed: bool = False
    pins: int = 0
    committed_at: float = 0.0  # the tier's clock


@dataclass
class MemoryTier:
    """Bookkeeping of an arena of ``capacity`` bytes; ``buffer`` (if given) holds the bytes."""

    capacity: int
    buffer: memoryview | None = None
    alignment: int = 4096
    name: str = "l1"
    _alloc: ExtentAllocator = field(init=False)
    _entries: dict[bytes, _Entry] = field(init=False, default_factory=dict)
    _stats: TierStats = field(init=False)
    _lock: threading.RLock = field(init=False, default_factory=threading.RLock)
    # copies deleted while readers still pin them: extent -> pins; freed at the last release
    _orphans: dict[Extent, int] = field(init=False, default_factory=dict)
    # told of every entry that an eviction drops, under this tier's lock (the store's write-back)
    on_evict: Callable[[bytes], None] | None = field(default=None)
    policy: EvictionPolicy = field(default_factory=LRUPolicy)  # which entries go first
    keep_budget: int = 0  # bytes of entries that may be kept from eviction at once (``keep``)
    clock: Callable[[], float] = field(default=time.monotonic)
    _kept: dict[bytes, float] = field(init=False, default_factory=dict)  # key -> until (``clock``)

    def __post_init__(self) -> None:
        self._alloc = ExtentAllocator(self.capacity, self.alignment)
        self._stats = TierStats(capacity=self._alloc.capacity)
        if self.buffer is not None and len(self.buffer) < self._alloc.capacity:
            raise ValueError(f"buffer of {len(self.buffer)} bytes is smaller than capacity {self.capacity}")

    # ------------------------------------------------------------ two-phase write
    def reserve(self, key: bytes, nbytes: int, meta: str = "", start: int = 0, tokens: int = 0,
                previous: bytes | None = None) -> Reservation:
        """Room for ``key``; ``start``, ``tokens`` and ``previous`` (the chunk before it in its prompt) say
        what it is worth to the eviction policy."""
        with self._lock:
            if key in self._entries:
                return Reservation(ReserveStatus.EXISTS)
            if self._alloc.rounded(nbytes) > self._alloc.capacity:
                self._stats.rejected_stores += 1
                return Reservation(ReserveStatus.NO_ROOM)
            offset = self._alloc.allocate(nbytes)
            if offset is None:
                self._expire_kept()
                for victim in self.policy.candidates():
                    if self._entries[victim].pins == 0 and victim not in self._kept:
                        self._drop(victim)
                        self._stats.evictions += 1
                        if self.on_evict is not None:
                            self.on_evict(victim)
                        offset = self._alloc.allocate(nbytes)
                        if offset is not None:
                            break
            if offset is None:
                self._stats.rejected_stores += 1
                return Reservation(ReserveStatus.NO_ROOM)
            extent = Extent(offset, nbytes, meta)
            self._entries[key] = _Entry(extent)
            self.policy.describe(key, nbytes, start, tokens, previous)
            return Reservation(ReserveStatus.OK, extent)

    def describe(self, key: bytes) -> EntryInfo | None:
        """A committed entry: its bytes and how long ago it was stored."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or not entry.committed:
                return None
            return EntryInfo(self.name, entry.extent.nbytes, max(0.0, self.clock() - entry.committed_at), "raw")

    def commit(self, key: bytes) -> None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry.committed:
                raise KeyError(f"no reservation for key {key.hex()} to commit")
            entry.committed = True
            entry.committed_at = self.clock()
            self.policy.add(key)
            self._stats.stores += 1

    def abort(self, key: bytes) -> None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and not entry.committed:
                del self._entries[key]
                self._alloc.free(entry.extent.offset, entry.extent.nbytes)
                self.policy.remove(key)  # forgets what ``reserve`` described

    # --------------------------------------------------------------------- reads
    def contains(self, key: bytes) -> bool:
        with self._lock:
            entry = self._entries.get(key)
            return entry is not None and entry.committed

    def lookup(self, keys: Sequence[bytes]) -> int:
        with self._lock:
            count = 0
            for key in keys:
                if not self.contains(key):
                    break
                count += 1
            self._stats.hits += count
            self._stats.misses += int(count < len(keys))
            return count

    def acquire(self, key: bytes) -> Extent | None:
        """Pin an entry and say where it lies; None when absent."""
        with self._lock:
            if not self.contains(key):
                return None
            entry = self._entries[key]
            entry.pins += 1
            self.policy.touch(key)
            return entry.extent

    def release(self, key: bytes, extent: Extent) -> None:
        """Unpin the copy that ``acquire`` returned (it may have been deleted meanwhile)."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry.extent == extent and entry.pins > 0:
                entry.pins -= 1
                return
            pins = self._orphans.get(extent)
            if pins is None:
                raise KeyError(f"key {key.hex()} at offset {extent.offset} is not pinned")
            if pins > 1:
                self._orphans[extent] = pins - 1
            else:
                del self._orphans[extent]
                self._alloc.free(extent.offset, extent.nbytes)

    # ------------------------------------------------------------ kept from eviction
    def keep(self, keys: Sequence[bytes], seconds: float) -> KeepResult:
        """Keep the committed entries of ``keys`` from eviction for ``seconds`` (a kept one: its deadline
        moves), as far as ``keep_budget`` allows, first to last; absent ones are counted, not kept."""
        if seconds <= 0:
            raise ValueError(f"a pin lasts a positive number of seconds, got {seconds}")
        with self._lock:
            self._expire_kept()
            until = self.clock() + seconds
            used = self._kept_bytes()
            kept = missing = over = 0
            for key in keys:
                entry = self._entries.get(key)
                if entry is None or not entry.committed:
                    missing += 1
                elif key in self._kept:
                    self._kept[key] = max(self._kept[key], until)
                    kept += 1
                elif used + entry.extent.nbytes > self.keep_budget:
                    over += 1
                else:
                    self._kept[key] = until
                    used += entry.extent.nbytes
                    kept += 1
            return KeepResult(kept, missing, over)

    def unkeep(self, keys: Sequence[bytes] | None = None) -> int:
        """Let eviction have these entries again (None: every kept one); how many were kept."""
        with self._lock:
            if keys is None:
                count = len(self._kept)
                self._kept.clear()
                return count
            return sum(1 for key in keys if self._kept.pop(key, None) is not None)

    def kept(self) -> tuple[int, int]:
        """Entries kept from eviction now, and their bytes."""
        with self._lock:
            self._expire_kept()
            return len(self._kept), self._kept_bytes()

    def _kept_bytes(self) -> int:
        return sum(self._entries[key].extent.nbytes for key in self._kept)

    def _expire_kept(self) -> None:
        now = self.clock()
        for key in [key for key, until in self._kept.items() if until <= now]:
            del self._kept[key]

    def delete(self, key: bytes) -> bool:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or not entry.committed:
                return False
            self._kept.pop(key, None)
            if entry.pins:
                del self._entries[key]
                self.policy.remove(key)
                self._orphans[entry.extent] = entry.pins
            else:
                self._drop(key)
            return True

    # ------------------------------------------------------- the byte Tier protocol (a lower tier in tests)
    def put(self, key: bytes, data: bytes | memoryview, meta: str = "") -> bool:
        assert self.buffer is not None, "put() needs a tier that holds its buffer"
        reservation = self.reserve(key, len(data), meta)
        if reservation.status is not ReserveStatus.OK:
            return reservation.status is ReserveStatus.EXISTS
        extent = reservation.granted
        self.buffer[extent.offset:extent.offset + extent.nbytes] = data
        self.commit(key)
        return True

    def get(self, key: bytes) -> bytes | None:
        assert self.buffer is not None, "get() needs a tier that holds its buffer"
        extent = self.acquire(key)
        if extent is None:
            with self._lock:
                self._stats.misses += 1
            return None
        try:
            return bytes(self.buffer[extent.offset:extent.offset + extent.nbytes])
        finally:
            with self._lock:
                self._stats.hits += 1
            self.release(key, extent)

    def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        return [self.get(key) for key in keys]

    def put_many(self, items: Sequence[tuple[bytes, Value]]) -> list[bool]:
        return [self.put(key, joined(parts_of(data))) for key, data in items]

    def close(self) -> None:
        """Nothing to let go of: the arena belongs to whoever mapped it."""

    def stats(self) -> TierStats:
        with self._lock:
            self._stats.entries = sum(1 for e in self._entries.values() if e.committed)
            self._stats.bytes_used = self._alloc.used
            self._stats.pinned_entries, self._stats.pinned_bytes = self.kept()
            return TierStats(**self._stats.to_dict())

    @property
    def used(self) -> int:
        """Bytes allocated now (entries, reservations, pinned deleted copies)."""
        with self._lock:
            return self._alloc.used

    def next_to_evict(self, nbytes: int) -> list[bytes]:
        """Committed entries in the order the policy would evict them, as many as hold ``nbytes``."""
        keys: list[bytes] = []
        with self._lock:
            total = 0
            self._expire_kept()
            for key in self.policy.candidates():
                if total >= nbytes:
                    break
                if key in self._kept:
                    continue
                keys.append(key)
                total += self._entries[key].extent.nbytes
        return keys

    def extents(self) -> list[Extent]:
        """Every extent currently allocated (entries, reservations, pinned deleted copies)."""
        with self._lock:
            return [e.extent for e in self._entries.values()] + list(self._orphans)

    # ------------------------------------------------------------------ internals
    def _drop(self, key: bytes) -> None:
        entry = self._entries.pop(key)
        self._kept.pop(key, None)
        self.policy.remove(key)
        self._alloc.free(entry.extent.offset, entry.extent.nbytes)
