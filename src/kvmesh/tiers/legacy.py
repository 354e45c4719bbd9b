"""Reading entries that older kvmesh versions framed per tier (disk ``KVMD``, Redis ``KVMR``).

Tiers now store the codec's self-checking entry as it is (``codecs.base``: magic, version, a header
checksum and a payload checksum), so a second framing with its own checksum only cost bandwidth.
Entries written before keep their framing until they are evicted; these readers check it and
return the entry inside, raising :class:`~kvmesh.codecs.base.CorruptEntry` for anything damaged.
A new value that happens to start with one of these magics is written in the old framing, so a
reader never mistakes it for one.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

import xxhash

from kvmesh.codecs.base import CorruptEntry

DISK_MAGIC = b"KVMD"
REDIS_MAGIC = b"KVMR"
FORMAT_VERSION = 1
# disk: magic, format version, key length, payload length, xxh3-64 of the payload; the key follows
DISK_HEADER = struct.Struct("<4sHHQQ")
# redis: magic, format version, part count (0: the payload follows the header), payload length, xxh3-64
REDIS_HEADER = struct.Struct("<4sHIQQ")
MAX_PARTS = 65536  # a bound that keeps a damaged part count from asking for millions of keys


def disk_header(key: bytes, payload: Sequence[memoryview]) -> bytes:
    """The old disk framing's header (and key) for ``payload``'s parts."""
    checksum = xxhash.xxh3_64()
    for part in payload:
        checksum.update(part)
    length = sum(part.nbytes for part in payload)
    return DISK_HEADER.pack(DISK_MAGIC, FORMAT_VERSION, len(key), length, checksum.intdigest()) + key


def read_disk(data: bytes | memoryview, key: bytes) -> memoryview:
    """The entry inside an old disk file of ``key`` (its whole content), after checking it."""
    view = memoryview(data)
    size = DISK_HEADER.size + len(key)
    if len(view) < size:
        raise CorruptEntry(f"file of {len(view)} bytes is shorter than a header")
    magic, version, key_length, length, checksum = DISK_HEADER.unpack_from(view)
    if magic != DISK_MAGIC:
        raise CorruptEntry(f"bad magic {bytes(magic)!r}: not a kvmesh disk entry")
    if version != FORMAT_VERSION:
        raise CorruptEntry(f"format version {version}, this kvmesh reads {FORMAT_VERSION}")
    if key_length != len(key) or view[DISK_HEADER.size:size] != key:
        raise CorruptEntry("the file holds another key")
    if len(view) != size + length:
        raise CorruptEntry(f"file is {len(view)} bytes, header says {size + length}")
    payload = view[size:]
    if xxhash.xxh3_64_intdigest(payload) != checksum:
        raise CorruptEntry("payload checksum mismatch")
    return payload


@dataclass(frozen=True, slots=True)
class RedisHeader:
    """The old Redis framing's head: the entry inline after it (``parts`` 0) or in ``parts`` keys."""

    parts: int
    length: int
    checksum: int

    def pack(self) -> bytes:
        return REDIS_HEADER.pack(REDIS_MAGIC, FORMAT_VERSION, self.parts, self.length, self.checksum)

    @classmethod
    def of(cls, payload: bytes | memoryview, parts: int = 0) -> RedisHeader:
        return cls(parts, memoryview(payload).nbytes, xxhash.xxh3_64_intdigest(payload))

    @classmethod
    def unpack(cls, value: bytes | memoryview) -> RedisHeader:
        if len(value) < REDIS_HEADER.size:
            raise CorruptEntry(f"value of {len(value)} bytes is shorter than a header")
        magic, version, parts, length, checksum = REDIS_HEADER.unpack_from(value)
        if magic != REDIS_MAGIC:
            raise CorruptEntry(f"bad magic {bytes(magic)!r}: not a kvmesh value")
        if version != FORMAT_VERSION:
            raise CorruptEntry(f"format version {version}, this kvmesh reads {FORMAT_VERSION}")
        if parts > MAX_PARTS:
            raise CorruptEntry(f"part count {parts} is over {MAX_PARTS}")
        return cls(parts, length, checksum)

    def checked(self, payload: bytes | memoryview) -> bytes | memoryview:
        """``payload`` if it is the one this header describes."""
        if len(payload) != self.length:
            raise CorruptEntry(f"payload is {len(payload)} bytes, header says {self.length}")
        if xxhash.xxh3_64_intdigest(payload) != self.checksum:
            raise CorruptEntry("payload checksum mismatch")
        return payload
