"""CacheGen-style codec: layer-dependent quantization, then entropy coding with a model per (layer, K/V, head).

After CacheGen (SIGCOMM'24): layers differ in how much their KV errors cost,
so the quantization width is chosen per layer third, separately for keys and
values (``key_bits`` / ``value_bits``: first, middle and last third of the
layers).  CacheGen gives shallow layers finer bins; on the demo model we
measured the opposite (deep layers and keys cost most, see docs/benchmarks.md),
so the defaults follow the measurement.  Quantization is KIVI's (keys per
channel in groups of tokens, values per token in groups of channels).  The
symbols of each (layer, K/V, head) are then entropy coded on their own by
zstd (its Huffman stage; LZ matching finds little in quantized KV), so each
stream gets its own probability table; 2..4-bit symbols are paired into one
byte first, so the coder models pairs and gets below one bit per symbol where
the distribution is narrow.  Decoding is zstd's table-driven Huffman plus one
fused dequantization pass.
"""

from __future__ import annotations

import struct

import numpy as np
import torch

from kvmesh.codecs import extras, quant
from kvmesh.codecs.base import CorruptEntry, open_entry, output_for, pack_entry
from kvmesh.codecs.kvview import kv_parts, kv_targets
from kvmesh.entry import EntryMeta

_PARAMS = struct.Struct("<HHbH")  # key group, value group, zstd level, layers; then key bits, value bits per layer


def layer_bits(num_layers: int, bits: tuple[int, ...]) -> np.ndarray:
    """Quantization width per layer: ``bits[0]`` for the first third of the layers, ``bits[1]``, ``bits[2]``."""
    return np.array([bits[min(2, 3 * layer // num_layers)] for layer in range(num_layers)], dtype=np.int64)


def container_bits(bits: np.ndarray) -> np.ndarray:
    """How each layer's symbols are stored before entropy coding: two per byte up to 4 bits, else one."""
    return np.where(bits <= 4, 4, 8).astype(np.int64)


class CacheGenCodec:
    name = "cachegen"
    codec_id = 5
    lossless = False

    def __init__(self, key_bits: tuple[int, ...] = (6, 6, 6), value_bits: tuple[int, ...] = (5, 5, 5),
                 key_group: int = 128, value_group: int = 64, level: int = 1) -> None:
        key_bits, value_bits = tuple(key_bits), tuple(value_bits)
        for name, bits in (("key_bits", key_bits), ("value_bits", value_bits)):
            if len(bits) != 3 or not all(2 <= b <= 8 for b in bits):
                raise ValueError(f"cachegen {name} must be three widths in 2..8 (first, middle, last third of the "
                                 f"layers, e.g. 6-6-6), got {'-'.join(map(str, bits))}")
        if not 1 <= key_group <= 65535 or not 1 <= value_group <= 65535:
            raise ValueError(f"cachegen groups must be 1..65535, got {key_group}/{value_group}")
        if not -7 <= level <= 19:
            raise ValueError(f"cachegen zstd level must be -7..19, got {level}")
        self.key_bits, self.value_bits = key_bits, value_bits
        self.key_group, self.value_group, self.level = key_group, value_group, level
        extras.require(self.name, "numba", "zstandard")

    def encode(self, chunk: torch.Tensor, view: str = "chunk", key: bytes = b"") -> bytes:
        parts = kv_parts(chunk, view)
        num_layers, heads, head_size = parts[0].shape[0], parts[0].shape[2], parts[0].shape[-1]
        if head_size % 2:
            raise ValueError(f"cachegen needs an even head_size, got {head_size}")
        all_bits = [layer_bits(num_layers, self.key_bits), layer_bits(num_layers, self.value_bits)]
        compressor = quant.symbol_compressor(self.level)
        stats, lengths, frames = [], [], []
        groupings = quant.kv_groupings(self.key_group, self.value_group)
        for part, grouping, bits in zip(parts, groupings, all_bits):
            widths = container_bits(bits)
            q = quant.quantize(quant.as_float32(part), grouping, (1 << bits) - 1)
            stats += [q.low.tobytes(), q.step.tobytes()]
            for layer in range(num_layers):
                packed = quant.pack(q.symbols[layer], int(widths[layer]))  # [blocks, heads, tokens, bytes]
                for head in range(heads):
                    frame = compressor.compress(np.ascontiguousarray(packed[:, head]).tobytes())
                    lengths.append(len(frame))
                    frames.append(frame)
        params = _PARAMS.pack(self.key_group, self.value_group, self.level, num_layers) + \
            np.concatenate(all_bits).astype(np.uint8).tobytes()
        table = np.array(lengths, dtype="<u4").tobytes()
        return pack_entry(self.codec_id, EntryMeta.of(chunk, view), b"".join(stats + [table] + frames), params, key)

    def decode(self, data: bytes | memoryview, expected_shape: tuple[int, ...] | None = None,
               expected_dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        entry = open_entry(data, self.codec_id, self.name, _PARAMS, expected_shape, expected_dtype,
                           variable_params=True)
        header = entry.header
        key_group, value_group, _, num_layers = entry.params
        bits = np.frombuffer(header.params[_PARAMS.size:], dtype=np.uint8).astype(np.int64)
        if len(bits) != 2 * num_layers or key_group < 1 or value_group < 1 or not ((bits >= 2) & (bits <= 8)).all():
            raise CorruptEntry("cachegen parameters out of range")
        all_widths = (container_bits(bits[:num_layers]), container_bits(bits[num_layers:]))
        out = output_for(header, out)
        with kv_targets(out, header.view) as parts:
            self._decode_parts(entry.payload, parts, num_layers, (key_group, value_group), all_widths)
        return out

    @staticmethod
    def _decode_parts(payload: memoryview, parts: tuple[torch.Tensor, torch.Tensor], num_layers: int,
                      groups: tuple[int, int], all_widths: tuple[np.ndarray, np.ndarray]) -> None:
        if parts[0].shape[0] != num_layers:
            raise CorruptEntry(f"cachegen entry names {num_layers} layers, its shape has {parts[0].shape[0]}")
        groupings = quant.kv_groupings(*groups)
        reader = quant.Reader(payload)
        stats = reader.group_stats(parts, groupings)
        _, num_blocks, heads, tokens, head_size = parts[0].shape
        lengths = reader.array(np.dtype("<u4"), (2, num_layers, heads))
        decompressor = extras.zstandard().ZstdDecompressor()
        for kv, (part, grouping, (low, step), widths) in enumerate(zip(parts, groupings, stats, all_widths)):
            symbols = np.empty((num_layers, num_blocks, heads, tokens, head_size), dtype=np.uint8)
            for layer in range(num_layers):
                row_bytes = head_size * int(widths[layer]) // 8
                expected = num_blocks * tokens * row_bytes
                for head in range(heads):
                    plain = quant.decompress_stream(decompressor, reader.take(int(lengths[kv, layer, head])),
                                                    expected, "cachegen")
                    symbols[layer, :, head, :, :row_bytes] = plain.reshape(num_blocks, tokens, row_bytes)
            quant.dequantize_into(symbols, widths, low, step, grouping, part)
        reader.finish()
