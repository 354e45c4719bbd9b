import pytest
import torch

from kvmesh.codecs import CorruptEntry, RawCodec, decode_any, get_codec
from kvmesh.codecs.base import read_header


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_round_trip_is_bit_exact(dtype: torch.dtype) -> None:
    chunk = torch.randn(4, 2, 16, 3, 8).to(dtype)
    chunk.view(-1)[0] = float("nan")
    chunk.view(-1)[1] = float("-inf")
    data = RawCodec().encode(chunk)
    back = RawCodec().decode(data, tuple(chunk.shape), dtype)
    assert back.dtype == dtype
    assert torch.equal(back.view(torch.uint8), chunk.view(torch.uint8))
    assert torch.equal(decode_any(data).view(torch.uint8), chunk.view(torch.uint8))


def test_every_single_byte_corruption_is_detected() -> None:
    chunk = torch.randn(2, 2, 4, 1, 8).to(torch.bfloat16)
    data = RawCodec().encode(chunk)
    for index in range(len(data)):
        damaged = bytearray(data)
        damaged[index] ^= 0x40
        with pytest.raises(CorruptEntry):
            RawCodec().decode(bytes(damaged))


def test_every_truncation_and_padding_is_detected() -> None:
    data = RawCodec().encode(torch.randn(2, 2, 4, 1, 8).to(torch.float16))
    for length in range(len(data)):
        with pytest.raises(CorruptEntry):
            RawCodec().decode(data[:length])
    with pytest.raises(CorruptEntry, match="payload"):
        RawCodec().decode(data + b"\0")


def test_other_layout_is_refused() -> None:
    data = RawCodec().encode(torch.zeros(2, 2, 4, 1, 8, dtype=torch.bfloat16))
    with pytest.raises(CorruptEntry, match="shape"):
        RawCodec().decode(data, expected_shape=(2, 2, 4, 1, 16))
    with pytest.raises(CorruptEntry, match="float16"):
        RawCodec().decode(data, expected_dtype=torch.float16)
    assert read_header(data).shape == (2, 2, 4, 1, 8)


def test_unknown_codec_name() -> None:
    with pytest.raises(ValueError, match="raw"):
        get_codec("gzip9000")


def test_encode_parts_is_the_entry_without_copying_the_payload() -> None:
    chunk = torch.randn(2, 2, 8, 2, 4).to(torch.bfloat16)
    header, payload = RawCodec().encode_parts(chunk)
    assert header + bytes(payload) == RawCodec().encode(chunk)
    chunk.view(torch.uint8).view(-1)[0] ^= 0xFF  # the payload is a view of the chunk's own bytes ...
    assert bytes(payload[:1]) == bytes(chunk.view(torch.uint8).view(-1)[:1].numpy())
    chunk.view(torch.uint8).view(-1)[0] ^= 0xFF  # ... and once restored, the joined parts decode to it
    assert torch.equal(decode_any(header + bytes(payload)).view(torch.uint8), chunk.view(torch.uint8))
