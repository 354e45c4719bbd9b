"""Codecs turn chunk tensors into self-describing bytes (see ``base``); ``get_codec`` picks one by name."""

from __future__ import annotations

import torch

from kvmesh.codecs.base import Codec, CorruptEntry, read_header
from kvmesh.codecs.raw import RawCodec

_CODECS: dict[str, type] = {"raw": RawCodec}


def get_codec(name: str) -> Codec:
    if name not in _CODECS:
        raise ValueError(f"unknown codec {name!r}; known: {', '.join(sorted(_CODECS))}")
    return _CODECS[name]()


def decode_any(data: bytes | memoryview, expected_shape: tuple[int, ...] | None = None,
               expected_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Decode an entry with whichever codec wrote it, so changing the configured codec loses nothing."""
    header = read_header(data)
    for codec_type in _CODECS.values():
        if codec_type.codec_id == header.codec_id:
            return codec_type().decode(data, expected_shape, expected_dtype)
    raise CorruptEntry(f"entry was written by unknown codec id {header.codec_id}")


__all__ = ["Codec", "CorruptEntry", "RawCodec", "decode_any", "get_codec"]
