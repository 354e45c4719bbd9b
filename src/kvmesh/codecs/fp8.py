"""fp8 (e4m3) codec: one float16 scale per (token, head) for K and for V, then 8-bit floats. ~1.9x smaller.

A scale per (token, head) follows the value's magnitude token by token, so
e4m3's 3 mantissa bits are spent where the values are; torch does the
(round-to-nearest) encoding, a 256-entry table the decoding.
"""

from __future__ import annotations

import struct

import numpy as np
import torch

from kvmesh.codecs import extras, quant
from kvmesh.codecs.base import open_entry, output_for, pack_entry
from kvmesh.codecs.kvview import kv_parts, kv_targets
from kvmesh.entry import EntryMeta

_PARAMS = struct.Struct("<")  # none: the view is in the header
E4M3_MAX = 448.0
_TABLE = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).to(torch.float32).numpy()
_TABLE = np.nan_to_num(_TABLE, nan=0.0)  # the two NaN codes are never written


class Fp8Codec:
    name = "fp8"
    codec_id = 3
    lossless = False

    def __init__(self) -> None:
        extras.require(self.name, "numba")

    def encode(self, chunk: torch.Tensor, view: str = "chunk", key: bytes = b"") -> bytes:
        scales, codes = [], []
        for part in kv_parts(chunk, view):
            values = part.to(torch.float32)
            scale = (values.abs().amax(dim=-1) / E4M3_MAX).to(torch.float16)
            scale = torch.where(scale > 0, scale, torch.ones_like(scale))
            scaled = (values / scale.to(torch.float32).unsqueeze(-1)).clamp_(-E4M3_MAX, E4M3_MAX)
            scales.append(scale.contiguous().numpy().tobytes())
            codes.append(scaled.to(torch.float8_e4m3fn).view(torch.uint8).contiguous().numpy().tobytes())
        return pack_entry(self.codec_id, EntryMeta.of(chunk, view), b"".join(scales + codes), _PARAMS.pack(), key)

    def decode(self, data: bytes | memoryview, expected_shape: tuple[int, ...] | None = None,
               expected_dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        entry = open_entry(data, self.codec_id, self.name, _PARAMS, expected_shape, expected_dtype)
        payload = entry.payload
        out = output_for(entry.header, out)
        kernels = extras.kernels()
        with kv_targets(out, entry.header.view) as parts:
            reader = quant.Reader(payload)
            scales = [reader.array(np.float16, tuple(p.shape[:-1])).astype(np.float32) for p in parts]
            for part, scale in zip(parts, scales):
                codes = reader.array(np.uint8, tuple(part.shape))
                if part.dtype == torch.bfloat16:
                    kernels.lookup_scale_bf16(codes, _TABLE, scale, part.view(torch.int16).numpy().view(np.uint16))
                else:
                    part.copy_(torch.from_numpy(_TABLE[codes] * scale[..., None]))
            reader.finish()
        return out
