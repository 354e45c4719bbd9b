"""L2 on a local disk: one file per entry, under a byte budget with LRU eviction.

Why this shape:

* **One file per entry** (``<dir>/<first hex byte>/<hex key>.kv``): the file
  system is the index that survives a restart; a new :class:`DiskTier` lists the
  files (no payload is read) and orders them by modification time, which a hit
  refreshes, so least recently used survives a restart too.
* **Invisible until complete**: a writer fills a temp file beside the target
  and renames it into place.  Rename is atomic, so a reader (or a second process
  writing the same content-addressed key) never sees half an entry, even after
  ``kill -9``.  Temp files of writers that are gone are removed at start-up.
* **The file is the entry**: a codec's self-checking bytes (magic, version,
  header and payload checksums, ``codecs.base``) with no framing of its own, so
  a write is checksummed once.  A truncated or damaged file fails those checks
  where the store decodes it, and the store deletes it through :meth:`delete`
  and counts it.  Files of older versions (``KVMD`` framing, ``tiers.legacy``)
  are still read and checked here: a damaged one is a miss, deleted and counted
  in ``stats().errors`` (the first one is logged, the rest only counted).
* **Budget counted in file bytes** and never exceeded:
  room is reserved, and victims deleted, before the new file is written.
* **Partial chunks findable from their parent**: a small index file per parent
  key lists the partial chunks stored under it (``tiers.disk_partials``); it is
  written only after the entry itself, and a child whose entry is gone is
  filtered out when asked for.  Index files are outside the byte budget (they
  are bounded in number and size instead).
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from kvmesh.codecs import codec_of
from kvmesh.codecs.base import HEADER_PEEK, CorruptEntry
from kvmesh.tiers.base import Buffer, EntryInfo, TierStats, Value
from kvmesh.tiers.buffers import parts_of
from kvmesh.tiers.config import DiskTierConfig
from kvmesh.tiers.disk_partials import INDEX_SUFFIX, DiskPartials, key_in_name
from kvmesh.tiers.eviction import LRUPolicy
from kvmesh.tiers.legacy import DISK_MAGIC, disk_header, read_disk

log = logging.getLogger(__name__)

SUFFIX = ".kv"
TEMP_SUFFIX = ".tmp"
# a temp file whose writer's pid is alive is left alone unless it is older than this (pid reuse)
STALE_TEMP_SECONDS = 3600.0
_NO_ROOM = (errno.ENOSPC, errno.EDQUOT)
MAX_KEY_BYTES = 64  # its hex is the file name, which must stay short
FILE_MODE = 0o600  # entries and index files: this user's only
DIR_MODE = 0o700
_IOV_MAX = 512  # buffers per writev call (Linux allows 1024)


def entry_size(length: int) -> int:
    """Bytes an entry of ``length`` bytes occupies in the budget: its whole file, which is the entry."""
    return length


class DiskTier:
    """Entries as files under ``directory``, at most ``capacity_bytes`` of them in all."""

    def __init__(self, directory: Path | str, capacity_bytes: int, name: str = "disk",
                 fsync: bool = False) -> None:
        if capacity_bytes < 1:
            raise ValueError(f"capacity_bytes must be at least 1, got {capacity_bytes}")
        self.name = name
        self.directory = Path(directory)
        self.capacity = capacity_bytes
        self.fsync = fsync
        self._lock = threading.Lock()
        self._sizes: dict[bytes, int] = {}  # committed entries: key -> file size
        self._writing: dict[bytes, int] = {}  # puts in flight: key -> reserved bytes
        self._policy = LRUPolicy()
        self.on_evict: Callable[[bytes], None] | None = None  # told of each eviction, under the lock (the store)
        self._used = 0  # file bytes of committed entries plus reservations
        self._stats = TierStats(capacity=capacity_bytes)
        self._warned: set[str] = set()
        self._made_dirs: set[str] = set()
        self._partials = DiskPartials(self.directory, self._partial_fault, fsync)
        make_private_dir(self.directory)
        self._load_index()

    @classmethod
    def from_config(cls, config: DiskTierConfig, name: str = "disk") -> DiskTier:
        return cls(config.path, config.size, name=name, fsync=config.fsync)

    # --------------------------------------------------------------------- reads
    def contains(self, key: bytes) -> bool:
        with self._lock:
            return key in self._sizes

    def lookup(self, keys: Sequence[bytes]) -> int:
        with self._lock:
            count = 0
            for key in keys:
                if key not in self._sizes:
                    break
                count += 1
            self._stats.hits += count
            self._stats.misses += int(count < len(keys))
            return count

    def describe(self, key: bytes) -> EntryInfo | None:
        """The entry's file: its size, how long since it was written or last read, the codec it names."""
        with self._lock:
            if key not in self._sizes:
                return None
        try:
            with open(self._path(key), "rb") as file:
                stat = os.fstat(file.fileno())
                head = file.read(HEADER_PEEK)
        except OSError:  # evicted since, or unreadable: as a lookup would find it, gone
            return None
        return EntryInfo(self.name, stat.st_size, max(0.0, time.time() - stat.st_mtime), codec_of(head))

    def get(self, key: bytes) -> Buffer | None:
        with self._lock:
            if key not in self._sizes:
                self._stats.misses += 1
                return None
            self._policy.touch(key)
        try:
            payload = self._read(key)
        except FileNotFoundError:  # evicted or deleted since we looked
            payload, fault = None, None
        except CorruptEntry as err:
            payload, fault = None, f"corrupt entry {key.hex()}: {err}"
        except OSError as err:
            payload, fault = None, f"cannot read entry {key.hex()}: {err}"
        gone: list[tuple[bytes, int]] = []
        with self._lock:
            if payload is not None:
                self._stats.hits += 1
                return payload
            self._stats.misses += 1
            if fault is not None:
                self._stats.errors += 1
                gone = self._take(key)
            vanished = fault is None and key in self._sizes
        if vanished and not self._path(key).exists():  # removed behind our back (another process, a person)
            with self._lock:
                self._forget(key)
        self._delete_files(gone)
        if fault is not None:
            self._warn_once("read", "disk tier %s: dropped %s (further read faults are only counted)",
                            self.name, fault)
        return None

    def get_many(self, keys: Sequence[bytes]) -> list[Buffer | None]:
        """Each key's entry in turn (files are read one by one; the batch saves the store's calls)."""
        return [self.get(key) for key in keys]

    # -------------------------------------------------------------------- writes
    def put_many(self, items: Sequence[tuple[bytes, Value]]) -> list[bool]:
        return [self.put(key, data) for key, data in items]

    def put(self, key: bytes, data: Value) -> bool:
        """Store ``data`` (or the concatenation of its parts, written as they are, with no copy)."""
        if not 1 <= len(key) <= MAX_KEY_BYTES:
            raise ValueError(f"a key is a digest of 1..{MAX_KEY_BYTES} bytes, got {len(key)} bytes")
        payload = parts_of(data)
        if _starts_with(payload, DISK_MAGIC):  # would read as an old file: keep it in the old framing
            payload = [memoryview(disk_header(key, payload)), *payload]
        size = entry_size(sum(part.nbytes for part in payload))
        with self._lock:
            if key in self._sizes:
                self._policy.touch(key)
                return True
            if key in self._writing:  # the same content is on its way
                return True
            if sum(self._writing.values()) + size > self.capacity:  # too big, or no evictable room
                self._stats.rejected_stores += 1
                return False
            victims = self._make_room(size)
            self._writing[key] = size
            self._used += size
        self._delete_files(victims)  # outside the lock: lookups never wait on file I/O
        fault = self._write(key, payload)
        with self._lock:
            del self._writing[key]
            if fault is None:
                self._sizes[key] = size
                self._policy.add(key)
                self._stats.stores += 1
                return True
            self._used -= size
            no_room = fault.errno in _NO_ROOM
            if no_room:
                self._stats.rejected_stores += 1
            else:
                self._stats.errors += 1
        self._warn_once("full" if no_room else "write",
                        "disk tier %s: cannot store %s: %s (further such faults are only counted)",
                        self.name, key.hex(), fault)
        return False

    def delete(self, key: bytes) -> bool:
        with self._lock:
            if key not in self._sizes:
                return False
            gone = self._take(key)
        self._delete_files(gone)
        return True

    # ------------------------------------------------------- partial chunks
    def add_partial(self, parent: bytes, child: bytes, tokens: int) -> bool:
        """Index a partial chunk under its parent, once its entry is on disk (False if it is not)."""
        if not self.contains(child):
            return False
        return self._partials.add(parent, child, tokens)

    def partials(self, parent: bytes) -> list[tuple[bytes, int]]:
        """(child, tokens) of the partial chunks stored under ``parent``, newest first."""
        children = self._partials.children(parent)
        with self._lock:
            gone = [child for child, _ in children if child not in self._sizes]
        if gone:  # evicted or deleted since they were indexed
            self._partials.discard(parent, gone)
            children = [item for item in children if item[0] not in gone]
        return children

    def close(self) -> None:
        """Nothing is held open between calls: every file is closed when its read or write is done."""

    def stats(self) -> TierStats:
        with self._lock:
            self._stats.entries = len(self._sizes)
            self._stats.bytes_used = self._used
            return TierStats(**self._stats.to_dict())

    # ----------------------------------------------------------------- file I/O
    def _path(self, key: bytes) -> Path:
        hexkey = key.hex()
        return self.directory / hexkey[:2] / (hexkey + SUFFIX)

    def _read(self, key: bytes) -> bytes | memoryview:
        """The entry in ``key``'s file: one read straight into a new ``bytes`` (``os.pread`` allocates
        it and the kernel fills it), so a 40 MB entry costs one large read and no extra copy.
        An old file's framing is checked and taken off.
        """
        fd = os.open(self._path(key), os.O_RDONLY)
        try:
            file_size = os.fstat(fd).st_size
            data = os.pread(fd, file_size, 0)
            if len(data) != file_size:
                raise CorruptEntry(f"read {len(data)} bytes of a {file_size}-byte file")
            try:  # a hit refreshes the mtime, which orders LRU after a restart
                os.utime(fd)
            except OSError:
                pass
        finally:
            os.close(fd)
        return read_disk(data, key) if data[:len(DISK_MAGIC)] == DISK_MAGIC else data

    def _write(self, key: bytes, payload: list[memoryview]) -> OSError | None:
        """Write ``key``'s file through a temp file and a rename; the error if it failed.

        The parts go down in one ``writev``: the kernel copies them into the page cache straight
        from where they lie (an L1 extent, for the raw codec), with the GIL released.
        """
        path = self._path(key)
        temp = path.parent / f".{path.stem}.{os.getpid()}.{threading.get_ident()}{TEMP_SUFFIX}"
        try:
            self._ensure_dir(path.parent)
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, FILE_MODE)
            try:
                _writev_all(fd, payload)
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(temp, path)
            if self.fsync:
                _fsync_dir(path.parent)
        except OSError as err:
            self._unlink(temp)
            return err
        return None

    def _ensure_dir(self, directory: Path) -> None:
        if directory.name not in self._made_dirs:
            directory.mkdir(mode=DIR_MODE, exist_ok=True)
            self._made_dirs.add(directory.name)

    def _unlink(self, path: Path) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as err:
            self._warn_once("unlink", "disk tier %s: cannot remove %s: %s", self.name, path, err)

    # ------------------------------------------------------------------- index
    def _load_index(self) -> None:
        """Rebuild the index from the file names and sizes; remove temp files of dead writers."""
        found: list[tuple[int, bytes, int]] = []  # (mtime, key, size)
        index_files: list[tuple[int, str]] = []  # (mtime, path) of partial-chunk index files
        now = time.time()
        for sub in os.scandir(self.directory):
            if not sub.is_dir(follow_symlinks=False):
                continue
            self._made_dirs.add(sub.name)
            for item in os.scandir(sub.path):
                if item.name.endswith(TEMP_SUFFIX):
                    self._remove_stale_temp(item, now)
                    continue
                if item.name.endswith(INDEX_SUFFIX):
                    try:
                        index_files.append((item.stat(follow_symlinks=False).st_mtime_ns, item.path))
                    except FileNotFoundError:
                        pass
                    continue
                key = _key_of(item.name)
                if key is None or not item.is_file(follow_symlinks=False):
                    continue
                try:
                    st = item.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                found.append((st.st_mtime_ns, key, st.st_size))
        found.sort()
        for _, key, size in found:
            self._sizes[key] = size
            self._policy.add(key)
            self._used += size
        self._delete_files(self._make_room(0))  # the budget may be smaller than last time
        self._partials.load([Path(path) for _, path in sorted(index_files)], self._sizes.__contains__)
        if found:
            log.info("disk tier %s: found %d entries (%d bytes) in %s", self.name, len(self._sizes),
                     self._used, self.directory)

    def _remove_stale_temp(self, item: os.DirEntry[str], now: float) -> None:
        parts = item.name.split(".")  # "", hexkey, pid, thread id, "tmp"
        try:
            pid = int(parts[2])
            age = now - item.stat(follow_symlinks=False).st_mtime
        except (IndexError, ValueError, OSError):
            pid, age = -1, float("inf")
        if pid == os.getpid() or (age < STALE_TEMP_SECONDS and _alive(pid)):
            return  # a writer in this process or a live one elsewhere may still rename it
        self._unlink(Path(item.path))

    def _make_room(self, size: int) -> list[tuple[bytes, int]]:
        """Take least recently used entries out of the index until ``size`` more bytes fit (lock held).

        Returns them for :meth:`_delete_files`, which the caller runs once the lock is released: their
        bytes stay counted until their files are gone, so the bytes on disk never exceed what the index
        counts, and no lookup waits on an unlink.
        """
        victims: list[tuple[bytes, int]] = []
        freed = 0  # by this call's victims, once deleted (others' pending deletions are not counted on)
        for victim in self._policy.candidates():
            if self._used - freed + size <= self.capacity:
                break
            taken = self._take(victim)
            victims += taken
            freed += sum(nbytes for _, nbytes in taken)
            self._stats.evictions += 1
            if taken and self.on_evict is not None:
                self.on_evict(victim)
        return victims

    def _take(self, key: bytes) -> list[tuple[bytes, int]]:
        """Forget an entry, its bytes still counted until its file is deleted (lock held)."""
        size = self._sizes.pop(key, None)
        if size is None:
            return []
        self._policy.remove(key)
        return [(key, size)]

    def _delete_files(self, taken: list[tuple[bytes, int]]) -> None:
        """Delete the files of entries :meth:`_take` took, then give their bytes back (lock not held)."""
        if not taken:
            return
        for key, _ in taken:
            self._unlink(self._path(key))
        with self._lock:
            self._used -= sum(size for _, size in taken)

    def _forget(self, key: bytes) -> None:
        size = self._sizes.pop(key, None)
        if size is not None:
            self._policy.remove(key)
            self._used -= size

    def _partial_fault(self, kind: str, message: str) -> None:
        """A partial index file that cannot be read or written: a miss, counted, logged once per kind."""
        with self._lock:
            self._stats.errors += 1
        self._warn_once(kind, "disk tier %s: %s (further such faults are only counted)", self.name, message)

    def _warn_once(self, kind: str, message: str, *args: object) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            log.warning(message, *args)
        else:
            log.debug(message, *args)


def make_private_dir(directory: Path) -> None:
    """Create the tier's directory readable by its user alone; narrow one of ours that is wider.

    Entries hold KV, from which prompts can be recovered (layer 0's keys and values are a function of the
    tokens): files are 0600 and directories 0700, so no other local user reads another tenant's KV.
    """
    directory.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    info = directory.stat()
    if info.st_uid == os.geteuid() and info.st_mode & 0o077:
        os.chmod(directory, DIR_MODE)
        log.info("disk tier: %s was readable by other users; now 0700", directory)


def _starts_with(parts: list[memoryview], magic: bytes) -> bool:
    head = b"".join(bytes(part[:len(magic)]) for part in parts[:len(magic)])
    return head[:len(magic)] == magic


def _writev_all(fd: int, views: list[memoryview]) -> None:
    """``writev`` until every byte of ``views`` is written (a call may write less than asked)."""
    views = [view for view in views if view.nbytes]
    while views:
        written = os.writev(fd, views[:_IOV_MAX])
        while views and written >= views[0].nbytes:
            written -= views[0].nbytes
            views.pop(0)
        if written:
            views[0] = views[0][written:]


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _key_of(filename: str) -> bytes | None:
    return key_in_name(filename, SUFFIX)


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
