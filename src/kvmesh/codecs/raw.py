"""The raw codec: the tensor's own bytes behind the checked header. Bit-exact."""

from __future__ import annotations

import math

import numpy as np
import torch

from kvmesh.codecs.base import CorruptEntry, checked_payload, output_for, pack_header, read_header
from kvmesh.entry import EntryMeta
from kvmesh.tensorbytes import tensor_bytes


class RawCodec:
    name = "raw"
    codec_id = 1
    lossless = True

    def encode(self, chunk: torch.Tensor, view: str = "chunk", key: bytes = b"") -> bytes:
        return b"".join(self.encode_parts(chunk, view, key))

    def encode_parts(self, chunk: torch.Tensor, view: str = "chunk", key: bytes = b"") -> tuple[bytes, memoryview]:
        """The entry as (header, payload) without copying the payload: a view of ``chunk``'s own bytes.

        What :meth:`encode` returns is the two joined; a tier that writes both parts (one ``writev``)
        stores the same bytes with no copy of a 6 MB chunk, and the view stays valid while ``chunk`` does.
        """
        payload = tensor_bytes(chunk.cpu())
        return pack_header(self.codec_id, EntryMeta.of(chunk, view), payload, key=key), payload

    def decode(self, data: bytes | memoryview, expected_shape: tuple[int, ...] | None = None,
               expected_dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        header = read_header(data)
        payload = checked_payload(data, header, self.codec_id, expected_shape, expected_dtype)
        element = torch.empty((), dtype=header.dtype).element_size()
        if len(payload) != math.prod(header.shape) * element:
            raise CorruptEntry(f"payload of {len(payload)} bytes does not hold {header.shape} {header.dtype}")
        out = output_for(header, out)
        out.view(-1).view(torch.uint8).numpy()[:] = np.frombuffer(payload, dtype=np.uint8)  # one memcpy
        return out
