"""A named shared-memory segment (a file in /dev/shm) mapped into this process.

We map the file ourselves instead of using ``multiprocessing.shared_memory``,
whose resource tracker unlinks a segment when any process that merely opened
it exits.  Only the node daemon creates and unlinks; engines open.
"""

from __future__ import annotations

import errno
import mmap
import os
from dataclasses import dataclass
from pathlib import Path

SHM_DIR = Path("/dev/shm")
GiB = 1 << 30


class SharedMemoryTooSmall(OSError):
    """L1 does not fit the shared-memory filesystem (a container's /dev/shm is 64 MiB by default)."""


def _too_small(size: int, reason: str) -> SharedMemoryTooSmall:
    stats = os.statvfs(SHM_DIR)
    free, total = stats.f_bavail * stats.f_frsize, stats.f_blocks * stats.f_frsize
    return SharedMemoryTooSmall(
        errno.ENOSPC,
        f"kvmesh's L1 of {size / GiB:.2f} GiB does not fit {SHM_DIR} ({reason}: {free / GiB:.2f} GiB free of "
        f"{total / GiB:.2f} GiB); set l1_size to at most what is free (--set l1_size=...), or give the "
        f"machine more shared memory (docker run --shm-size=...)")


@dataclass
class SharedSegment:
    name: str
    size: int
    _map: mmap.mmap

    @property
    def path(self) -> Path:
        return SHM_DIR / self.name

    @property
    def buffer(self) -> memoryview:
        return memoryview(self._map)

    @classmethod
    def create(cls, name: str, size: int, prefault: bool = True) -> SharedSegment:
        """Create and map the segment, its memory reserved now: a segment larger than the filesystem's
        free space would map, and the first write past it would kill the writing process (SIGBUS), the
        engine's worker included.  Refused instead, naming /dev/shm, its free space and ``l1_size``."""
        path = SHM_DIR / name
        path.unlink(missing_ok=True)  # a stale segment of a dead daemon (the caller holds the lock)
        stats = os.statvfs(SHM_DIR)
        if size > stats.f_bavail * stats.f_frsize:
            raise _too_small(size, "more than is free")
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            try:
                os.posix_fallocate(fd, 0, size)  # every page reserved now, or an error now
            except OSError as err:
                path.unlink(missing_ok=True)
                if err.errno in (errno.ENOSPC, errno.EFBIG, errno.ENOMEM):
                    raise _too_small(size, "reserving it failed") from None
                raise
            flags = mmap.MAP_SHARED | (mmap.MAP_POPULATE if prefault else 0)
            mapped = mmap.mmap(fd, size, flags=flags)
        finally:
            os.close(fd)
        return cls(name, size, mapped)

    @classmethod
    def open(cls, name: str, size: int) -> SharedSegment:
        path = SHM_DIR / name
        fd = os.open(path, os.O_RDWR)
        try:
            actual = os.fstat(fd).st_size
            if actual < size:
                raise OSError(f"shared segment {path} is {actual} bytes, expected {size}")
            mapped = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)
        finally:
            os.close(fd)
        return cls(name, size, mapped)

    def close(self) -> None:
        try:
            self._map.close()
        except BufferError:
            pass  # views still alive; the mapping goes with the process

    def unlink(self) -> None:
        self.path.unlink(missing_ok=True)
