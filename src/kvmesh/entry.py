"""What one stored entry is: its dtype, its shape and its KV view, in one frozen description.

L1 keeps it beside each extent, the engine and the daemon exchange it, and every encoded entry's header
carries it, so all of them read an entry the same way.  The *KV view* names where the K/V, token, head and
channel axes lie in the entry (``codecs.kvview`` reads them); ``chunk`` is the canonical
``[layers, 2, tokens, heads, head_size]`` tensor, the ``*-pages`` views an engine's own pages.

Only torch is imported here: engine processes describe entries without loading any codec.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
    "int8": torch.int8,  # bytes of recurrent state (vLLM hands a Mamba layer's state blocks over as bytes)
}
ELEMENT_BYTES: dict[str, int] = {name: torch.empty((), dtype=dtype).element_size() for name, dtype in DTYPES.items()}

# KV view name -> the code stored in an entry's header (codes are part of the entry format: never reuse one)
VIEWS: dict[str, int] = {"chunk": 0, "cpu-pages": 1, "vllm-cpu-vec": 2, "vllm-cpu-amx": 3, "vllm-pages": 4,
                         "opaque": 255}
VIEW_NAMES: dict[int, str] = {code: name for name, code in VIEWS.items()}


class EntryMetaError(ValueError):
    """A description names a dtype or KV view kvmesh does not know, or is not a description at all."""


def dtype_name(dtype: torch.dtype) -> str:
    """The name kvmesh stores for a torch dtype ('bfloat16', ...)."""
    for name, candidate in DTYPES.items():
        if candidate == dtype:
            return name
    raise EntryMetaError(f"unsupported dtype {dtype}; supported: {', '.join(DTYPES)}")


@dataclass(frozen=True, slots=True)
class EntryMeta:
    """dtype (a :data:`DTYPES` name), shape and KV view of one entry."""

    dtype: str
    shape: tuple[int, ...]
    view: str = "chunk"

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise EntryMetaError(f"unsupported dtype {self.dtype!r}; supported: {', '.join(DTYPES)}")
        if self.view not in VIEWS:
            raise EntryMetaError(f"unknown KV view {self.view!r}; known: {', '.join(VIEWS)}")
        if not isinstance(self.shape, tuple) or not all(isinstance(d, int) and d >= 0 for d in self.shape):
            raise EntryMetaError(f"an entry's shape is a tuple of sizes, got {self.shape!r}")

    @classmethod
    def of(cls, tensor: torch.Tensor, view: str = "chunk") -> EntryMeta:
        """The description of ``tensor`` stored in ``view``."""
        return cls(dtype_name(tensor.dtype), tuple(tensor.shape), view)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * ELEMENT_BYTES[self.dtype]

    def tensor_in(self, buffer: memoryview, offset: int) -> torch.Tensor:
        """This entry viewed in place in ``buffer`` at ``offset`` (an L1 extent: no copy)."""
        raw = torch.frombuffer(buffer, dtype=torch.uint8, count=self.nbytes, offset=offset)
        return raw.view(self.torch_dtype).view(self.shape)

    def encode(self) -> str:
        """``dtype:d0,d1,...[:view]`` (the view left out when it is ``chunk``, as entries before views were)."""
        text = f"{self.dtype}:{','.join(map(str, self.shape))}"
        return text if self.view == "chunk" else f"{text}:{self.view}"

    @classmethod
    def decode(cls, text: str) -> EntryMeta:
        """Read :meth:`encode`'s form; anything else raises :class:`EntryMetaError` quoting it.

        Every chunk of a request carries the same few descriptions, so parsed ones are remembered.
        """
        return _decode(text)


@functools.lru_cache(maxsize=1024)
def _decode(text: str) -> EntryMeta:
    dtype, _, rest = text.partition(":")
    shape, _, view = rest.partition(":")
    try:
        dims = tuple(int(part) for part in shape.split(","))
    except ValueError:
        raise EntryMetaError(f"not an entry description: {text!r}") from None
    if dtype not in DTYPES or (view and view not in VIEWS):
        raise EntryMetaError(f"not an entry description: {text!r}")
    return EntryMeta(dtype, dims, view or "chunk")
