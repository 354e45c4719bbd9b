"""KIVI-style codec: keys quantized per channel (groups along tokens), values per token (groups along channels).

Widths are 2..8 bits, separately for keys and values (``bits`` sets both;
``key_bits`` / ``value_bits`` override): keys cost the demo model 8x more
quality per bit than values (docs/benchmarks.md).  Symbols are packed densely
(2 and 4 bits whole per byte, 3/5/6/7 bits as 8 symbols in ``bits`` bytes);
every group stores its float16 minimum and step.  Key groups of 128 tokens and
value groups of 64 channels cost 0.25 and 0.5 bits per value.
"""

from __future__ import annotations

import struct

import numpy as np
import torch

from kvmesh.codecs import extras, quant
from kvmesh.codecs.base import CorruptEntry, open_entry, output_for, pack_entry
from kvmesh.codecs.kvview import kv_parts, kv_targets
from kvmesh.entry import EntryMeta

_PARAMS = struct.Struct("<BHHB")  # key bits, key group (tokens), value group (channels), value bits


def packed_bytes(channels: int, bits: int) -> int:
    return channels * bits // 8


class KiviCodec:
    name = "kivi"
    codec_id = 4
    lossless = False

    def __init__(self, bits: int = 4, key_group: int = 128, value_group: int = 64, key_bits: int | None = None,
                 value_bits: int | None = None) -> None:
        self.key_bits = bits if key_bits is None else key_bits
        self.value_bits = bits if value_bits is None else value_bits
        for name, width in (("bits" if key_bits is None else "key_bits", self.key_bits),
                            ("bits" if value_bits is None else "value_bits", self.value_bits)):
            if not 2 <= width <= 8:
                raise ValueError(f"kivi {name} must be 2..8, got {width}")
        if not 1 <= key_group <= 65535 or not 1 <= value_group <= 65535:
            raise ValueError(f"kivi groups must be 1..65535, got key_group={key_group}, value_group={value_group}")
        self.key_group, self.value_group = key_group, value_group
        extras.require(self.name, "numba")

    def encode(self, chunk: torch.Tensor, view: str = "chunk", key: bytes = b"") -> bytes:
        parts = kv_parts(chunk, view)
        sections, packed = [], []
        groupings = quant.kv_groupings(self.key_group, self.value_group)
        for part, grouping, bits in zip(parts, groupings, (self.key_bits, self.value_bits)):
            levels = np.full(part.shape[0], (1 << bits) - 1, dtype=np.int64)
            q = quant.quantize(quant.as_float32(part), grouping, levels)
            sections += [q.low.tobytes(), q.step.tobytes()]
            packed.append(quant.pack(q.symbols, bits).tobytes())
        params = _PARAMS.pack(self.key_bits, self.key_group, self.value_group, self.value_bits)
        return pack_entry(self.codec_id, EntryMeta.of(chunk, view), b"".join(sections + packed), params, key)

    def decode(self, data: bytes | memoryview, expected_shape: tuple[int, ...] | None = None,
               expected_dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        entry = open_entry(data, self.codec_id, self.name, _PARAMS, expected_shape, expected_dtype)
        payload, header = entry.payload, entry.header
        key_bits, key_group, value_group, value_bits = entry.params
        if not (2 <= key_bits <= 8 and 2 <= value_bits <= 8) or key_group < 1 or value_group < 1:
            raise CorruptEntry(f"kivi parameters out of range: bits={key_bits}/{value_bits}, "
                               f"groups={key_group}/{value_group}")
        out = output_for(header, out)
        with kv_targets(out, header.view) as parts:
            reader = quant.Reader(payload)
            groupings = quant.kv_groupings(key_group, value_group)
            stats = reader.group_stats(parts, groupings)
            for part, grouping, (low, step), bits in zip(parts, groupings, stats, (key_bits, value_bits)):
                packed_shape = (*part.shape[:-1], packed_bytes(part.shape[-1], bits))
                layer_bits = np.full(part.shape[0], bits, dtype=np.int64)
                quant.dequantize_into(reader.array(np.uint8, packed_shape), layer_bits, low, step, grouping, part)
            reader.finish()
        return out
