"""The codec protocol and the entry header every codec writes.

An encoded entry is ``header || payload``.  The header names the format
version, the codec, the tensor's dtype and shape and the payload's length and
xxh3-64 checksum, and carries a checksum of its own.  :func:`read_header`
refuses anything truncated, corrupted, of an unknown codec or of another layout
with :class:`CorruptEntry`, so bad bytes are never turned into a wrong tensor.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
import xxhash

MAGIC = b"KVMC"
FORMAT_VERSION = 1
# magic, version, codec id, dtype code, ndim, shape (5 x u32), params length, payload length, payload checksum
_FIXED = struct.Struct("<4sHHBB5IHQQ")
_HEADER_CHECKSUM = struct.Struct("<I")

DTYPE_CODES: dict[torch.dtype, int] = {torch.bfloat16: 1, torch.float16: 2, torch.float32: 3, torch.uint8: 4}
CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}


class CorruptEntry(ValueError):
    """Encoded bytes are truncated, damaged, or not what the reader expected."""


@dataclass(frozen=True, slots=True)
class EntryHeader:
    codec_id: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    params: bytes
    payload_length: int
    payload_checksum: int

    @property
    def size(self) -> int:
        return _FIXED.size + len(self.params) + _HEADER_CHECKSUM.size


@runtime_checkable
class Codec(Protocol):
    """Turns an entry tensor into bytes and back.

    ``view`` says where its K/V, token, head and channel axes are (``kvview``);
    lossy codecs need it, bit-exact ones record it so a later re-encode knows it.
    ``decode`` reads its parameters from the entry, never from the instance, and writes into ``out``
    when given (a contiguous tensor of the entry's shape and dtype: an L1 extent, so a promotion from
    disk or Redis decodes straight into shared memory with no further copy).
    """

    name: str
    codec_id: int
    lossless: bool

    def encode(self, chunk: torch.Tensor, view: str = "chunk") -> bytes: ...

    def decode(self, data: bytes | memoryview, expected_shape: tuple[int, ...] | None = None,
               expected_dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor: ...


def pack_entry(codec_id: int, dtype: torch.dtype, shape: tuple[int, ...], payload: bytes | memoryview,
               params: bytes = b"") -> bytes:
    return b"".join((pack_header(codec_id, dtype, shape, payload, params), payload))


def pack_header(codec_id: int, dtype: torch.dtype, shape: tuple[int, ...], payload: bytes | memoryview,
                params: bytes = b"") -> bytes:
    """The header that :func:`pack_entry` puts before ``payload`` (which it checksums but does not copy)."""
    if len(shape) > 5:
        raise ValueError(f"at most 5 dimensions can be stored, got shape {shape}")
    padded = tuple(shape) + (0,) * (5 - len(shape))
    payload = memoryview(payload).cast("B")
    fixed = _FIXED.pack(MAGIC, FORMAT_VERSION, codec_id, DTYPE_CODES[dtype], len(shape), *padded,
                        len(params), payload.nbytes, xxhash.xxh3_64_intdigest(payload))
    head = fixed + params
    return head + _HEADER_CHECKSUM.pack(xxhash.xxh32_intdigest(head))


def read_header(data: bytes | memoryview) -> EntryHeader:
    """Parse and check the header (not the payload) of an encoded entry."""
    view = memoryview(data)
    if len(view) < _FIXED.size + _HEADER_CHECKSUM.size:
        raise CorruptEntry(f"entry of {len(view)} bytes is shorter than a header")
    magic, version, codec_id, dtype_code, ndim, *rest = _FIXED.unpack_from(view)
    shape_padded, params_length, payload_length, checksum = rest[:5], rest[5], rest[6], rest[7]
    if magic != MAGIC:
        raise CorruptEntry(f"bad magic {bytes(magic)!r}: not a kvmesh entry")
    if version != FORMAT_VERSION:
        raise CorruptEntry(f"entry format version {version}, this kvmesh reads {FORMAT_VERSION}")
    end = _FIXED.size + params_length
    if len(view) < end + _HEADER_CHECKSUM.size:
        raise CorruptEntry("entry is truncated inside its header")
    (stored,) = _HEADER_CHECKSUM.unpack_from(view, end)
    if xxhash.xxh32_intdigest(view[:end]) != stored:
        raise CorruptEntry("header checksum mismatch")
    if dtype_code not in CODE_DTYPES or ndim > 5:
        raise CorruptEntry(f"unknown dtype code {dtype_code} or rank {ndim}")
    return EntryHeader(codec_id, CODE_DTYPES[dtype_code], tuple(shape_padded[:ndim]),
                       bytes(view[_FIXED.size:end]), payload_length, checksum)


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
