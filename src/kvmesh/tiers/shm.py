"""A named shared-memory segment (a file in /dev/shm) mapped into this process.

We map the file ourselves instead of using ``multiprocessing.shared_memory``,
whose resource tracker unlinks a segment when any process that merely opened
it exits.  Only the node daemon creates and unlinks; engines open.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass
from pathlib import Path

SHM_DIR = Path("/dev/shm")


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
        path = SHM_DIR / name
        path.unlink(missing_ok=True)  # a stale segment of a dead daemon (the caller holds the lock)
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.ftruncate(fd, size)
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
