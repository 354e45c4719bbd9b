"""Lossless codec: split the bits of each value into planes that compress, then zstd or lz4. Bit-exact.

bf16 values are split into an exponent byte (few distinct values in KV: it
compresses well) and a sign+mantissa byte (close to random); float16/float32
are byte-shuffled (byte i of every value together).  Each plane is compressed
on its own, so the compressor's statistics are not mixed.  Expect ~1.3-1.5x.
"""

from __future__ import annotations

import struct

import numpy as np
import torch

from kvmesh.codecs import extras, quant
from kvmesh.codecs.base import CorruptEntry, open_entry, output_for, pack_entry
from kvmesh.entry import EntryMeta
from kvmesh.tensorbytes import tensor_bytes

_PARAMS = struct.Struct("<Bb")  # compressor, level (the view, kept for re-encoding, is in the header)
_COMPRESSOR_MODULES = {"zstd": "zstandard", "lz4": "lz4"}
_LENGTH = struct.Struct("<I")
COMPRESSORS = {"zstd": 1, "lz4": 2}


class LosslessCodec:
    name = "lossless"
    codec_id = 2
    lossless = True

    def __init__(self, compressor: str = "zstd", level: int = 1) -> None:
        if compressor not in COMPRESSORS:
            raise ValueError(f"lossless compressor must be one of {', '.join(COMPRESSORS)}, got {compressor!r}")
        if not -7 <= level <= 19:
            raise ValueError(f"lossless level must be -7..19, got {level}")
        self.compressor, self.level = compressor, level
        extras.require(self.name, "numba", _COMPRESSOR_MODULES[compressor])

    def encode(self, chunk: torch.Tensor, view: str = "chunk", key: bytes = b"") -> bytes:
        planes = _split(chunk.contiguous())
        meta = EntryMeta.of(chunk, view)
        if self.compressor == "zstd":
            compressor = extras.zstandard().ZstdCompressor(level=self.level)
            blobs = [compressor.compress(plane) for plane in planes]
        else:
            lz4_block = extras.lz4_block()
            blobs = [lz4_block.compress(plane, store_size=False) for plane in planes]
        body = b"".join(_LENGTH.pack(len(blob)) + blob for blob in blobs)
        return pack_entry(self.codec_id, meta, body, _PARAMS.pack(COMPRESSORS[self.compressor], self.level), key)

    def decode(self, data: bytes | memoryview, expected_shape: tuple[int, ...] | None = None,
               expected_dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        entry = open_entry(data, self.codec_id, self.name, _PARAMS, expected_shape, expected_dtype)
        compressor, _ = entry.params
        out = output_for(entry.header, out)
        element = out.element_size()
        count = out.numel()
        planes_wanted = 2 if out.dtype == torch.bfloat16 else element
        reader = quant.Reader(entry.payload)
        planes = []
        for _ in range(planes_wanted):
            (length,) = _LENGTH.unpack(reader.take(_LENGTH.size))
            blob = reader.take(length)
            plane = _decompress(compressor, blob, count)
            if len(plane) != count:
                raise CorruptEntry(f"lossless plane holds {len(plane)} bytes, expected {count}")
            planes.append(np.frombuffer(plane, dtype=np.uint8))
        reader.finish()
        flat = out.view(-1)
        if out.dtype == torch.bfloat16:
            extras.kernels().join_bf16(planes[0], planes[1], flat.view(torch.int16).numpy().view(np.uint16))
        else:
            shuffled = flat.view(torch.uint8).numpy().reshape(count, element)
            for index, column in enumerate(planes):
                shuffled[:, index] = column
        return out


def _decompress(compressor: int, blob: memoryview, count: int) -> bytes:
    """One plane, decompressed by the compressor its entry names (damaged data: CorruptEntry)."""
    if compressor == COMPRESSORS["zstd"]:
        zstd = extras.zstandard()
        try:
            return zstd.ZstdDecompressor().decompress(blob, max_output_size=count)
        except zstd.ZstdError as err:
            raise CorruptEntry(f"lossless plane does not decompress: {err}") from err
    if compressor == COMPRESSORS["lz4"]:
        lz4_block = extras.lz4_block()
        try:
            return lz4_block.decompress(blob, uncompressed_size=count)
        except lz4_block.LZ4BlockError as err:
            raise CorruptEntry(f"lossless plane does not decompress: {err}") from err
    raise CorruptEntry(f"unknown lossless compressor code {compressor}")


def _split(chunk: torch.Tensor) -> list[bytes]:
    if chunk.dtype == torch.bfloat16:
        bits = chunk.view(-1).view(torch.int16).numpy().view(np.uint16)
        exponents = np.empty(bits.shape, dtype=np.uint8)
        sign_mantissas = np.empty(bits.shape, dtype=np.uint8)
        extras.kernels().split_bf16(bits, exponents, sign_mantissas)
        return [exponents.tobytes(), sign_mantissas.tobytes()]
    raw = np.frombuffer(tensor_bytes(chunk), dtype=np.uint8).reshape(chunk.numel(), chunk.element_size())
    return [np.ascontiguousarray(raw[:, index]).tobytes() for index in range(chunk.element_size())]
