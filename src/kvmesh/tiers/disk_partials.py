"""The disk tier's partial-chunk index: one small checksummed file per parent key, beside the entries.

Why files: the disk tier's index is the file system, so that what is on disk is
found again after a restart; the partial children of a parent must survive the
same way.  ``<dir>/<first hex byte of parent>/<parent hex>.pidx`` lists them:

    magic "KVMP" | format version u16 | parent length u16 | record count u32 | parent key
    then per child, oldest first: key length u16 | tokens u32 | child key
    then xxh3-64 of everything before it, u64 (all little-endian)

A file is rewritten whole through a temp file and a rename, so a reader never
sees half of one.  A file that is damaged, truncated or names another parent is
a miss: it is removed and counted, never an error.  At start-up every file is
read, children whose entries are gone are dropped (the file is rewritten, or
removed when nothing is left), and the newest children are kept within the
bounds of :class:`~kvmesh.store.partials.PartialIndex`.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

import xxhash

from kvmesh.store.partials import MAX_CHILDREN, MAX_CHILDREN_PER_PARENT, PartialIndex

log = logging.getLogger(__name__)

MAGIC = b"KVMP"
FORMAT_VERSION = 1
INDEX_SUFFIX = ".pidx"
_HEAD = struct.Struct("<4sHHI")  # magic, version, parent key length, record count
_RECORD = struct.Struct("<HI")  # child key length, tokens
_TRAILER = struct.Struct("<Q")  # xxh3-64 of the rest
MAX_KEY_BYTES = 64


class CorruptIndex(ValueError):
    """An index file that is not a whole, intact list of one parent's children."""


def encode_index(parent: bytes, children: Iterable[tuple[bytes, int]]) -> bytes:
    """The bytes of an index file listing ``children`` (oldest first) under ``parent``."""
    items = list(children)
    parts = [_HEAD.pack(MAGIC, FORMAT_VERSION, len(parent), len(items)), parent]
    for child, tokens in items:
        parts += [_RECORD.pack(len(child), tokens), child]
    body = b"".join(parts)
    return body + _TRAILER.pack(xxhash.xxh3_64_intdigest(body))


def decode_index(data: bytes, parent: bytes) -> list[tuple[bytes, int]]:
    """(child, tokens), oldest first, from an index file of ``parent``; CorruptIndex if it is not one."""
    if len(data) < _HEAD.size + _TRAILER.size:
        raise CorruptIndex(f"{len(data)} bytes is shorter than a header")
    body, (checksum,) = data[:-_TRAILER.size], _TRAILER.unpack_from(data, len(data) - _TRAILER.size)
    if xxhash.xxh3_64_intdigest(body) != checksum:
        raise CorruptIndex("checksum mismatch")
    magic, version, parent_length, count = _HEAD.unpack_from(body)
    if magic != MAGIC:
        raise CorruptIndex(f"bad magic {magic!r}")
    if version != FORMAT_VERSION:
        raise CorruptIndex(f"format version {version}, this kvmesh reads {FORMAT_VERSION}")
    at = _HEAD.size + parent_length
    if body[_HEAD.size:at] != parent:
        raise CorruptIndex("the file indexes another parent")
    children = []
    for _ in range(count):
        if at + _RECORD.size > len(body):
            raise CorruptIndex("truncated record")
        key_length, tokens = _RECORD.unpack_from(body, at)
        at += _RECORD.size
        child = body[at:at + key_length]
        at += key_length
        if not 1 <= key_length <= MAX_KEY_BYTES or len(child) != key_length or tokens < 1:
            raise CorruptIndex("bad record")
        children.append((child, tokens))
    if at != len(body):
        raise CorruptIndex(f"{len(body) - at} bytes after the last record")
    return children


class DiskPartials:
    """Partial children per parent, in memory and mirrored to one index file per parent under ``directory``.

    ``on_fault(kind, message)`` is told of every file fault (the disk tier counts
    and logs them); a fault leaves the in-memory index as it is.
    """

    def __init__(self, directory: Path, on_fault: Callable[[str, str], None], fsync: bool = False,
                 per_parent: int = MAX_CHILDREN_PER_PARENT, total: int = MAX_CHILDREN) -> None:
        self.directory = directory
        self.fsync = fsync
        self._on_fault = on_fault
        self._index = PartialIndex(per_parent, total)
        self._file_lock = threading.Lock()  # one writer of index files at a time: each write is the latest state

    def path(self, parent: bytes) -> Path:
        hexkey = parent.hex()
        return self.directory / hexkey[:2] / (hexkey + INDEX_SUFFIX)

    def load(self, files: Iterable[Path], present: Callable[[bytes], bool]) -> None:
        """Read the index files found at start-up (oldest first), keeping children whose entries exist."""
        for path in files:
            parent = _parent_of(path.name)
            if parent is None:
                continue
            try:
                children = decode_index(path.read_bytes(), parent)
            except (CorruptIndex, OSError) as err:
                self._on_fault("index_corrupt", f"dropping partial index {path}: {err}")
                self._unlink(path)
                continue
            live = [(child, tokens) for child, tokens in children if present(child)]
            for child, tokens in live:
                for dropped in self._index.add(parent, child, tokens):
                    self._unlink(self.path(dropped))
            if len(live) != len(children) or len(self._index.children(parent)) != len(children):
                self._sync(parent)

    def add(self, parent: bytes, child: bytes, tokens: int) -> bool:
        """Index a child (its entry is already on disk) and rewrite its parent's file; False on a fault."""
        for dropped in self._index.add(parent, child, tokens):
            self._sync(dropped)
        return self._sync(parent)

    def children(self, parent: bytes) -> list[tuple[bytes, int]]:
        return self._index.children(parent)

    def discard(self, parent: bytes, children: Iterable[bytes]) -> None:
        if self._index.discard(parent, children):
            self._sync(parent)

    def __len__(self) -> int:
        return len(self._index)

    def _sync(self, parent: bytes) -> bool:
        """Make ``parent``'s file say what the in-memory index says (no file when it lists nothing)."""
        path = self.path(parent)
        with self._file_lock:
            children = list(reversed(self._index.children(parent)))  # the file lists oldest first
            if not children:
                return self._unlink(path)
            temp = path.parent / f".{path.stem}p.{os.getpid()}.{threading.get_ident()}.tmp"
            try:
                path.parent.mkdir(mode=0o700, exist_ok=True)
                fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
                try:
                    view = memoryview(encode_index(parent, children))
                    while view:
                        view = view[os.write(fd, view):]
                    if self.fsync:
                        os.fsync(fd)
                finally:
                    os.close(fd)
                os.rename(temp, path)
            except OSError as err:
                self._unlink(temp)
                self._on_fault("index_write", f"cannot write partial index {path}: {err}")
                return False
        return True

    def _unlink(self, path: Path) -> bool:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as err:
            self._on_fault("index_unlink", f"cannot remove partial index {path}: {err}")
            return False
        return True


def _parent_of(filename: str) -> bytes | None:
    return key_in_name(filename, INDEX_SUFFIX)


def key_in_name(filename: str, suffix: str) -> bytes | None:
    """The key a tier file is named after (``<hex key><suffix>``); None for any other name."""
    if filename.startswith(".") or not filename.endswith(suffix):
        return None
    try:
        return bytes.fromhex(filename[:-len(suffix)])
    except ValueError:
        return None
