"""Numba kernels for the lossy codecs: group statistics, quantization, and fused dequantize-to-bf16.

Decoding is the hot path (a disk or Redis hit waits for it), so dequantization
is one pass that reads the symbols, scales them and writes bf16 bits straight
into the entry's final layout (a strided view); numpy/torch would need five
passes.  Arrays are 5-D ``[layers, blocks, heads, tokens, head_size]`` (one of
K or V of the block view, see ``kvview``); statistics are kept per group of
``group_tokens`` tokens x ``group_channels`` channels, so keys (per channel,
grouped over tokens) and values (per token, grouped over channels) share them.
"""

from __future__ import annotations

import numba
import numpy as np

_JIT = {"cache": True, "nogil": True, "boundscheck": False}


@numba.njit(inline="always", **_JIT)
def _bf16_bits(value: np.uint32) -> np.uint16:
    """The bits of a float32 (given as its uint32 bits) rounded to bf16, round to nearest even."""
    return np.uint16((value + np.uint32(0x7FFF) + ((value >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))


@numba.njit(**_JIT)
def group_min_max(x: np.ndarray, group_tokens: int, group_channels: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-group minimum and maximum of a 5-D float32 array."""
    layers, blocks, heads, tokens, channels = x.shape
    shape = (layers, blocks, heads, (tokens + group_tokens - 1) // group_tokens,
             (channels + group_channels - 1) // group_channels)
    low = np.full(shape, np.inf, dtype=np.float32)
    high = np.full(shape, -np.inf, dtype=np.float32)
    for layer in range(layers):
        for b in range(blocks):
            for h in range(heads):
                for t in range(tokens):
                    tg = t // group_tokens
                    for c in range(channels):
                        cg = c // group_channels
                        value = x[layer, b, h, t, c]
                        if value < low[layer, b, h, tg, cg]:
                            low[layer, b, h, tg, cg] = value
                        if value > high[layer, b, h, tg, cg]:
                            high[layer, b, h, tg, cg] = value
    return low, high


@numba.njit(**_JIT)
def quantize(x: np.ndarray, low: np.ndarray, scale: np.ndarray, levels: np.ndarray, group_tokens: int,
             group_channels: int, out: np.ndarray) -> None:
    """``out = clip(round((x - low) / scale), 0, levels[layer])`` as uint8 symbols (one per value)."""
    layers, blocks, heads, tokens, channels = x.shape
    for layer in range(layers):
        top = levels[layer]
        for b in range(blocks):
            for h in range(heads):
                for t in range(tokens):
                    tg = t // group_tokens
                    for c in range(channels):
                        cg = c // group_channels
                        step = scale[layer, b, h, tg, cg]
                        q = 0.0
                        if step > 0:
                            q = np.floor((x[layer, b, h, t, c] - low[layer, b, h, tg, cg]) / step + 0.5)
                        if q < 0:
                            q = 0.0
                        if q > top:
                            q = top
                        out[layer, b, h, t, c] = np.uint8(q)


@numba.njit(**_JIT)
def _expand_row(stats: np.ndarray, group_channels: int, out: np.ndarray) -> None:
    """Spread one row of per-group statistics over the channels of its groups."""
    channels = out.shape[0]
    for group in range(stats.shape[0]):
        value = stats[group]
        for c in range(group * group_channels, min((group + 1) * group_channels, channels)):
            out[c] = value


@numba.njit(inline="always", **_JIT)
def _store_row(row: np.ndarray, row_bits: np.ndarray, target: np.ndarray, as_bf16: bool) -> None:
    """One decoded row into the output: bf16 bits (rounded to nearest even) or float32."""
    if as_bf16:
        for c in range(row.shape[0]):
            target[c] = _bf16_bits(row_bits[c])
    else:
        for c in range(row.shape[0]):
            target[c] = row[c]


@numba.njit(inline="always", **_JIT)
def _unpack_whole(source: np.ndarray, row: np.ndarray, bits: int) -> None:
    """Symbols of ``bits`` (2 or 4) bits, ``8 // bits`` per byte, low bits first."""
    per_byte = 8 // bits
    mask = (1 << bits) - 1
    for i in range(row.shape[0] // per_byte):
        byte = source[i]
        for j in range(per_byte):
            row[i * per_byte + j] = (byte >> (bits * j)) & mask


@numba.njit(inline="always", **_JIT)
def _unpack_dense(source: np.ndarray, row: np.ndarray, bits: int) -> None:
    """Symbols of ``bits`` (3, 5, 6, 7) bits, each 8 in ``bits`` bytes as a little-endian bit stream."""
    mask = np.uint64((1 << bits) - 1)
    for g in range(row.shape[0] // 8):
        word = np.uint64(0)
        for k in range(bits):
            word |= np.uint64(source[g * bits + k]) << np.uint64(8 * k)
        for j in range(8):
            row[g * 8 + j] = (word >> np.uint64(bits * j)) & mask


@numba.njit(fastmath=True, **_JIT)
def dequantize_rows(symbols: np.ndarray, layer_bits: np.ndarray, low: np.ndarray, scale: np.ndarray,
                     group_tokens: int, group_channels: int, out: np.ndarray, as_bf16: bool) -> None:
    """Row by row: unpack symbols, scale and shift them (vectorizable), store as bf16 bits or float32.

    ``layer_bits[layer]`` is the width symbols are packed with in that layer: 8, 4 or 2 (whole symbols per
    byte) or 3, 5, 6, 7 (dense: each 8 symbols in ``bits`` bytes).  Per (layer,
    block, head) the work is on 2-D ``[tokens, channels]`` planes, so no array is sliced per row.
    """
    layers, blocks, heads, tokens, channels = out.shape
    row = np.empty(channels, dtype=np.float32)
    row_bits = row.view(np.uint32)
    step_row = np.empty(channels, dtype=np.float32)
    low_row = np.empty(channels, dtype=np.float32)
    one_group_per_row = group_channels >= channels
    for layer in range(layers):
        bits = layer_bits[layer]
        for b in range(blocks):
            for h in range(heads):
                plane = symbols[layer, b, h]
                target = out[layer, b, h]
                steps = scale[layer, b, h]
                lows = low[layer, b, h]
                cached_group = -1
                for t in range(tokens):
                    tg = t // group_tokens
                    source = plane[t]
                    # one branch per width, so each unpacking loop is compiled with constant shifts and masks
                    if bits == 8:
                        for c in range(channels):
                            row[c] = source[c]
                    elif bits == 4:
                        _unpack_whole(source, row, 4)
                    elif bits == 2:
                        _unpack_whole(source, row, 2)
                    elif bits == 6:
                        _unpack_dense(source, row, 6)
                    elif bits == 5:
                        _unpack_dense(source, row, 5)
                    elif bits == 3:
                        _unpack_dense(source, row, 3)
                    else:
                        _unpack_dense(source, row, 7)
                    if one_group_per_row:
                        step = steps[tg, 0]
                        base = lows[tg, 0]
                        for c in range(channels):
                            row[c] = row[c] * step + base
                    else:
                        if tg != cached_group:
                            _expand_row(steps[tg], group_channels, step_row)
                            _expand_row(lows[tg], group_channels, low_row)
                            cached_group = tg if group_tokens > 1 else -1
                        for c in range(channels):
                            row[c] = row[c] * step_row[c] + low_row[c]
                    _store_row(row, row_bits, target[t], as_bf16)


@numba.njit(**_JIT)
def lookup_scale_bf16(codes: np.ndarray, table: np.ndarray, scale: np.ndarray, out: np.ndarray) -> None:
    """bf16 bits of ``table[code] * scale[..., token]`` (fp8 decode: one scale per token and head)."""
    layers, blocks, heads, tokens, channels = out.shape
    row = np.empty(channels, dtype=np.float32)
    row_bits = row.view(np.uint32)
    for layer in range(layers):
        for b in range(blocks):
            for h in range(heads):
                for t in range(tokens):
                    s = scale[layer, b, h, t]
                    source = codes[layer, b, h, t]
                    for c in range(channels):
                        row[c] = table[source[c]] * s
                    target = out[layer, b, h, t]
                    for c in range(channels):
                        target[c] = _bf16_bits(row_bits[c])


@numba.njit(**_JIT)
def split_bf16(bits: np.ndarray, exponents: np.ndarray, sign_mantissas: np.ndarray) -> None:
    """Split bf16 bit patterns into an exponent plane and a sign+mantissa plane (lossless codec)."""
    for i in range(bits.shape[0]):
        value = bits[i]
        exponents[i] = np.uint8((value >> 7) & 0xFF)
        sign_mantissas[i] = np.uint8(((value >> 8) & 0x80) | (value & 0x7F))


@numba.njit(**_JIT)
def join_bf16(exponents: np.ndarray, sign_mantissas: np.ndarray, bits: np.ndarray) -> None:
    """Inverse of :func:`split_bf16`."""
    for i in range(bits.shape[0]):
        sm = np.uint16(sign_mantissas[i])
        bits[i] = np.uint16(((sm & 0x80) << 8) | (np.uint16(exponents[i]) << 7) | (sm & 0x7F))


@numba.njit(**_JIT)
def quantize_centered(x: np.ndarray, step: np.ndarray, center: np.ndarray, out: np.ndarray) -> int:
    """``out = round((x - center[channel]) / step[token]) + 128`` as uint8; values outside -127..127 steps
    (and non-finite ones) get the escape symbol 0 (stored exactly elsewhere).  Returns how many escaped."""
    layers, blocks, heads, tokens, channels = x.shape
    escaped = 0
    for layer in range(layers):
        for b in range(blocks):
            for h in range(heads):
                for t in range(tokens):
                    s = step[layer, b, h, t]
                    for c in range(channels):
                        q = np.floor((x[layer, b, h, t, c] - center[layer, b, h, c]) / s + 0.5)
                        if q >= -127.0 and q <= 127.0:
                            out[layer, b, h, t, c] = np.uint8(q + 128.0)
                        else:
                            out[layer, b, h, t, c] = 0
                            escaped += 1
    return escaped


@numba.njit(fastmath=True, **_JIT)
def dequantize_centered(symbols: np.ndarray, step: np.ndarray, center: np.ndarray, out: np.ndarray,
                         as_bf16: bool) -> None:
    """Row by row: ``(symbol - 128) * step[token] + center[channel]``, stored as bf16 bits or float32."""
    layers, blocks, heads, tokens, channels = out.shape
    row = np.empty(channels, dtype=np.float32)
    row_bits = row.view(np.uint32)
    for layer in range(layers):
        for b in range(blocks):
            for h in range(heads):
                plane = symbols[layer, b, h]
                target = out[layer, b, h]
                steps = step[layer, b, h]
                centers = center[layer, b, h]
                for t in range(tokens):
                    s = steps[t]
                    base = np.float32(-128.0) * s
                    for c in range(channels):
                        row[c] = np.float32(plane[t, c]) * s + (base + centers[c])
                    _store_row(row, row_bits, target[t], as_bf16)


@numba.njit(**_JIT)
def amx_tiles(logical_keys: np.ndarray, logical_values: np.ndarray, pages: np.ndarray, to_pages: bool) -> None:
    """Move K/V between logical ``[L, P, H, T, D]`` order and vLLM-CPU's AMX page tiles (values as integers).

    ``pages`` is ``[L, P, H, 2 * T * D]``: per head, keys as ``[T/16, D/2, 16, 2]`` (token groups of 16,
    channel pairs) then values as ``[D/16, T/2, 16, 2]`` (channel groups of 16, token pairs), as the
    ``vllm-cpu-amx`` view describes.  The loops walk the page in memory order: torch's strided copy of the
    same permutation is 1.5-2x slower (its innermost axis has two elements).
    """
    layers, num_pages, heads, tokens, channels = logical_keys.shape
    for layer in range(layers):
        for p in range(num_pages):
            for h in range(heads):
                page = pages[layer, p, h]
                keys = logical_keys[layer, p, h]
                values = logical_values[layer, p, h]
                at = 0
                for group in range(tokens // 16):
                    for pair in range(channels // 2):
                        for t in range(group * 16, group * 16 + 16):
                            if to_pages:
                                page[at] = keys[t, 2 * pair]
                                page[at + 1] = keys[t, 2 * pair + 1]
                            else:
                                keys[t, 2 * pair] = page[at]
                                keys[t, 2 * pair + 1] = page[at + 1]
                            at += 2
                for group in range(channels // 16):
                    for pair in range(tokens // 2):
                        for c in range(group * 16, group * 16 + 16):
                            if to_pages:
                                page[at] = values[2 * pair, c]
                                page[at + 1] = values[2 * pair + 1, c]
                            else:
                                values[2 * pair, c] = page[at]
                                values[2 * pair + 1, c] = page[at + 1]
                            at += 2
