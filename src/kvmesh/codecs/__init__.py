"""Codecs turn entry tensors into self-describing bytes (see ``base``); ``get_codec`` builds one from a spec.

A spec is a name with optional parameters, ``name[:key=value,...]``:

* ``raw`` - the bytes as they are;
* ``lossless[:compressor=zstd|lz4,level=N]`` - bit-exact, exponent/byte planes + zstd or lz4;
* ``fp8`` - e4m3 with a scale per (token, head);
* ``kivi[:bits=N,key_bits=N,value_bits=N,key_group=N,value_group=N]`` - KIVI-style min/max quantization,
  2..8 bits, keys and values separately if wanted;
* ``cachegen[:key_bits=A-B-C,value_bits=A-B-C,key_group=N,value_group=N,level=N]`` - widths per layer third
  for keys and values, then entropy coding;
* ``ecq[:key_step=F,value_step=F,profile=flat|smollm2-135m|smollm2-135m-heads,outliers=F,level=N]`` -
  entropy-coded uniform quantization: steps as fractions of each head's (keys) or token's (values) RMS,
  optionally scaled per layer by a measured sensitivity profile, attention-sink tokens exact.  The default
  lossy codec (:data:`DEFAULT_LOSSY`): the smallest measured that keeps >= 99% next-token agreement.

Every entry names the codec (and parameters) that wrote it, so :func:`decode_any`
reads entries of any codec: changing the configured codec loses nothing.

Only ``raw`` is imported with this package; every other codec's module is imported when first named, and
the libraries it needs (numba, zstd, lz4: the ``codecs`` extra) when it first runs (``codecs.extras``), so
an engine process that only describes and copies entries loads none of them.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

import torch

from kvmesh.codecs.base import Codec, CorruptEntry, EntryHeader, UnreadableEntry, read_header
from kvmesh.codecs.extras import MissingCodecDependency
from kvmesh.codecs.kvview import ViewError
from kvmesh.codecs.raw import RawCodec


def _widths(text: str) -> tuple[int, ...]:
    """``6`` or ``6-6-5``: the widths for the first, middle and last third of the layers."""
    parts = tuple(int(part) for part in text.split("-"))
    return parts * 3 if len(parts) == 1 else parts


@dataclass(frozen=True, slots=True)
class _Known:
    """A codec kvmesh can read, and where its class lives (imported on first use: most need numba)."""

    codec_id: int
    module: str
    cls: str
    parameters: dict[str, Any]  # parameter name -> how to read its value


_KNOWN: dict[str, _Known] = {
    "raw": _Known(1, "kvmesh.codecs.raw", "RawCodec", {}),
    "lossless": _Known(2, "kvmesh.codecs.lossless", "LosslessCodec", {"compressor": str, "level": int}),
    "fp8": _Known(3, "kvmesh.codecs.fp8", "Fp8Codec", {}),
    "kivi": _Known(4, "kvmesh.codecs.kivi", "KiviCodec", {"bits": int, "key_bits": int, "value_bits": int,
                                                          "key_group": int, "value_group": int}),
    "cachegen": _Known(5, "kvmesh.codecs.cachegen", "CacheGenCodec",
                       {"key_bits": _widths, "value_bits": _widths, "key_group": int, "value_group": int,
                        "level": int}),
    "ecq": _Known(6, "kvmesh.codecs.ecq", "EcqCodec", {"key_step": float, "value_step": float, "profile": str,
                                                       "outliers": float, "level": int}),
}
_BY_ID: dict[int, _Known] = {known.codec_id: known for known in _KNOWN.values()}
_BY_CLASS: dict[str, _Known] = {known.cls: known for known in _KNOWN.values()}
DEFAULT_LOSSY = "ecq"  # 3.1x at 99.2-99.4% top-1 on the demo model (docs/benchmarks.md); cachegen: 2.9x at 99.0%


def _codec_class(known: _Known) -> type:
    return getattr(importlib.import_module(known.module), known.cls)


def __getattr__(name: str) -> type:
    """The codec classes (``EcqCodec``, ...), imported when first named."""
    if name in _BY_CLASS:
        return _codec_class(_BY_CLASS[name])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def get_codec(spec: str) -> Codec:
    """Build a codec from ``name[:key=value,...]``; a bad name, key or value raises ValueError naming it."""
    name, _, arguments = spec.strip().partition(":")
    if name not in _KNOWN:
        raise ValueError(f"unknown codec {name!r}; known: {', '.join(_KNOWN)}")
    allowed = _KNOWN[name].parameters
    kwargs: dict[str, object] = {}
    for item in filter(None, (part.strip() for part in arguments.split(","))):
        key, sep, value = item.partition("=")
        if not sep or key not in allowed:
            known = ", ".join(allowed) or "none"
            raise ValueError(f"codec {name!r} has no parameter {key!r} (in {spec!r}); parameters: {known}")
        try:
            kwargs[key] = allowed[key](value)
        except ValueError:
            raise ValueError(f"codec {name!r}: bad value {value!r} for {key!r} (in {spec!r})") from None
    return _codec_class(_KNOWN[name])(**kwargs)


def decode_any(data: bytes | memoryview, expected_shape: tuple[int, ...] | None = None,
               expected_dtype: torch.dtype | None = None, out: torch.Tensor | None = None,
               expected_key: bytes | None = None) -> torch.Tensor:
    """Decode an entry with whichever codec wrote it, so changing the configured codec loses nothing.

    ``expected_key``: the key it was read under (an entry naming another key is :class:`CorruptEntry`).
    """
    header = read_header(data, expected_key)
    known = _BY_ID.get(header.codec_id)
    if known is None:  # its header checksum held: a codec of a newer kvmesh
        raise UnreadableEntry(f"entry was written by codec id {header.codec_id}, which this kvmesh does not know")
    try:
        return _codec_class(known)().decode(data, expected_shape, expected_dtype, out)
    except ViewError as err:  # a checksummed entry whose KV view cannot hold its shape: a writer's bug
        raise CorruptEntry(f"entry's KV view does not fit it: {err}") from err
    except MissingCodecDependency as err:
        raise UnreadableEntry(f"entry cannot be decoded here: {err}") from None


def codec_of(data: bytes | memoryview) -> str:
    """The name of the codec that wrote an encoded entry, from its first bytes (``HEADER_PEEK`` suffice):
    ``?`` where they do not read as a kvmesh header (encrypted, damaged, or too short a peek)."""
    try:
        header = read_header(data)
    except (CorruptEntry, UnreadableEntry):
        return "?"
    known = _BY_ID.get(header.codec_id)
    return next((name for name, k in _KNOWN.items() if k is known), f"codec id {header.codec_id}")


def entry_view(data: bytes | memoryview) -> str:
    """The KV view an entry was encoded with (a header field; entries of format 1 are read the same)."""
    return read_header(data).view


def header_view(header: EntryHeader) -> str:
    """:func:`entry_view` for a header already read."""
    return header.view


@dataclass(frozen=True, slots=True)
class Encoded:
    data: bytes
    codec: str  # the codec that wrote it (a lossy codec falls back to lossless for an opaque entry)


def encode_for_tier(codec: Codec, chunk: torch.Tensor, view: str, key: bytes) -> Encoded:
    """Encode with ``codec`` for ``key``; an entry whose K/V axes are unknown is stored bit-exact instead of lossy."""
    try:
        return Encoded(codec.encode(chunk, view, key), codec.name)
    except ViewError:
        fallback = get_codec("lossless")
        return Encoded(fallback.encode(chunk, view, key), fallback.name)


__all__ = ["CacheGenCodec", "Codec", "CorruptEntry", "DEFAULT_LOSSY", "EcqCodec", "Encoded", "Fp8Codec", "KiviCodec",
           "LosslessCodec", "MissingCodecDependency", "RawCodec", "UnreadableEntry", "decode_any", "encode_for_tier",
           "entry_view", "get_codec", "header_view"]
