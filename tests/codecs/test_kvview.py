"""KV views: each page layout read back into logical K/V, checked against the kernels' own index formulas."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from kvmesh.codecs import CorruptEntry, decode_any, get_codec
from kvmesh.codecs.base import pack_entry, read_header
from kvmesh.codecs.kvview import PAGE_VIEWS, ViewError, block_view, kv_parts, kv_targets

LAYERS, PAGES, HEADS, BLOCK, HEAD = 2, 3, 2, 32, 32


def _logical(seed: int) -> torch.Tensor:
    """Distinct values for every (layer, page, head, token, channel): ``[L, 2, P, H, T, D]``."""
    return torch.randn(LAYERS, 2, PAGES, HEADS, BLOCK, HEAD, generator=torch.Generator().manual_seed(seed))


def _offsets(view: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Where token t, channel c of K and of V lie in a head's page (element offsets), per the attention kernel."""
    t = torch.arange(BLOCK).view(-1, 1).expand(BLOCK, HEAD)
    c = torch.arange(HEAD).view(1, -1).expand(BLOCK, HEAD)
    half = BLOCK * HEAD
    if view == "cpu-pages":
        return t * HEAD + c, half + t * HEAD + c
    if view == "vllm-cpu-vec":  # keys column-major, values row-major
        return c * BLOCK + t, half + t * HEAD + c
    if view == "vllm-pages":  # vLLM's GPU view of a page: per token its key's channels, then its value's
        return t * 2 * HEAD + c, t * 2 * HEAD + HEAD + c
    # AMX: keys as channel pairs in 16-token groups, values as token pairs in 16-channel groups
    key = (t // 16) * 16 * HEAD + (c // 2) * 32 + (t % 16) * 2 + c % 2
    value = half + (c // 16) * BLOCK * 16 + (t // 2) * 32 + (c % 16) * 2 + t % 2
    return key, value


def _pages_written_like_the_kernel(logical: torch.Tensor, view: str) -> torch.Tensor:
    pages = torch.full((LAYERS, PAGES, HEADS, 2 * BLOCK * HEAD), float("nan"))
    for kv, offsets in enumerate(_offsets(view)):
        pages[..., offsets.flatten()] = logical[:, kv].reshape(LAYERS, PAGES, HEADS, -1)
    return pages.view(LAYERS, PAGES, HEADS, BLOCK, 2 * HEAD)


@pytest.mark.parametrize("view", PAGE_VIEWS)
def test_kv_parts_read_tokens_and_channels_where_the_kernel_wrote_them(view: str) -> None:
    logical = _logical(3)
    pages = _pages_written_like_the_kernel(logical, view)
    assert not pages.isnan().any()  # the offsets cover each page exactly once
    keys, values = kv_parts(pages, view)
    assert torch.equal(keys, logical[:, 0]) and torch.equal(values, logical[:, 1])
    assert torch.equal(block_view(pages, view), logical)


@pytest.mark.parametrize("view", PAGE_VIEWS)
def test_kv_targets_write_back_into_the_page_layout(view: str) -> None:
    logical = _logical(4)
    out = torch.zeros(LAYERS, PAGES, HEADS, BLOCK, 2 * HEAD)
    with kv_targets(out, view) as (keys, values):
        keys.copy_(logical[:, 0])
        values.copy_(logical[:, 1])
    assert torch.equal(out, _pages_written_like_the_kernel(logical, view))


@pytest.mark.parametrize("view", PAGE_VIEWS)
def test_a_lossy_codec_keeps_amx_and_vec_pages_in_their_layout(view: str) -> None:
    logical = _logical(5)
    pages = _pages_written_like_the_kernel(logical, view).to(torch.bfloat16)
    back = decode_any(get_codec("kivi:bits=8").encode(pages, view))
    # decoded pages are close to the originals element by element, in the page's own layout
    assert float((back.float() - pages.float()).abs().max()) < 0.05


def test_amx_pages_need_16_wide_tiles() -> None:
    with pytest.raises(ViewError, match="divisible by 16"):
        kv_parts(torch.zeros(1, 1, 1, 24, 32), "vllm-cpu-amx")


def test_an_entry_whose_view_cannot_hold_its_shape_is_corrupt() -> None:
    """Checksummed but inconsistent (a writer's bug): an AMX view on pages of 24 tokens is refused as corrupt."""
    data = get_codec("kivi:bits=8").encode(torch.zeros(1, 1, 1, 24, 32, dtype=torch.bfloat16), "cpu-pages")
    header = read_header(data)
    amx = replace(header.meta, view="vllm-cpu-amx")  # the same entry, claiming the vllm-cpu-amx view
    forged = pack_entry(header.codec_id, amx, bytes(data[header.size:]), header.params)
    with pytest.raises(CorruptEntry, match="divisible by 16"):
        decode_any(forged)
