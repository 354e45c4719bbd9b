"""How an entry lies in Redis: inline as the head's value, or in parts under a short head.

The value is the codec's own self-checking entry; only an entry too big for one value gets a head
of its own (``KVMS``: part count and length), since a reader must know how many parts to fetch.
Heads written by older kvmesh versions (``KVMR``, ``tiers.legacy``) are read and checked too.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from kvmesh.codecs.base import CorruptEntry
from kvmesh.tiers.legacy import MAX_PARTS, REDIS_HEADER, REDIS_MAGIC, RedisHeader

# the head of an entry kept in parts: magic, part count, the entry's length (the parts hold the entry)
MANIFEST_MAGIC = b"KVMS"  # "split" (the disk's partial index files are KVMP)
_MANIFEST = struct.Struct("<4sIQ")
HEAD_MAGICS = (REDIS_MAGIC, MANIFEST_MAGIC)  # an entry starting with one of these goes in parts
PEEK = max(_MANIFEST.size, REDIS_HEADER.size)  # bytes of a head that say whether it has parts


@dataclass(frozen=True, slots=True)
class SplitHead:
    """An entry kept in ``parts`` keys: their count and the entry's length (an old head: a checksum too)."""

    parts: int
    length: int
    checksum: int | None = None

    def pack(self) -> bytes:
        return _MANIFEST.pack(MANIFEST_MAGIC, self.parts, self.length)

    def joined(self, parts: list[bytes | None]) -> bytes:
        """The entry from its parts, after checking that they are all there, at the length it says."""
        missing = sum(part is None for part in parts)
        if missing:
            raise CorruptEntry(f"{missing} of {self.parts} parts missing")
        data = b"".join(parts)  # type: ignore[arg-type]
        if self.checksum is not None:
            return bytes(RedisHeader(self.parts, self.length, self.checksum).checked(data))
        if len(data) != self.length:
            raise CorruptEntry(f"parts hold {len(data)} bytes, the head says {self.length}")
        return data


def parse_head(value: bytes) -> SplitHead | bytes | memoryview:
    """What a head value holds: the entry itself (inline), or where its parts are."""
    magic = value[:4]
    if magic == REDIS_MAGIC:  # written by an older kvmesh: checked here
        header = RedisHeader.unpack(value)
        if header.parts == 0:
            return header.checked(memoryview(value)[REDIS_HEADER.size:])  # no copy
        return SplitHead(header.parts, header.length, header.checksum)
    if magic == MANIFEST_MAGIC:
        if len(value) != _MANIFEST.size:
            raise CorruptEntry(f"a head of parts is {_MANIFEST.size} bytes, not {len(value)}")
        _, parts, length = _MANIFEST.unpack(value)
        if not 1 <= parts <= MAX_PARTS:
            raise CorruptEntry(f"part count {parts} is not in 1..{MAX_PARTS}")
        return SplitHead(parts, length)
    return value
