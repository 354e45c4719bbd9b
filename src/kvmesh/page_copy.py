"""Copies between an engine's paged KV and kvmesh's L1 entries, which hold the engine's own pages.

vLLM hands kvmesh one tensor per layer whose first dimension is the block (page) index.  An L1 entry
keeps a chunk as those pages, ``[layers, pages, *page_shape]``, so the bytes are exactly the engine's.

Loads: ``index_copy_`` into the engine's blocks ran at about half of memcpy speed.  A chunk's blocks are
mostly consecutive (vLLM hands out free blocks in order), and a run of consecutive blocks is one contiguous
range of both tensors, so a load copies each run as one slice, near memcpy speed.  That pays while a run
holds at least ``MIN_RUN_BYTES`` per layer (a slice costs a Python call: pages of a few KB scattered one by
one go faster through one ``index_copy_`` per layer).  Saves: ``index_select`` already copies at memcpy
speed, slices did not beat it.  Measured: benchmarks/bench_page_copy.py, docs/benchmarks.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass

import torch

# a load copies a job as slices when its runs hold on average at least this many bytes per layer
MIN_RUN_BYTES = 64 * 1024


def pages_for_tokens(start: int, end: int, block_size: int) -> range:
    """Indices (within a request's block table) of the blocks holding tokens ``start .. end-1``."""
    return range(start // block_size, -(-end // block_size))


PageJob = tuple[torch.Tensor, torch.Tensor]  # (stored pages [layers, n, *page], engine block ids [n])


@dataclass(frozen=True, slots=True)
class BlockRun:
    """``length`` consecutive engine blocks from ``first_block``, held at ``offset`` in the stored pages."""

    offset: int
    first_block: int
    length: int


def block_runs(blocks: Sequence[int]) -> list[BlockRun]:
    """The maximal runs of consecutive block ids, in order."""
    runs: list[BlockRun] = []
    start = 0
    for index in range(1, len(blocks) + 1):
        if index == len(blocks) or blocks[index] != blocks[index - 1] + 1:
            runs.append(BlockRun(start, int(blocks[start]), index - start))
            start = index
    return runs


def _copy_plan(jobs: Sequence[PageJob], into_engine: bool) -> list[tuple[torch.Tensor, torch.Tensor,
                                                                        list[BlockRun] | None]]:
    """Each job with its runs when a load should copy them as slices, else None (one indexed copy per layer)."""
    plan = []
    for pages, blocks in jobs:
        runs = None
        if into_engine and len(blocks):
            page_bytes = pages[0, 0].numel() * pages.element_size()
            found = block_runs(blocks.tolist())
            if len(blocks) * page_bytes >= MIN_RUN_BYTES * len(found):
                runs = found
        plan.append((pages, blocks, runs))
    return plan


def move_pages(jobs: Sequence[PageJob], layers: Sequence[torch.Tensor], into_engine: bool,
               pool: Executor | None = None, workers: int = 1) -> None:
    """Run many page copies, the layers split over ``workers`` threads of ``pool``.

    Each thread takes every job for its own layers, so two threads never touch
    one tensor; torch releases the GIL while it copies, and the engine's cores
    sit idle during a load anyway.
    """
    plan = _copy_plan(jobs, into_engine)

    def run(layer_indices: range) -> None:
        # inference mode is per thread: engines keep KV in inference tensors, which only it may update
        with torch.inference_mode():
            for pages, blocks, runs in plan:
                for index in layer_indices:
                    layer, stored = layers[index], pages[index]
                    if runs is not None:  # a load, as slices
                        for r in runs:
                            layer[r.first_block:r.first_block + r.length].copy_(stored[r.offset:r.offset + r.length])
                    elif into_engine:
                        layer.index_copy_(0, blocks, stored)
                    else:
                        torch.index_select(layer, 0, blocks, out=stored)

    if pool is None or workers <= 1 or not jobs:
        run(range(len(layers)))
        return
    step = -(-len(layers) // workers)
    futures = [pool.submit(run, range(start, min(start + step, len(layers))))
               for start in range(0, len(layers), step)]
    for future in futures:
        future.result()
