"""The entry header: format 2 carries the KV view and the chunk key as fields; entries of format 1 still decode
the same, for any key."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import pytest
import torch
import xxhash

from kvmesh.codecs import CorruptEntry, RawCodec, UnreadableEntry, decode_any, entry_view, get_codec
from kvmesh.codecs.base import FORMAT_VERSION, pack_entry, read_header
from kvmesh.entry import EntryMeta

FORMAT1 = json.loads((Path(__file__).parent / "data" / "format1_entries.json").read_text())["entries"]


def _source(case: dict) -> torch.Tensor:
    generator = torch.Generator().manual_seed(case["seed"])
    return (torch.randn(tuple(case["shape"]), generator=generator) * 2).to(torch.bfloat16)


def _digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.view(torch.uint8).numpy().tobytes()).hexdigest()


@pytest.mark.parametrize("case", FORMAT1, ids=lambda case: f"{case['spec']}-{case['view']}")
def test_format1_entries_written_by_the_old_kvmesh_decode_as_they_did(case: dict) -> None:
    data = bytes.fromhex(case["entry"])
    header = read_header(data)
    assert header.version == 1
    assert header.meta == EntryMeta("bfloat16", tuple(case["shape"]), case["view"])
    assert entry_view(data) == case["view"]
    decoded = decode_any(data, tuple(case["shape"]), torch.bfloat16)
    assert _digest(decoded) == case["decoded_sha256"]
    if get_codec(case["spec"]).lossless:
        assert torch.equal(decoded.view(torch.int16), _source(case).view(torch.int16))


@pytest.mark.parametrize("case", FORMAT1, ids=lambda case: f"{case['spec']}-{case['view']}")
def test_format2_keeps_the_payload_and_moves_the_view_into_the_header(case: dict) -> None:
    old = read_header(bytes.fromhex(case["entry"]))
    data = get_codec(case["spec"]).encode(_source(case), case["view"])
    new = read_header(data)
    assert (new.version, new.meta, new.params, new.payload_checksum) == (
        FORMAT_VERSION, old.meta, old.params, old.payload_checksum)
    # format 2 adds a view code and a key length (no key named here); format 1 had a view byte in the params
    assert new.size == old.size + 2 - (0 if case["spec"] == "raw" and case["view"] == "chunk" else 1)
    assert _digest(decode_any(data)) == case["decoded_sha256"]


def _format1(view_and_params: bytes, tensor: torch.Tensor, codec_id: int = 1) -> bytes:
    """An entry as format 1 wrote it: no view field, the view (if any) leading the codec's parameters."""
    payload = tensor.contiguous().view(torch.uint8).numpy().tobytes()
    shape = tuple(tensor.shape) + (0,) * (5 - tensor.dim())
    head = struct.pack("<4sHHBB5IHQQ", b"KVMC", 1, codec_id, 1, tensor.dim(), *shape, len(view_and_params),
                       len(payload), xxhash.xxh3_64_intdigest(payload)) + view_and_params
    return head + struct.pack("<I", xxhash.xxh32_intdigest(head)) + payload


def test_format1_raw_entries_without_parameters_are_chunks_and_with_one_byte_name_their_view() -> None:
    tensor = torch.arange(2 * 2 * 4 * 1 * 8, dtype=torch.float32).to(torch.bfloat16).view(2, 2, 4, 1, 8)
    plain, paged = _format1(b"", tensor), _format1(bytes([1]), tensor.view(2, 1, 1, 8, 8))
    assert read_header(plain).meta == EntryMeta("bfloat16", (2, 2, 4, 1, 8), "chunk")
    assert read_header(paged).meta == EntryMeta("bfloat16", (2, 1, 1, 8, 8), "cpu-pages")
    assert read_header(paged).params == b""
    assert torch.equal(decode_any(plain), tensor)
    assert torch.equal(decode_any(paged), tensor.view(2, 1, 1, 8, 8))


def test_unknown_views_and_versions_name_them_newer_ones_unreadable_not_corrupt() -> None:
    """A newer writer's format, view or codec is intact, only unreadable here (a rolling upgrade)."""
    tensor = torch.zeros(1, 2, 4, 1, 8, dtype=torch.bfloat16)
    with pytest.raises(CorruptEntry, match="KV view code 9"):  # format 1 had no such code: damage
        read_header(_format1(bytes([9]), tensor))
    data = bytearray(get_codec("raw").encode(tensor))
    data[4:6] = struct.pack("<H", 3)
    with pytest.raises(UnreadableEntry, match="format version 3"):
        read_header(bytes(data))
    data[4:6] = struct.pack("<H", 0)
    with pytest.raises(CorruptEntry, match="format version 0"):
        read_header(bytes(data))
    payload = tensor.view(torch.uint8).numpy().tobytes()
    good = pack_entry(1, EntryMeta.of(tensor), payload)
    forged = bytearray(good)
    forged[10] = 7  # the view code of format 2, after magic, version, codec id, dtype code and rank
    head = bytes(forged[:len(good) - len(payload) - 4])
    forged[len(head):len(head) + 4] = struct.pack("<I", xxhash.xxh32_intdigest(head))
    with pytest.raises(UnreadableEntry, match="KV view code 7"):
        read_header(bytes(forged))


KEY, OTHER = b"k" * 16, b"o" * 16
SPECS = ["raw", "lossless", "lossless:compressor=lz4", "fp8", "kivi", "cachegen", "ecq"]


@pytest.mark.parametrize("spec", SPECS)
def test_format2_names_the_key_and_a_read_for_another_key_is_a_corrupt_entry(spec: str) -> None:
    chunk = _source({"seed": 3, "shape": [4, 2, 16, 2, 16]})
    unkeyed = get_codec(spec).encode(chunk, "chunk")
    data = get_codec(spec).encode(chunk, "chunk", key=KEY)
    header = read_header(data, expected_key=KEY)
    assert header.key == KEY and header.version == FORMAT_VERSION
    assert header.size == read_header(unkeyed).size + len(KEY)
    assert bytes(data[header.size:]) == bytes(unkeyed[read_header(unkeyed).size:])  # the same payload
    assert torch.equal(decode_any(data, expected_key=KEY), decode_any(unkeyed))
    with pytest.raises(CorruptEntry, match=f"written for key {KEY.hex()}, read for {OTHER.hex()}"):
        read_header(data, expected_key=OTHER)
    with pytest.raises(CorruptEntry, match="written for key"):
        decode_any(data, expected_key=OTHER)
    assert read_header(unkeyed, expected_key=OTHER).key == b""  # names no key: read for any


def test_the_key_is_covered_by_the_header_checksum() -> None:
    data = bytearray(get_codec("raw").encode(torch.zeros(1, 2, 4, 1, 8, dtype=torch.bfloat16), key=KEY))
    start = data.index(KEY)
    data[start:start + len(KEY)] = OTHER  # renamed by hand: the header checksum no longer holds
    with pytest.raises(CorruptEntry, match="header checksum mismatch"):
        read_header(bytes(data), expected_key=OTHER)


def test_raw_parts_name_the_key_as_the_joined_entry_does() -> None:
    chunk = _source({"seed": 4, "shape": [2, 2, 16, 1, 16]})
    header, payload = RawCodec().encode_parts(chunk, "chunk", KEY)
    assert header + bytes(payload) == RawCodec().encode(chunk, "chunk", KEY)
    assert read_header(header + bytes(payload), expected_key=KEY).key == KEY


def test_a_key_too_long_for_the_header_is_refused_when_encoding() -> None:
    with pytest.raises(ValueError, match="at most 255 bytes"):
        get_codec("raw").encode(torch.zeros(1, 2, 4, 1, 8, dtype=torch.bfloat16), key=b"x" * 256)


@pytest.mark.parametrize("case", FORMAT1, ids=lambda case: f"{case['spec']}-{case['view']}")
def test_format1_entries_name_no_key_and_are_read_for_any_key(case: dict) -> None:
    data = bytes.fromhex(case["entry"])
    assert read_header(data, expected_key=KEY).key == b""
    decoded = decode_any(data, tuple(case["shape"]), torch.bfloat16, expected_key=OTHER)
    assert _digest(decoded) == case["decoded_sha256"]
