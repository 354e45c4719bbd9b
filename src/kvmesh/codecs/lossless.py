"""Lossless codec: split the bits of each value into planes that compress, then zstd or lz4. Bit-exact.

bf16 values are split into an exponent byte (few distinct values in KV: it
compresses well) and a sign+mantissa byte (close to random); float16/float32
are byte-shuffled (byte i of every value together).  Each plane is compressed
on its own, so the compressor's statistics are not mixed.  Expect ~1.3-1.5x.
"""

from __future__ import annotations

import struct

import lz4.block
import numpy as np
import torch
import zstandard

from kvmesh.codecs import kernels, quant
from kvmesh.codecs.base import CorruptEntry, open_entry, output_for, pack_entry
from kvmesh.codecs.kvview import view_code
from kvmesh.tensorbytes import tensor_bytes

_PARAMS = struct.Struct("<BBb")  # view (kept for re-encoding), compressor, level
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

    def encode(self, chunk: torch.Tensor, view: str = "chunk") -> bytes:
        planes = _split(chunk.contiguous())
        if self.compressor == "zstd":
            compressor = zstandard.ZstdCompressor(level=self.level)
            blobs = [compressor.compress(plane) for plane in planes]
        else:
            blobs = [lz4.block.compress(plane, store_size=False) for plane in planes]
        body = b"".join(_LENGTH.pack(len(blob)) + blob for blob in blobs)
        params = _PARAMS.pack(view_code(view), COMPRESSORS[self.compressor], self.level)
        return pack_entry(self.codec_id, chunk.dtype, tuple(chunk.shape), body, params)

    def decode(self, data: bytes | memoryview, expected_shape: tuple[int, ...] | None = None,
               expected_dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        entry = open_entry(data, self.codec_id, self.name, _PARAMS, expected_shape, expected_dtype)
        _, compressor, _ = entry.params
        out = output_for(entry.header, out)
        element = out.element_size()
        count = out.numel()
        planes_wanted = 2 if out.dtype == torch.bfloat16 else element
        reader = quant.Reader(entry.payload)
        planes = []
        for _ in range(planes_wanted):
            (length,) = _LENGTH.unpack(reader.take(_LENGTH.size))
            blob = reader.take(length)
            try:
                if compressor == COMPRESSORS["zstd"]:
                    plane = zstandard.ZstdDecompressor().decompress(blob, max_output_size=count)
                elif compressor == COMPRESSORS["lz4"]:
                    plane = lz4.block.decompress(blob, uncompressed_size=count)
                else:
                    raise CorruptEntry(f"unknown lossless compressor code {compressor}")
            except (zstandard.ZstdError, lz4.block.LZ4BlockError) as err:
                raise CorruptEntry(f"lossless plane does not decompress: {err}") from err
            if len(plane) != count:
                raise CorruptEntry(f"lossless plane holds {len(plane)} bytes, expected {count}")
            planes.append(np.frombuffer(plane, dtype=np.uint8))
        reader.finish()
        flat = out.view(-1)
        if out.dtype == torch.bfloat16:
            kernels.join_bf16(planes[0], planes[1], flat.view(torch.int16).numpy().view(np.uint16))
        else:
            shuffled = flat.view(torch.uint8).numpy().reshape(count, element)
            for index, plane in enumerate(planes):
                shuffled[:, index] = plane
        return out


def _split(chunk: torch.Tensor) -> list[bytes]:
    if chunk.dtype == torch.bfloat16:
        bits = chunk.view(-1).view(torch.int16).numpy().view(np.uint16)
        exponents = np.empty(bits.shape, dtype=np.uint8)
        sign_mantissas = np.empty(bits.shape, dtype=np.uint8)
        kernels.split_bf16(bits, exponents, sign_mantissas)
        return [exponents.tobytes(), sign_mantissas.tobytes()]
    raw = np.frombuffer(tensor_bytes(chunk), dtype=np.uint8).reshape(chunk.numel(), chunk.element_size())
    return [np.ascontiguousarray(raw[:, index]).tobytes() for index in range(chunk.element_size())]
