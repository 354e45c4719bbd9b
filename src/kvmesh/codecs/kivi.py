"""KIVI-style codec: keys quantized per channel (groups along tokens), values per token (groups along channels).

``bits`` is 8, 4 or 2; symbols are packed ``8 // bits`` to a byte, and every
group stores its float16 minimum and step.  With 4 bits, key groups of 128
tokens and value groups of 64 channels an entry is ~3.6x smaller than bf16.
"""

from __future__ import annotations

import struct

import numpy as np
import torch

from kvmesh.codecs import quant
from kvmesh.codecs.base import CorruptEntry, checked_payload, pack_entry, read_header
from kvmesh.codecs.kvview import block_view, view_code, view_name

_PARAMS = struct.Struct("<BBHH")  # view, bits, key group (tokens), value group (channels)


class KiviCodec:
    name = "kivi"
    codec_id = 4
    lossless = False

    def __init__(self, bits: int = 4, key_group: int = 128, value_group: int = 64) -> None:
        if bits not in (2, 4, 8):
            raise ValueError(f"kivi bits must be 2, 4 or 8, got {bits}")
        if not 1 <= key_group <= 65535 or not 1 <= value_group <= 65535:
            raise ValueError(f"kivi groups must be 1..65535, got key_group={key_group}, value_group={value_group}")
        self.bits, self.key_group, self.value_group = bits, key_group, value_group

    def _groupings(self, key_group: int, value_group: int) -> tuple[quant.Grouping, quant.Grouping]:
        return quant.Grouping(tokens=key_group, channels=1), quant.Grouping(tokens=1, channels=value_group)

    def encode(self, chunk: torch.Tensor, view: str = "chunk") -> bytes:
        blocks = block_view(chunk, view)
        if blocks.shape[-1] % (8 // self.bits):
            raise ValueError(f"head_size {blocks.shape[-1]} is not a multiple of {8 // self.bits} ({self.bits} bits)")
        levels = np.full(blocks.shape[0], (1 << self.bits) - 1, dtype=np.uint8)
        sections = []
        packed = []
        for part, grouping in zip((blocks[:, 0], blocks[:, 1]), self._groupings(self.key_group, self.value_group)):
            q = quant.quantize(quant.as_float32(part), grouping, levels)
            sections += [q.low.tobytes(), q.step.tobytes()]
            packed.append(quant.pack(q.symbols, self.bits).tobytes())
        params = _PARAMS.pack(view_code(view), self.bits, self.key_group, self.value_group)
        return pack_entry(self.codec_id, chunk.dtype, tuple(chunk.shape), b"".join(sections + packed), params)

    def decode(self, data: bytes | memoryview, expected_shape: tuple[int, ...] | None = None,
               expected_dtype: torch.dtype | None = None) -> torch.Tensor:
        header = read_header(data)
        payload = checked_payload(data, header, self.codec_id, expected_shape, expected_dtype)
        if len(header.params) != _PARAMS.size:
            raise CorruptEntry(f"kivi parameters are {len(header.params)} bytes, expected {_PARAMS.size}")
        code, bits, key_group, value_group = _PARAMS.unpack(header.params)
        if bits not in (2, 4, 8) or key_group < 1 or value_group < 1:
            raise CorruptEntry(f"kivi parameters out of range: bits={bits}, groups={key_group}/{value_group}")
        out = torch.empty(header.shape, dtype=header.dtype)
        blocks = block_view(out, view_name(code))
        reader = quant.Reader(payload)
        parts = (blocks[:, 0], blocks[:, 1])
        groupings = self._groupings(key_group, value_group)
        stats = []
        for part, grouping in zip(parts, groupings):
            shape = grouping.stats_shape(tuple(part.shape))
            stats.append((reader.array(np.float16, shape), reader.array(np.float16, shape)))
        for part, grouping, (low, step) in zip(parts, groupings, stats):
            packed_shape = (*part.shape[:-1], part.shape[-1] * bits // 8)
            layer_bits = np.full(part.shape[0], bits, dtype=np.int64)
            quant.dequantize_into(reader.array(np.uint8, packed_shape), layer_bits, low, step, grouping, part)
        reader.finish()
        return out
