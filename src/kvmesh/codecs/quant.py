"""Group-wise min/max quantization shared by the KIVI and CacheGen-style codecs.

One of K or V of an entry is a 5-D ``[layers, blocks, heads, tokens, head_size]``
array.  Each group (``group_tokens`` x ``group_channels`` values) keeps its
minimum and step as float16; values become ``round((x - min) / step)`` in
``0 .. levels[layer]``.  Keys use groups along tokens, one channel wide (KIVI:
keys have per-channel outliers); values use groups along channels, one token
wide.  The float16-rounded min and step are the ones quantized against, so the
error of every value is at most half a step (plus bf16's own rounding).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt
import torch

from kvmesh.codecs import extras
from kvmesh.codecs.base import CorruptEntry

if TYPE_CHECKING:
    import zstandard


@dataclass(frozen=True, slots=True)
class Grouping:
    tokens: int
    channels: int

    def stats_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        layers, blocks, heads, tokens, channels = shape
        return (layers, blocks, heads, math.ceil(tokens / self.tokens), math.ceil(channels / self.channels))


def kv_groupings(key_group: int, value_group: int) -> tuple[Grouping, Grouping]:
    """KIVI's groups: keys per channel over ``key_group`` tokens, values per token over ``value_group`` channels."""
    return Grouping(tokens=key_group, channels=1), Grouping(tokens=1, channels=value_group)


@dataclass(slots=True)
class Quantized:
    low: np.ndarray  # float16, stats shape
    step: np.ndarray  # float16, stats shape
    symbols: np.ndarray  # uint8, one per value, [layers, blocks, heads, tokens, head_size]


def as_float32(part: torch.Tensor) -> np.ndarray:
    """One of K/V of a block view as a contiguous float32 numpy array (the encoder's input)."""
    return part.to(torch.float32).contiguous().numpy()


def quantize(values: np.ndarray, grouping: Grouping, levels: np.ndarray) -> Quantized:
    kernels = extras.kernels()
    low, high = kernels.group_min_max(values, grouping.tokens, grouping.channels)
    top = levels.astype(np.float32).reshape(-1, 1, 1, 1, 1)
    low16 = low.astype(np.float16)
    step16 = ((high - low16.astype(np.float32)) / top).astype(np.float16)
    # a step that float16 rounds down could push the group's max above the top symbol: round up instead
    step32 = step16.astype(np.float32)
    short = low16.astype(np.float32) + step32 * top < high
    step16[short] = np.nextafter(step16[short], np.float16(np.inf))
    symbols = np.empty(values.shape, dtype=np.uint8)
    kernels.quantize(values, low16.astype(np.float32), step16.astype(np.float32), levels.astype(np.float32),
                     grouping.tokens, grouping.channels, symbols)
    return Quantized(low16, step16, symbols)


def pack(symbols: np.ndarray, bits: int) -> np.ndarray:
    """Pack symbols along the last axis: ``8 // bits`` per byte (low bits first) for 2 and 4 bits; for 3, 5, 6
    and 7 bits densely, each 8 symbols in ``bits`` bytes (a little-endian bit stream)."""
    if bits == 8:
        return symbols
    channels = symbols.shape[-1]
    if bits in (2, 4):
        per_byte = 8 // bits
        if channels % per_byte:
            raise ValueError(f"head_size {channels} is not a multiple of {per_byte} ({bits}-bit symbols)")
        grouped = symbols.reshape(*symbols.shape[:-1], channels // per_byte, per_byte)
        packed = np.zeros(grouped.shape[:-1], dtype=np.uint8)
        for index in range(per_byte):
            packed |= grouped[..., index] << np.uint8(bits * index)
        return packed
    if channels % 8:
        raise ValueError(f"head_size {channels} is not a multiple of 8 ({bits}-bit symbols are packed 8 at a time)")
    grouped = symbols.reshape(*symbols.shape[:-1], channels // 8, 8).astype(np.uint64)
    words = np.zeros(grouped.shape[:-1], dtype=np.uint64)
    for index in range(8):
        words |= grouped[..., index] << np.uint64(bits * index)
    packed = np.empty((*grouped.shape[:-1], bits), dtype=np.uint8)
    for index in range(bits):
        packed[..., index] = (words >> np.uint64(8 * index)) & np.uint64(0xFF)
    return packed.reshape(*symbols.shape[:-1], channels // 8 * bits)


def dequantize_into(symbols: np.ndarray, layer_bits: np.ndarray, low: np.ndarray, step: np.ndarray,
                    grouping: Grouping, out: torch.Tensor) -> None:
    """Write ``symbol * step + low`` into ``out`` (a strided 5-D view of the decoded entry).

    ``layer_bits[layer]`` is the width the layer's symbols are packed with (see :func:`pack`).
    """
    write_decoded(out, extras.kernels().dequantize_rows, symbols, layer_bits, low.astype(np.float32),
                  step.astype(np.float32), grouping.tokens, grouping.channels)


def write_decoded(out: torch.Tensor, kernel: Callable[..., None], *args: object) -> None:
    """Run a decode kernel ``kernel(*args, target, as_bf16)`` into ``out`` (a strided view of the entry).

    bf16 is written in place as rounded bits; other dtypes go through a float32 buffer and one copy.
    """
    if out.dtype == torch.bfloat16:
        kernel(*args, out.view(torch.int16).numpy().view(np.uint16), True)
        return
    buffer = np.empty(tuple(out.shape), dtype=np.float32)
    kernel(*args, buffer, False)
    out.copy_(torch.from_numpy(buffer))


class Reader:
    """Takes consecutive sections out of a payload, refusing to run past its end."""

    def __init__(self, payload: memoryview) -> None:
        self.payload = payload
        self.position = 0

    def take(self, nbytes: int) -> memoryview:
        end = self.position + nbytes
        if end > len(self.payload):
            raise CorruptEntry(f"payload ends at {len(self.payload)} bytes, a section needs {end}")
        section = self.payload[self.position:end]
        self.position = end
        return section

    def array(self, dtype: npt.DTypeLike, shape: tuple[int, ...]) -> np.ndarray:
        count = math.prod(shape)
        return np.frombuffer(self.take(count * np.dtype(dtype).itemsize), dtype=dtype).reshape(shape)

    def group_stats(self, parts: tuple[torch.Tensor, ...], groupings: tuple[Grouping, ...]
                    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """The (min, step) float16 arrays written for each part, in the order ``quantize`` wrote them."""
        stats = []
        for part, grouping in zip(parts, groupings):
            shape = grouping.stats_shape(tuple(part.shape))
            stats.append((self.array(np.float16, shape), self.array(np.float16, shape)))
        return stats

    def finish(self) -> None:
        if self.position != len(self.payload):
            raise CorruptEntry(f"payload has {len(self.payload) - self.position} bytes past its last section")


def symbol_compressor(level: int) -> zstandard.ZstdCompressor:
    """zstd for streams of quantized symbols: its Huffman stage does the work, LZ matches barely pay.

    With the longest minimum match (7) zstd finds almost no matches in such streams, so the decoder stays
    on its literals path: ~30% faster decoding at the same size (0.05% larger on the demo model's KV).
    The frames are ordinary zstd frames; nothing about decoding changes.
    """
    zstd = extras.zstandard()
    params = zstd.ZstdCompressionParameters.from_level(level, min_match=7, write_checksum=0, write_content_size=0)
    return zstd.ZstdCompressor(compression_params=params)


def decompress_stream(decompressor: zstandard.ZstdDecompressor, frame: memoryview, expected: int,
                      codec: str) -> np.ndarray:
    """One entropy-coded symbol stream as uint8, refused (CorruptEntry) unless it holds exactly ``expected`` bytes."""
    try:
        plain = decompressor.decompress(frame, max_output_size=expected)
    except extras.zstandard().ZstdError as err:
        raise CorruptEntry(f"{codec} stream does not decode: {err}") from err
    if len(plain) != expected:
        raise CorruptEntry(f"{codec} stream holds {len(plain)} bytes, expected {expected}")
    return np.frombuffer(plain, dtype=np.uint8)
