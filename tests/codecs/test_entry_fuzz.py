"""Fuzzing the parsers of stored entries: arbitrary or damaged bytes are a typed error, never a crash or a hang.

What reaches these parsers comes from a disk directory or a Redis that someone else may write; the store turns
``CorruptEntry`` (damage: deleted, counted) and ``UnreadableEntry`` (a newer format: left alone) into misses, so
anything else escaping them would be a bug served as a crash.
"""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmesh.codecs import RawCodec, decode_any, get_codec
from kvmesh.codecs.base import CorruptEntry, UnreadableEntry, read_header
from kvmesh.tiers import legacy, redis_values

KEY = bytes(range(16))
TYPED = (CorruptEntry, UnreadableEntry)
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _entry(codec_spec: str = "raw") -> bytes:
    chunk = torch.randn(2, 2, 16, 2, 8, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    codec = RawCodec() if codec_spec == "raw" else get_codec(codec_spec)
    return bytes(codec.encode(chunk, "chunk", KEY))


ENTRIES = {spec: _entry(spec) for spec in ("raw", "fp8")}


@FUZZ
@given(st.binary(max_size=4096))
def test_arbitrary_bytes_are_a_typed_error_or_an_entry(data: bytes) -> None:
    for parse in (lambda: read_header(data, expected_key=KEY), lambda: decode_any(data),
                  lambda: legacy.read_disk(data, KEY), lambda: redis_values.parse_head(data)):
        try:
            parse()
        except TYPED:
            pass


@FUZZ
@given(st.sampled_from(sorted(ENTRIES)), st.data())
def test_a_damaged_entry_never_decodes(spec: str, data: st.DataObject) -> None:
    entry = bytearray(ENTRIES[spec])
    how = data.draw(st.sampled_from(["flip", "truncate", "extend"]))
    if how == "flip":
        at = data.draw(st.integers(0, len(entry) - 1))
        entry[at] ^= 1 << data.draw(st.integers(0, 7))
    elif how == "truncate":
        del entry[data.draw(st.integers(0, len(entry) - 1)):]
    else:
        entry += data.draw(st.binary(min_size=1, max_size=64))
    try:
        decode_any(bytes(entry))
    except TYPED:
        return
    raise AssertionError(f"a {how} of a {spec} entry decoded without an error")
