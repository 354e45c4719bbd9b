"""Where the K/V, token, head and channel axes lie in an entry, so lossy codecs can group the right values.

Lossy codecs quantize keys per channel and values per token (KIVI), which
needs to know which axis is which.  kvmesh stores two kinds of entries:

* ``chunk``: the canonical chunk ``[layers, 2 (K,V), tokens, heads, head_size]``;
* ``cpu-pages``: page-native entries ``[layers, pages, heads, block_size, 2 * head_size]`` whose page
  memory is ``[heads, 2 (K,V), block_size, head_size]`` (how vLLM-CPU's Python code views its pages).
  The vLLM connector does not claim it: the CPU attention kernels may order tokens and channels inside
  a page their own way, and lossy decoding of pages read this way changed every answer in our
  end-to-end check, so vLLM pages are ``opaque``.

Both are seen by the codecs as one 6-D *block view* ``[layers, 2, blocks, heads, tokens, head_size]``
(a chunk is one block) without copying; the head_size axis stays innermost and contiguous.
Any other entry is ``opaque``: only bit-exact codecs take it.
"""

from __future__ import annotations

import torch

VIEWS: dict[str, int] = {"chunk": 0, "cpu-pages": 1, "opaque": 255}
VIEW_NAMES = {code: name for name, code in VIEWS.items()}


class ViewError(ValueError):
    """The entry's shape does not fit the view it claims, or the view has no K/V axes."""


def block_view(tensor: torch.Tensor, view: str) -> torch.Tensor:
    """The 6-D ``[layers, 2, blocks, heads, tokens, head_size]`` view of ``tensor`` (no copy)."""
    shape = tuple(tensor.shape)
    if view == "chunk":
        if len(shape) != 5 or shape[1] != 2:
            raise ViewError(f"a chunk entry is [layers, 2, tokens, heads, head_size], got {shape}")
        layers, _, tokens, heads, head_size = shape
        return tensor.view(layers, 2, 1, tokens, heads, head_size).permute(0, 1, 2, 4, 3, 5)
    if view == "cpu-pages":
        if len(shape) != 5 or shape[4] % 2:
            raise ViewError(f"a cpu-pages entry is [layers, pages, heads, block_size, 2*head_size], got {shape}")
        layers, pages, heads, block, double = shape
        return tensor.view(layers, pages, heads, 2, block, double // 2).permute(0, 3, 1, 2, 4, 5)
    if view == "opaque":
        raise ViewError("this entry's K/V axes are unknown (view 'opaque'); only lossless codecs take it")
    raise ViewError(f"unknown KV view {view!r}; known: {', '.join(VIEWS)}")


def view_code(view: str) -> int:
    if view not in VIEWS:
        raise ViewError(f"unknown KV view {view!r}; known: {', '.join(VIEWS)}")
    return VIEWS[view]


def view_name(code: int) -> str:
    if code not in VIEW_NAMES:
        raise ViewError(f"unknown KV view code {code}")
    return VIEW_NAMES[code]
