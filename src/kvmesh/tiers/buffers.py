"""Entry values as buffers: parts as byte views, and one joined buffer for tiers that need one."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from kvmesh.tiers.base import Buffer, Value


def parts_of(data: Value) -> list[memoryview]:
    """A value's parts as flat byte views (no copy)."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        return [memoryview(data).cast("B")]
    return [memoryview(part).cast("B") for part in data]


def joined(parts: Sequence[Buffer]) -> Buffer:
    """The parts as one buffer; the copy runs with the GIL released (numpy), unlike ``bytes.join``."""
    if len(parts) == 1:
        return parts[0]
    views = [memoryview(part).cast("B") for part in parts]
    out = np.empty(sum(view.nbytes for view in views), dtype=np.uint8)
    at = 0
    for view in views:
        np.copyto(out[at:at + view.nbytes], np.frombuffer(view, dtype=np.uint8))
        at += view.nbytes
    return out.data


def value_bytes(data: Value) -> int:
    return sum(part.nbytes for part in parts_of(data))
