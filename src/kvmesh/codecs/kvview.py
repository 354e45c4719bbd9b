"""Where the K/V, token, head and channel axes lie in an entry, so lossy codecs can group the right values.

Lossy codecs quantize keys per channel and values per token (KIVI), which
needs to know which value is which.  Each view names one memory layout:

* ``chunk``: the canonical chunk ``[layers, 2 (K,V), tokens, heads, head_size]``;
* ``cpu-pages``: page-native entries ``[layers, pages, heads, block_size, 2 * head_size]`` whose page
  memory is ``[heads, 2 (K,V), block_size, head_size]`` (how vLLM-CPU's Python code views its pages);
* ``vllm-cpu-vec``: the same entry shape as written by vLLM-CPU's ``vec`` attention kernel: per head,
  keys column-major ``[head_size, block_size]`` then values ``[block_size, head_size]``;
* ``vllm-cpu-amx``: as written by vLLM-CPU's ``amx`` kernel (bf16 on CPUs with AMX), per head keys packed
  as ``[block/16, head_size/2, 16 tokens, 2 channels]`` tiles, then values as
  ``[head_size/16, block/2, 16 channels, 2 tokens]`` (AMX's VNNI pairs; benchmarks/probe_vllm_page_layout.py
  checks both against transformers' KV);
* ``vllm-pages``: ``[layers, pages, heads, block_size, 2 * head_size]`` in logical order, each token's keys
  then its values in the last axis: how vLLM's GPU attention backends view a page (``[blocks, heads, tokens,
  head_size + head_size_v]``), copied out in that order whatever the backend's memory order;
* ``opaque``: axes unknown; only bit-exact codecs take it.

The view names and their codes are in :mod:`kvmesh.entry` (a field of every entry's description).
Codecs see K and V as 5-D ``[layers, blocks, heads, tokens, head_size]`` tensors (a chunk is one block):
strided views where the layout allows, copies for the packed AMX tiles (written back after decoding).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

from kvmesh.codecs import extras
from kvmesh.entry import VIEW_NAMES, VIEWS

PAGE_VIEWS = ("cpu-pages", "vllm-cpu-vec", "vllm-cpu-amx", "vllm-pages")
AMX_TOKENS, AMX_CHANNELS = 16, 16  # tile widths of the AMX page layout


class ViewError(ValueError):
    """The entry's shape does not fit the view it claims, or the view has no K/V axes."""


Parts = tuple[torch.Tensor, torch.Tensor]


def _page_halves(tensor: torch.Tensor, view: str) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
    """The K and V halves of every page's head, ``[layers, pages, heads, block_size * head_size]`` each."""
    shape = tuple(tensor.shape)
    if len(shape) != 5 or shape[4] % 2:
        raise ViewError(f"a {view} entry is [layers, pages, heads, block_size, 2*head_size], got {shape}")
    layers, pages, heads, block, double = shape
    halves = tensor.view(layers, pages, heads, 2, block * (double // 2))
    return halves[:, :, :, 0], halves[:, :, :, 1], (layers, pages, heads, block, double // 2)


_staging = threading.local()  # per thread: decode buffers for AMX entries, kept warm between decodes


def _amx_logical(tensor: torch.Tensor, reuse: bool = False) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
    """Logical K and V buffers ``[layers, pages, heads, block, head_size]`` for an AMX page entry, and its dims.

    ``reuse``: this thread's buffers from the previous decode of the same shape (a fresh pair costs as much as
    the tile move itself in page faults); only for buffers that do not outlive the caller's use.
    """
    if not tensor.is_contiguous():
        raise ViewError("a vllm-cpu-amx entry must be contiguous")
    _, _, dims = _page_halves(tensor, "vllm-cpu-amx")
    if dims[3] % AMX_TOKENS or dims[4] % AMX_CHANNELS:
        raise ViewError(f"a vllm-cpu-amx page needs block_size and head_size divisible by 16, got {dims}")
    if not reuse:
        return torch.empty(dims, dtype=tensor.dtype), torch.empty(dims, dtype=tensor.dtype), dims
    buffers = getattr(_staging, "buffers", None)
    if buffers is None or buffers[0].shape != dims or buffers[0].dtype != tensor.dtype:
        buffers = _staging.buffers = (torch.empty(dims, dtype=tensor.dtype), torch.empty(dims, dtype=tensor.dtype))
    return buffers[0], buffers[1], dims


_SAME_SIZE_INT = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(tensor: torch.Tensor) -> np.ndarray:
    """A tensor's values as integers of the same size (tile moves copy bits, whatever the float type)."""
    return tensor.view(_SAME_SIZE_INT[tensor.element_size()]).numpy()


def kv_parts(tensor: torch.Tensor, view: str) -> Parts:
    """K and V of ``tensor`` as ``[layers, blocks, heads, tokens, head_size]`` (views, or copies for AMX tiles)."""
    if view == "chunk":
        shape = tuple(tensor.shape)
        if len(shape) != 5 or shape[1] != 2:
            raise ViewError(f"a chunk entry is [layers, 2, tokens, heads, head_size], got {shape}")
        layers, _, tokens, heads, head_size = shape
        blocks = tensor.view(layers, 2, 1, tokens, heads, head_size).permute(0, 1, 2, 4, 3, 5)
        return blocks[:, 0], blocks[:, 1]
    if view == "cpu-pages":
        keys, values, dims = _page_halves(tensor, view)
        return keys.view(dims), values.view(dims)
    if view == "vllm-cpu-vec":
        keys, values, dims = _page_halves(tensor, view)
        layers, pages, heads, block, head_size = dims
        return keys.view(layers, pages, heads, head_size, block).transpose(-1, -2), values.view(dims)
    if view == "vllm-pages":
        shape = tuple(tensor.shape)
        if len(shape) != 5 or shape[4] % 2:
            raise ViewError(f"a vllm-pages entry is [layers, pages, heads, block_size, 2*head_size], got {shape}")
        head_size = shape[4] // 2
        return tensor[..., :head_size], tensor[..., head_size:]
    if view == "vllm-cpu-amx":
        keys, values, dims = _amx_logical(tensor)
        extras.kernels().amx_tiles(_bits(keys), _bits(values), _bits(tensor.view(*dims[:3], -1)), False)
        return keys, values
    if view == "opaque":
        raise ViewError("this entry's K/V axes are unknown (view 'opaque'); only lossless codecs take it")
    raise ViewError(f"unknown KV view {view!r}; known: {', '.join(VIEWS)}")


@contextmanager
def kv_targets(out: torch.Tensor, view: str) -> Iterator[Parts]:
    """K and V of ``out`` to decode into, as :func:`kv_parts` shapes them; packed tiles are filled on exit."""
    if view != "vllm-cpu-amx":
        yield kv_parts(out, view)
        return
    keys, values, dims = _amx_logical(out, reuse=True)
    yield keys, values
    extras.kernels().amx_tiles(_bits(keys), _bits(values), _bits(out.view(*dims[:3], -1)), True)


def block_view(tensor: torch.Tensor, view: str) -> torch.Tensor:
    """The entry as ``[layers, 2 (K,V), blocks, heads, tokens, head_size]`` in logical order (tests, probes)."""
    return torch.stack(kv_parts(tensor, view), dim=1)


def view_code(view: str) -> int:
    if view not in VIEWS:
        raise ViewError(f"unknown KV view {view!r}; known: {', '.join(VIEWS)}")
    return VIEWS[view]


def view_name(code: int) -> str:
    if code not in VIEW_NAMES:
        raise ViewError(f"unknown KV view code {code}")
    return VIEW_NAMES[code]
