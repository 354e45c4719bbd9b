"""The codec protocol and the entry header every codec writes.

An encoded entry is ``header || payload``.  The header names the format
version, the codec, the entry's :class:`~kvmesh.entry.EntryMeta` (dtype, shape,
KV view), the chunk key it was written for, the codec's own parameters and the
payload's length and xxh3-64 checksum, and carries a checksum of its own.
:func:`read_header` refuses anything truncated, corrupted, of an unknown codec,
of another layout or (given ``expected_key``) of another key with
:class:`CorruptEntry`, so bad bytes are never turned into a wrong tensor and a
tier's file or value that holds another key's valid entry is never served.

Format 2 stores the view as a header field.  Format 1 (still read) had no such
field: the view was the first byte of the codec's parameters, and no
parameters meant ``chunk``; :func:`read_header` returns both as format 2 does.
Format 1 names no key, nor does an entry encoded with ``key=b""`` (bytes not
meant for a tier): those are accepted for any key.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
import xxhash

from kvmesh.entry import VIEW_NAMES, VIEWS, EntryMeta

MAGIC = b"KVMC"
FORMAT_VERSION = 2
NEWER_FORMATS = 16  # format versions above ours read as a newer kvmesh's; further ones as damage
_PREFIX = struct.Struct("<4sH")  # magic, version: the same in every format
# magic, version, codec id, dtype code, ndim, view code, key length, shape (5 x u32), params length,
# payload length, checksum; the key, then the codec's parameters follow
_FIXED = struct.Struct("<4sHHBBBB5IHQQ")
_FIXED_V1 = struct.Struct("<4sHHBB5IHQQ")  # format 1: no view code
_HEADER_CHECKSUM = struct.Struct("<I")
HEADER_PEEK = 4096  # bytes that hold any entry's header (its description and the codec's parameters)
MAX_KEY = 255  # bytes of a key the header can name (chunk keys are 16)

DTYPE_CODES: dict[str, int] = {"bfloat16": 1, "float16": 2, "float32": 3, "int8": 4}
CODE_DTYPES = {code: name for name, code in DTYPE_CODES.items()}


class UnreadableEntry(ValueError):
    """An intact entry this node cannot read: a newer entry format, a codec id, dtype or KV view it does not
    know, or a codec whose library is not installed here.

    Not damage: during a rolling upgrade a newer node writes what an older one cannot read.  It is a miss
    that leaves the entry where it is (for the nodes that can read it), never a :class:`CorruptEntry`,
    which is deleted.
    """


class CorruptEntry(ValueError):
    """Encoded bytes are truncated, damaged, or not what the reader expected."""


@dataclass(frozen=True, slots=True)
class EntryHeader:
    codec_id: int
    meta: EntryMeta
    params: bytes  # the codec's own parameters (never the view, whatever the format)
    payload_length: int
    payload_checksum: int
    size: int  # bytes of the header in the entry: the payload starts here
    version: int = FORMAT_VERSION
    key: bytes = b""  # the chunk key it was written for; b"": none named (format 1, or not for a tier)

    @property
    def dtype(self) -> torch.dtype:
        return self.meta.torch_dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return self.meta.shape

    @property
    def view(self) -> str:
        return self.meta.view


@runtime_checkable
class Codec(Protocol):
    """Turns an entry tensor into bytes and back.

    ``view`` says where its K/V, token, head and channel axes are (``kvview``);
    lossy codecs need it, bit-exact ones record it so a later re-encode knows it.
    ``key`` is the chunk key the entry is stored under, named in its header so a read checks it.
    ``decode`` reads its parameters from the entry, never from the instance, and writes into ``out``
    when given (a contiguous tensor of the entry's shape and dtype: an L1 extent, so a promotion from
    disk or Redis decodes straight into shared memory with no further copy).
    """

    name: str
    codec_id: int
    lossless: bool

    def encode(self, chunk: torch.Tensor, view: str = "chunk", key: bytes = b"") -> bytes: ...

    def decode(self, data: bytes | memoryview, expected_shape: tuple[int, ...] | None = None,
               expected_dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor: ...


def pack_entry(codec_id: int, meta: EntryMeta, payload: bytes | memoryview, params: bytes = b"",
               key: bytes = b"") -> bytes:
    return b"".join((pack_header(codec_id, meta, payload, params, key), payload))


def pack_header(codec_id: int, meta: EntryMeta, payload: bytes | memoryview, params: bytes = b"",
                key: bytes = b"") -> bytes:
    """The header that :func:`pack_entry` puts before ``payload`` (which it checksums but does not copy)."""
    if len(meta.shape) > 5:
        raise ValueError(f"at most 5 dimensions can be stored, got shape {meta.shape}")
    if len(key) > MAX_KEY:
        raise ValueError(f"a key of at most {MAX_KEY} bytes can be named, got {len(key)}")
    padded = meta.shape + (0,) * (5 - len(meta.shape))
    payload = memoryview(payload).cast("B")
    fixed = _FIXED.pack(MAGIC, FORMAT_VERSION, codec_id, DTYPE_CODES[meta.dtype], len(meta.shape),
                        VIEWS[meta.view], len(key), *padded, len(params), payload.nbytes,
                        xxhash.xxh3_64_intdigest(payload))
    head = b"".join((fixed, key, params))
    return head + _HEADER_CHECKSUM.pack(xxhash.xxh32_intdigest(head))


def read_header(data: bytes | memoryview, expected_key: bytes | None = None) -> EntryHeader:
    """Parse and check the header (not the payload) of an encoded entry, of either format.

    ``expected_key``: the key it was read under; an entry that names another key is corrupt
    (one that names none is accepted).
    """
    view = memoryview(data)
    if len(view) < _PREFIX.size:
        raise CorruptEntry(f"entry of {len(view)} bytes is shorter than a header")
    magic, version = _PREFIX.unpack_from(view)
    if magic != MAGIC:
        raise CorruptEntry(f"bad magic {bytes(magic)!r}: not a kvmesh entry")
    if FORMAT_VERSION < version <= FORMAT_VERSION + NEWER_FORMATS:  # far beyond: a damaged field, below
        raise UnreadableEntry(f"entry format version {version}, this kvmesh reads 1 to {FORMAT_VERSION}")
    if version not in (1, FORMAT_VERSION):
        raise CorruptEntry(f"entry format version {version}, this kvmesh reads 1 and {FORMAT_VERSION}")
    fixed = _FIXED if version == FORMAT_VERSION else _FIXED_V1
    if len(view) < fixed.size + _HEADER_CHECKSUM.size:
        raise CorruptEntry(f"entry of {len(view)} bytes is shorter than a header")
    fields = fixed.unpack_from(view)
    codec_id, dtype_code, ndim = fields[2:5]
    view_code, key_length = fields[5:7] if version == FORMAT_VERSION else (None, 0)
    shape_padded, (params_length, payload_length, checksum) = fields[-8:-3], fields[-3:]
    start = fixed.size + key_length  # the codec's parameters
    end = start + params_length
    if len(view) < end + _HEADER_CHECKSUM.size:
        raise CorruptEntry("entry is truncated inside its header")
    (stored,) = _HEADER_CHECKSUM.unpack_from(view, end)
    if xxhash.xxh32_intdigest(view[:end]) != stored:
        raise CorruptEntry("header checksum mismatch")
    # checksummed codes this kvmesh does not know: a newer writer's, unless the format is older than ours
    unknown = UnreadableEntry if version == FORMAT_VERSION else CorruptEntry
    if dtype_code not in CODE_DTYPES or ndim > 5:
        raise unknown(f"unknown dtype code {dtype_code} or rank {ndim}")
    key = bytes(view[fixed.size:start])
    if expected_key is not None and key and key != expected_key:
        raise CorruptEntry(f"entry was written for key {key.hex()}, read for {expected_key.hex()}")
    params = bytes(view[start:end])
    if view_code is None:  # format 1: the view led the codec's parameters; none at all meant chunk
        view_code, params = (params[0], params[1:]) if params else (VIEWS["chunk"], b"")
    if view_code not in VIEW_NAMES:
        raise unknown(f"unknown KV view code {view_code}")
    meta = EntryMeta(CODE_DTYPES[dtype_code], tuple(shape_padded[:ndim]), VIEW_NAMES[view_code])
    return EntryHeader(codec_id, meta, params, payload_length, checksum, end + _HEADER_CHECKSUM.size, version, key)


def checked_payload(data: bytes | memoryview, header: EntryHeader, codec_id: int,
                    expected_shape: tuple[int, ...] | None,
                    expected_dtype: torch.dtype | None) -> memoryview:
    """The payload of an entry, after checking codec, shape, dtype, length and checksum."""
    if header.codec_id != codec_id:
        raise CorruptEntry(f"entry was written by codec id {header.codec_id}, not {codec_id}")
    if expected_shape is not None and tuple(expected_shape) != header.shape:
        raise CorruptEntry(f"entry holds shape {header.shape}, expected {tuple(expected_shape)}")
    if expected_dtype is not None and expected_dtype != header.dtype:
        raise CorruptEntry(f"entry holds {header.dtype}, expected {expected_dtype}")
    view = memoryview(data)
    payload = view[header.size:]
    if len(payload) != header.payload_length:
        raise CorruptEntry(
            f"payload is {len(payload)} bytes, header says {header.payload_length} (truncated or padded)")
    if xxhash.xxh3_64_intdigest(payload) != header.payload_checksum:
        raise CorruptEntry("payload checksum mismatch")
    return payload


def output_for(header: EntryHeader, out: torch.Tensor | None) -> torch.Tensor:
    """The tensor a decode writes into: ``out`` if it fits the entry, else a new one."""
    if out is None:
        return torch.empty(header.shape, dtype=header.dtype)
    if tuple(out.shape) != header.shape or out.dtype != header.dtype or not out.is_contiguous():
        raise ValueError(f"decode target is {tuple(out.shape)} {out.dtype}, the entry is {header.shape} {header.dtype}")
    return out


@dataclass(frozen=True, slots=True)
class OpenedEntry:
    header: EntryHeader
    payload: memoryview
    params: tuple = field(default=())  # the codec's fixed parameters, unpacked


def open_entry(data: bytes | memoryview, codec_id: int, name: str, params: struct.Struct,
               expected_shape: tuple[int, ...] | None, expected_dtype: torch.dtype | None,
               variable_params: bool = False) -> OpenedEntry:
    """Check an entry's header and payload and unpack the codec's fixed parameters (corrupt: CorruptEntry).

    ``variable_params``: the fixed parameters may be followed by more bytes (read from ``header.params``).
    """
    header = read_header(data)
    payload = checked_payload(data, header, codec_id, expected_shape, expected_dtype)
    size = len(header.params)
    if size < params.size or (size != params.size and not variable_params):
        raise CorruptEntry(f"{name} parameters are {size} bytes, expected {params.size}")
    return OpenedEntry(header, payload, params.unpack_from(header.params))
