"""Every codec beyond raw: bit-exactness where promised, error bounds where lossy, refusal of bad bytes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvmesh.codecs import (
    CacheGenCodec,
    CorruptEntry,
    Fp8Codec,
    KiviCodec,
    LosslessCodec,
    RawCodec,
    decode_any,
    encode_for_tier,
    entry_view,
    get_codec,
)
from kvmesh.codecs.base import pack_entry, read_header
from kvmesh.codecs.cachegen import layer_bits
from kvmesh.codecs.kvview import PAGE_VIEWS, ViewError, block_view

LOSSY_SPECS = ["fp8", "kivi:bits=8", "kivi:bits=4", "kivi:bits=2", "cachegen", "ecq",
               "cachegen:key_bits=8-5-3,value_bits=4-3-2,key_group=32,value_group=16"]


def _chunk(dtype: torch.dtype = torch.bfloat16, tokens: int = 256, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    chunk = torch.randn(6, 2, tokens, 3, 16, generator=generator)
    chunk[:, 0, :, :, 3] *= 20  # a key channel with outliers, as real keys have
    return chunk.to(dtype)


def _pages(dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    return torch.randn(6, 2, 3, 32, 2 * 16, generator=torch.Generator().manual_seed(1)).to(dtype)


@pytest.mark.parametrize("spec", ["lossless", "lossless:compressor=lz4", "lossless:level=5"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_lossless_round_trip_is_bit_exact(spec: str, dtype: torch.dtype) -> None:
    chunk = _chunk(dtype)
    chunk.view(-1)[0] = float("nan")
    chunk.view(-1)[1] = float("-inf")
    chunk.view(-1)[2] = -0.0
    data = get_codec(spec).encode(chunk)
    back = decode_any(data, tuple(chunk.shape), dtype)
    assert torch.equal(back.view(torch.uint8), chunk.view(torch.uint8))


@pytest.mark.slow  # the demo model's real KV
def test_lossless_compresses_real_kv(real_kv: torch.Tensor) -> None:
    data = LosslessCodec().encode(real_kv)
    assert len(data) < 0.8 * real_kv.numel() * 2
    assert torch.equal(decode_any(data).view(torch.int16), real_kv.view(torch.int16))


def _group_ranges(values: torch.Tensor, tokens: int, channels: int) -> torch.Tensor:
    """Per value: the max - min of its quantization group (``values`` is [L, blocks, heads, T, D] float)."""
    L, B, H, T, D = values.shape
    padded_t, padded_d = -(-T // tokens) * tokens, -(-D // channels) * channels
    low = torch.full((L, B, H, padded_t, padded_d), float("inf"))
    high = torch.full((L, B, H, padded_t, padded_d), float("-inf"))
    low[..., :T, :D], high[..., :T, :D] = values, values
    shape = (L, B, H, padded_t // tokens, tokens, padded_d // channels, channels)
    spread = high.view(shape).amax(dim=(4, 6), keepdim=True) - low.view(shape).amin(dim=(4, 6), keepdim=True)
    return spread.expand(shape).reshape(L, B, H, padded_t, padded_d)[..., :T, :D]


def _check_kivi_bound(chunk: torch.Tensor, view: str, bits: tuple[np.ndarray, np.ndarray], key_group: int,
                      value_group: int, back: torch.Tensor) -> None:
    original, decoded = block_view(chunk, view).float(), block_view(back, view).float()
    for kv, (tokens, channels) in enumerate(((key_group, 1), (1, value_group))):
        values = original[:, kv]
        levels = torch.from_numpy((1 << bits[kv]) - 1).float().view(-1, 1, 1, 1, 1)
        half_step = _group_ranges(values, tokens, channels) / levels / 2
        # half a step, float16 rounding of the group's min and step, and bf16 rounding of the result
        bound = half_step * 1.01 + values.abs() * 2.0**-8 + 1e-3 * half_step.clamp(min=1e-2)
        error = (decoded[:, kv] - values).abs()
        assert bool((error <= bound).all()), f"kv={kv}: worst excess {float((error - bound).max())}"


@pytest.mark.parametrize("key_bits, value_bits", [(8, 8), (7, 3), (6, 5), (4, 4), (2, 2)])
@pytest.mark.parametrize("view", ["chunk", *PAGE_VIEWS])
def test_kivi_error_is_within_half_a_step(key_bits: int, value_bits: int, view: str) -> None:
    chunk = _chunk() if view == "chunk" else _pages()
    codec = KiviCodec(key_bits=key_bits, value_bits=value_bits, key_group=32, value_group=8)
    back = decode_any(codec.encode(chunk, view))
    assert back.shape == chunk.shape and back.dtype == chunk.dtype
    layers = chunk.shape[0]
    _check_kivi_bound(chunk, view, (np.full(layers, key_bits), np.full(layers, value_bits)), 32, 8, back)


def test_kivi_sizes() -> None:
    chunk = _chunk(tokens=256)
    raw = chunk.numel() * 2
    ratios = {bits: raw / len(KiviCodec(bits, key_group=128, value_group=16).encode(chunk))
              for bits in (8, 6, 5, 4, 3, 2)}
    assert 1.7 < ratios[8] < 2 < ratios[6] < ratios[5] < ratios[4] < ratios[3] < ratios[2] < 8


@pytest.mark.parametrize("view", ["chunk", *PAGE_VIEWS])
def test_cachegen_error_follows_its_per_layer_widths(view: str) -> None:
    chunk = _chunk() if view == "chunk" else _pages()
    codec = CacheGenCodec(key_bits=(8, 5, 3), value_bits=(4, 3, 2), key_group=32, value_group=16)
    back = decode_any(codec.encode(chunk, view))
    layers = chunk.shape[0]
    _check_kivi_bound(chunk, view, (layer_bits(layers, (8, 5, 3)), layer_bits(layers, (4, 3, 2))), 32, 16, back)


@pytest.mark.slow  # the demo model's real KV
@pytest.mark.parametrize("key_bits, value_bits", [(4, 4), (6, 5)])
def test_cachegen_entropy_coding_beats_bit_packing_on_real_kv(key_bits: int, value_bits: int,
                                                              real_kv: torch.Tensor) -> None:
    kivi = KiviCodec(key_bits=key_bits, value_bits=value_bits).encode(real_kv)
    coded = CacheGenCodec(key_bits=(key_bits,) * 3, value_bits=(value_bits,) * 3).encode(real_kv)
    assert len(coded) < len(kivi)
    assert torch.equal(decode_any(coded), decode_any(kivi))  # the same quantization, coded differently


@pytest.mark.parametrize("view", ["chunk", *PAGE_VIEWS])
def test_fp8_error_is_within_e4m3_precision(view: str) -> None:
    chunk = _chunk() if view == "chunk" else _pages()
    back = decode_any(Fp8Codec().encode(chunk, view))
    original, decoded = block_view(chunk, view).float(), block_view(back, view).float()
    row_max = original.abs().amax(dim=-1, keepdim=True)
    # e4m3 keeps 3 mantissa bits: relative error <= 2^-4 of the value, plus subnormal steps near zero
    bound = original.abs() * 2.0**-4 * 1.01 + row_max / 448 * 2.0**-9 * 2 + original.abs() * 2.0**-8
    assert bool(((decoded - original).abs() <= bound + 1e-6).all())


@pytest.mark.slow  # the demo model's real KV
@pytest.mark.parametrize("spec", LOSSY_SPECS)
def test_lossy_codecs_on_real_kv(spec: str, real_kv: torch.Tensor) -> None:
    """Relative RMS error on the demo model's own KV stays at the level each width allows."""
    back = decode_any(get_codec(spec).encode(real_kv)).float()
    original = real_kv.float()
    relative = float((back - original).pow(2).mean().sqrt() / original.pow(2).mean().sqrt())
    limit = {"fp8": 0.05, "kivi:bits=8": 0.01, "kivi:bits=4": 0.12, "kivi:bits=2": 0.6, "cachegen": 0.03,
             "ecq": 0.03}
    assert relative < limit.get(spec, 0.6), relative


@pytest.mark.parametrize("spec", ["raw", "lossless", "fp8", "kivi:bits=4", "cachegen", "ecq"])
def test_corruption_and_truncation_are_refused(spec: str) -> None:
    chunk = _chunk(tokens=8)
    chunk[1, 0, 3, 1, 2] = 5000.0  # an outlier (ecq stores it beside its stream), so every section is damaged
    data = get_codec(spec).encode(chunk)
    for index in range(0, len(data), max(1, len(data) // 97)):
        damaged = bytearray(data)
        damaged[index] ^= 0x10
        with pytest.raises(CorruptEntry):
            decode_any(bytes(damaged))
    for length in range(0, len(data), max(1, len(data) // 53)):
        with pytest.raises(CorruptEntry):
            decode_any(data[:length])


@pytest.mark.parametrize("spec", ["lossless", "fp8", "kivi:bits=4", "cachegen", "ecq"])
def test_a_well_checksummed_but_short_payload_is_refused(spec: str) -> None:
    """A payload that passes its checksum but does not hold the entry (a writer bug) is still refused."""
    data = get_codec(spec).encode(_chunk(tokens=8))
    header = read_header(data)
    payload = bytes(data[header.size:])
    for cut in (payload[:-1], payload + b"\0", payload[: len(payload) // 2]):
        forged = pack_entry(header.codec_id, header.meta, cut, header.params)
        with pytest.raises(CorruptEntry):
            decode_any(forged)


def test_entries_remember_codec_and_view() -> None:
    pages = _pages()
    for codec in (RawCodec(), LosslessCodec(), Fp8Codec(), KiviCodec(), CacheGenCodec()):
        data = codec.encode(pages, "cpu-pages")
        assert entry_view(data) == "cpu-pages"
        assert read_header(data).codec_id == codec.codec_id
    assert entry_view(RawCodec().encode(_chunk())) == "chunk"


def test_opaque_entries_fall_back_to_bit_exact() -> None:
    tensor = torch.randn(4, 5, 6).to(torch.bfloat16)
    with pytest.raises(ViewError, match="opaque"):
        KiviCodec().encode(tensor, "opaque")
    encoded = encode_for_tier(KiviCodec(), tensor, "opaque", b"q" * 16)
    assert encoded.codec == "lossless"
    assert torch.equal(decode_any(encoded.data).view(torch.int16), tensor.view(torch.int16))
    assert read_header(encoded.data).key == b"q" * 16  # the fallback names the key too


def test_a_shape_that_does_not_fit_its_view_is_refused() -> None:
    with pytest.raises(ViewError, match="cpu-pages"):
        Fp8Codec().encode(torch.zeros(2, 2, 3, 4, 5, dtype=torch.bfloat16), "cpu-pages")


@pytest.mark.parametrize("spec, message", [
    ("gzip", "unknown codec 'gzip'"),
    ("kivi:bits=9", "bits must be 2..8, got 9"),
    ("kivi:value_bits=1", "value_bits must be 2..8, got 1"),
    ("kivi:bitz=4", "no parameter 'bitz'"),
    ("cachegen:key_bits=9", "key_bits must be three widths"),
    ("cachegen:value_bits=x", "bad value 'x' for 'value_bits'"),
    ("lossless:compressor=brotli", "compressor must be one of zstd, lz4"),
    ("ecq:profile=llama", "unknown ecq profile"),
    ("ecq:key_step=0", "steps are fractions"),
    ("ecq:outliers=-1", "outliers is a threshold"),
    ("ecq:value_step=x", "bad value 'x' for 'value_step'"),
])
def test_bad_specs_name_what_is_wrong(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        get_codec(spec)


@pytest.mark.parametrize("spec", ["raw", "lossless", "kivi", "fp8", "cachegen", "ecq"])
def test_a_recurrent_states_bytes_are_stored_bit_exact_by_every_codec(spec: str) -> None:
    """Mamba state blocks reach kvmesh as int8 bytes in the ``opaque`` view: a lossy tier stores them lossless."""
    state = torch.randint(-128, 128, (1, 2, 1, 1, 19840), dtype=torch.int8, generator=torch.Generator().manual_seed(3))
    encoded = encode_for_tier(get_codec(spec), state, "opaque", b"k" * 16)
    assert encoded.codec == ("raw" if spec == "raw" else "lossless")
    back = decode_any(encoded.data, tuple(state.shape), torch.int8)
    assert torch.equal(back, state)
