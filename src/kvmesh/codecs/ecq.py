"""Entropy-coded uniform quantization: one step per sensitivity class, not a fixed number of levels per group.

Why not min-max (KIVI, ``cachegen``): with an entropy coder after the
quantizer, rate-distortion theory says the cheapest way to a given error is one
step size for all values of equal sensitivity; a value's bits then follow its
spread (a wide key channel costs more symbols, a narrow one fewer) instead of
being fixed per group.  Min-max also lets one outlier widen a whole group's
steps.  Measured on the demo model (docs/benchmarks.md, "Entropy-coded
quantization"):

* keys: per (layer, head), symbols are ``round((k - channel mean) / step)`` with one step for the head,
  ``key_step x`` the head's RMS (one step across channels measured better than per-channel widths);
* values: per token, ``round((v - channel mean) / step)`` with ``step = value_step x`` the token's RMS
  (values need a step per token: tokens with small values, attention sinks first, are the ones attended);
* layers differ up to 250x in what a given relative error costs, so a ``profile`` scales the steps per
  layer by the square root of the measured sensitivity (equal error cost per bit in every layer);
* attention sinks (tokens whose keys sit far from the rest: mean over layers and heads of the largest
  ``|k - channel mean|`` above ``outliers`` head RMS) are stored exactly: a 1k context's top-1 agreement
  depends on the first token more than on any other;
* a symbol beyond -127..127 steps is an escape: its value is stored exactly beside the stream.

Symbols are one byte (128 = the center); each (layer, K/V) stream (its heads in a row) is entropy coded by
zstd on its own, and decoding is zstd's Huffman plus one fused pass ``(symbol - 128) * step + center`` into
bf16.  Every value not escaped is within half its step of the input (plus the output dtype's rounding).
"""

from __future__ import annotations

import struct

import numpy as np
import torch

from kvmesh.codecs import extras, quant
from kvmesh.codecs.base import CorruptEntry, open_entry, output_for, pack_entry
from kvmesh.codecs.kvview import kv_parts, kv_targets
from kvmesh.entry import EntryMeta

# zstd level, layers, key step, value step, profile code, outlier threshold
_PARAMS = struct.Struct("<bHffBf")
_FLOAT16_MAX = 65504.0
_STEP_RANGE = (0.005, 8.0)  # a layer's step multiplier, after the profile

# Per-layer step scale for keys and values: sqrt(mean sensitivity / layer's sensitivity), where a layer's
# sensitivity is the KL(raw || codec) of the next-token distribution when only that layer is quantized
# (SmolLM2-135M-Instruct, 2 documents of 1k tokens, exp. in docs/benchmarks.md).  Layers 10, 18, 20, 23, 24
# carry most of the error; the first layer and 11, 25, 27, 29 almost none.
PROFILES: dict[str, tuple[tuple[float, ...], tuple[float, ...]] | None] = {
    "flat": None,
    "smollm2-135m": (
        (9.38, 3.32, 2.13, 1.46, 2.0, 1.56, 2.81, 1.03, 1.07, 1.67, 0.53, 4.74, 2.75, 2.97, 0.86,
         1.68, 2.73, 0.95, 0.38, 1.99, 0.42, 1.58, 1.76, 0.65, 0.62, 3.98, 1.74, 6.58, 2.1, 4.65),
        (1.94, 1.55, 1.82, 1.83, 2.41, 2.14, 1.93, 1.13, 0.95, 1.74, 0.96, 4.76, 2.06, 3.38, 0.82,
         1.59, 2.35, 0.76, 0.53, 1.71, 0.38, 1.12, 1.29, 0.48, 0.6, 3.38, 1.33, 4.63, 1.73, 2.64)),
    # keys per (layer, head): within a layer one head often carries all of it (layer 10: head 0, 40x the
    # others); a head's KL below 1e-5 counts as 1e-5 (the measurement's floor); values as above
    "smollm2-135m-heads": (
        (3.48, 3.48, 3.48, 3.48, 3.24, 3.48, 1.42, 2.80, 3.48, 1.19, 2.02, 1.69, 3.48, 3.48, 1.31,
         1.76, 3.48, 1.10, 2.80, 2.85, 2.80, 2.88, 3.48, 0.62, 0.72, 2.76, 1.07, 2.11, 1.15, 3.48,
         0.32, 1.90, 3.48, 3.22, 3.48, 3.48, 2.14, 3.48, 2.27, 3.48, 2.03, 3.48, 1.06, 0.58, 3.48,
         3.03, 2.75, 1.18, 2.49, 3.48, 2.42, 2.34, 0.58, 2.68, 1.71, 2.51, 0.22, 1.94, 1.53, 3.48,
         1.06, 0.37, 0.33, 1.54, 2.46, 1.26, 2.73, 1.91, 1.48, 0.49, 1.38, 0.61, 0.50, 1.25, 0.55,
         3.12, 3.48, 3.48, 1.65, 1.37, 3.48, 3.48, 3.48, 3.48, 1.77, 2.43, 2.14, 3.48, 3.26, 3.48),
        (1.94, 1.55, 1.82, 1.83, 2.41, 2.14, 1.93, 1.13, 0.95, 1.74, 0.96, 4.76, 2.06, 3.38, 0.82,
         1.59, 2.35, 0.76, 0.53, 1.71, 0.38, 1.12, 1.29, 0.48, 0.6, 3.38, 1.33, 4.63, 1.73, 2.64)),
}
PROFILE_CODES = {name: code for code, name in enumerate(PROFILES)}


def layer_steps(num_layers: int, heads: int, step: float, profile: str, part: int) -> np.ndarray:
    """Each (layer, head)'s step as a multiple of its RMS: ``step`` times the profile's scale (``part`` 0 keys,
    1 values); a profile gives one scale per layer or one per (layer, head)."""
    table = PROFILES[profile]
    if table is None:
        return np.full((num_layers, heads), step, dtype=np.float32)
    scales = np.array(table[part], dtype=np.float32)
    if len(scales) == num_layers:
        scales = np.repeat(scales[:, None], heads, axis=1)
    elif len(scales) == num_layers * heads:
        scales = scales.reshape(num_layers, heads)
    else:
        raise ValueError(f"ecq profile {profile!r} is for {len(table[part])} layers (or layers x heads), the "
                         f"entry has {num_layers} layers of {heads} heads")
    return np.clip(step * scales, *_STEP_RANGE).astype(np.float32)


def _float16(values: np.ndarray) -> np.ndarray:
    """Statistics as float16, finite (an unrepresentable value escapes instead of poisoning its group)."""
    return np.clip(np.nan_to_num(values, nan=0.0), -_FLOAT16_MAX, _FLOAT16_MAX).astype(np.float16)


def _positive16(step: np.ndarray) -> np.ndarray:
    """Steps as float16, at least the smallest float16 above zero (a zero spread still needs a step)."""
    step16 = _float16(step)
    return np.where(step16 > 0, step16, np.float16(2.0 ** -24)).astype(np.float16)


def sink_tokens(keys: np.ndarray, threshold: float) -> np.ndarray:
    """Flat ``block * tokens + token`` indices of tokens whose keys are outliers (attention sinks).

    A token's score is the largest ``|k - channel mean| / head RMS`` over its channels, averaged over layers
    and heads; on the demo model only the sequence's first token scores above 5 (others stay below 4.5).
    """
    if threshold <= 0:
        return np.zeros(0, dtype=np.int64)
    centered = keys - keys.mean(axis=3, keepdims=True)
    rms = np.sqrt((centered ** 2).mean(axis=(3, 4), keepdims=True))
    score = (np.abs(centered) / np.where(rms > 0, rms, 1)).max(axis=4).mean(axis=(0, 2))  # [blocks, tokens]
    return np.flatnonzero(np.nan_to_num(score, nan=np.inf) > threshold)


def _kept_mean(values: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Per-channel mean over the tokens kept (all tokens if none is)."""
    weights = keep[None, :, None, :, None].astype(np.float32)
    count = weights.sum(axis=3)
    if (count == 0).any():
        weights, count = np.ones_like(weights), np.full_like(count, values.shape[3])
    return (values * weights).sum(axis=3) / count  # [L, B, H, D]


def key_stats(keys: np.ndarray, keep: np.ndarray, steps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Keys: one step per (layer, block, head) = ``steps[layer, head]`` x RMS about the channel means; the means."""
    center = _float16(_kept_mean(keys, keep))
    centered = (keys - center.astype(np.float32)[:, :, :, None, :]) * keep[None, :, None, :, None]
    kept = np.maximum(keep.sum(axis=1), 1)[None, :, None] * keys.shape[-1]  # values per (block) head
    rms = np.sqrt(np.nan_to_num((centered ** 2).sum(axis=(3, 4)) / kept))
    return _positive16(steps[:, None, :] * rms), center


def value_stats(values: np.ndarray, keep: np.ndarray, steps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Values: one step per token = ``steps[layer, head]`` x the token's RMS about the channel means; the means."""
    center = _float16(_kept_mean(values, keep))
    centered = values - center.astype(np.float32)[:, :, :, None, :]
    rms = np.sqrt(np.nan_to_num((centered ** 2).mean(axis=4)))
    return _positive16(steps[:, None, :, None] * rms), center


class EcqCodec:
    name = "ecq"
    codec_id = 6
    lossless = False

    def __init__(self, key_step: float = 0.12, value_step: float = 0.15, profile: str = "flat",
                 outliers: float = 5.0, level: int = 1) -> None:
        if not (0 < key_step <= 8 and 0 < value_step <= 8):
            raise ValueError(f"ecq steps are fractions of an RMS in (0, 8], got {key_step}/{value_step}")
        if profile not in PROFILES:
            raise ValueError(f"unknown ecq profile {profile!r}; known: {', '.join(PROFILES)}")
        if outliers < 0:
            raise ValueError(f"ecq outliers is a threshold in head RMS (0 = off), got {outliers}")
        if not -7 <= level <= 19:
            raise ValueError(f"ecq zstd level must be -7..19, got {level}")
        self.key_step, self.value_step, self.profile = float(key_step), float(value_step), profile
        self.outliers, self.level = float(outliers), level
        extras.require(self.name, "numba", "zstandard")

    def encode(self, chunk: torch.Tensor, view: str = "chunk", key: bytes = b"") -> bytes:
        keys, values = (quant.as_float32(part) for part in kv_parts(chunk, view))
        num_layers, num_blocks, heads, tokens, _ = keys.shape
        sinks = sink_tokens(keys, self.outliers)
        keep = np.ones(num_blocks * tokens, dtype=bool)
        keep[sinks] = False
        keep = keep.reshape(num_blocks, tokens)
        # a sink's keys and values, [layers, 2, heads, head_size] each (before quantization changes them)
        rows = np.stack([np.stack([keys[:, b, :, t], values[:, b, :, t]], axis=1)
                         for b, t in zip(*np.divmod(sinks, tokens))]) if len(sinks) else np.zeros(0, np.float32)
        sections = [np.array([len(sinks)], dtype="<u4").tobytes(), sinks.astype("<u4").tobytes(),
                    rows.astype("<f4").tobytes()]
        stats = (key_stats(keys, keep, layer_steps(num_layers, heads, self.key_step, self.profile, 0)),
                 value_stats(values, keep, layer_steps(num_layers, heads, self.value_step, self.profile, 1)))
        symbol_parts = []
        for part, (step, center) in zip((keys, values), stats):
            step32 = step.astype(np.float32)
            if step32.ndim == 3:  # keys: one step per head, spread over its tokens
                step32 = np.repeat(step32[..., None], tokens, axis=3)
            center32 = center.astype(np.float32)
            for b, t in zip(*np.nonzero(~keep)):
                part[:, b, :, t] = center32[:, b]  # sinks are stored exactly: their symbols are the center
            symbols = np.empty(part.shape, dtype=np.uint8)
            extras.kernels().quantize_centered(part, np.ascontiguousarray(step32), center32, symbols)
            escaped = np.flatnonzero(symbols.reshape(-1) == 0)
            sections += [step.tobytes(), center.tobytes(), np.array([len(escaped)], dtype="<u4").tobytes(),
                         escaped.astype("<u4").tobytes(), part.reshape(-1)[escaped].astype("<f4").tobytes()]
            symbol_parts.append(symbols)
        compressor = quant.symbol_compressor(self.level)
        lengths, frames = [], []
        for symbols in symbol_parts:
            for layer in range(num_layers):
                frame = compressor.compress(symbols[layer].tobytes())  # [blocks, heads, tokens, head_size]
                lengths.append(len(frame))
                frames.append(frame)
        params = _PARAMS.pack(self.level, num_layers, self.key_step, self.value_step,
                              PROFILE_CODES[self.profile], self.outliers)
        table = np.array(lengths, dtype="<u4").tobytes()
        return pack_entry(self.codec_id, EntryMeta.of(chunk, view), b"".join(sections + [table] + frames), params, key)

    def decode(self, data: bytes | memoryview, expected_shape: tuple[int, ...] | None = None,
               expected_dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        entry = open_entry(data, self.codec_id, self.name, _PARAMS, expected_shape, expected_dtype)
        _, num_layers, *_ = entry.params
        out = output_for(entry.header, out)
        with kv_targets(out, entry.header.view) as parts:
            _decode_parts(entry.payload, parts, num_layers, out.dtype)
        return out


def _decode_parts(payload: memoryview, parts: tuple[torch.Tensor, torch.Tensor], num_layers: int,
                  dtype: torch.dtype) -> None:
    if parts[0].shape[0] != num_layers:
        raise CorruptEntry(f"ecq entry names {num_layers} layers, its shape has {parts[0].shape[0]}")
    _, num_blocks, heads, tokens, head_size = parts[0].shape
    reader = quant.Reader(payload)
    count = int(reader.array(np.dtype("<u4"), (1,))[0])
    sinks = reader.array(np.dtype("<u4"), (count,)).astype(np.int64)
    rows = reader.array(np.dtype("<f4"), (count, num_layers, 2, heads, head_size))
    if (sinks >= num_blocks * tokens).any():
        raise CorruptEntry("ecq sink token index out of range")
    plane = (num_layers, num_blocks, heads)
    sections = []
    for kv in range(2):
        step = reader.array(np.float16, plane if kv == 0 else (*plane, tokens)).astype(np.float32)
        center = reader.array(np.float16, (*plane, head_size)).astype(np.float32)
        escapes = int(reader.array(np.dtype("<u4"), (1,))[0])
        positions = reader.array(np.dtype("<u4"), (escapes,)).astype(np.int64)
        if (positions >= num_layers * num_blocks * heads * tokens * head_size).any():
            raise CorruptEntry("ecq escape position out of range")
        sections.append((step, center, positions, reader.array(np.dtype("<f4"), (escapes,))))
    lengths = reader.array(np.dtype("<u4"), (2, num_layers))
    decompressor = extras.zstandard().ZstdDecompressor()
    kernels = extras.kernels()
    expected = num_blocks * heads * tokens * head_size
    for kv, (part, (step, center, positions, escaped)) in enumerate(zip(parts, sections)):
        symbols = np.empty((num_layers, num_blocks, heads, tokens, head_size), dtype=np.uint8)
        for layer in range(num_layers):
            plain = quant.decompress_stream(decompressor, reader.take(int(lengths[kv, layer])), expected, "ecq")
            symbols[layer] = plain.reshape(num_blocks, heads, tokens, head_size)
        if kv == 0:
            step = np.repeat(step[..., None], tokens, axis=3)
        quant.write_decoded(part, kernels.dequantize_centered, symbols, step, center)
        if len(positions):
            index = torch.from_numpy(np.stack(np.unravel_index(positions, symbols.shape)))
            part[tuple(index)] = torch.from_numpy(escaped.copy()).to(dtype)
        for (b, t), row in zip(zip(*np.divmod(sinks, tokens)), rows):
            part[:, b, :, t] = torch.from_numpy(row[:, kv].copy()).to(dtype)
    reader.finish()

