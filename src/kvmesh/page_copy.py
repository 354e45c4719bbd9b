"""Copies between an engine's paged KV and kvmesh's L1 entries, which hold the engine's own pages.

vLLM hands kvmesh one tensor per layer whose first dimension is the block (page) index.  An L1 entry
keeps a chunk as those pages, ``[layers, pages, *page_shape]``: saving and loading are then one
index_select / index_copy per layer, and the bytes are exactly the engine's.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Executor

import torch


def pages_for_tokens(start: int, end: int, block_size: int) -> range:
    """Indices (within a request's block table) of the blocks holding tokens ``start .. end-1``."""
    return range(start // block_size, -(-end // block_size))


PageJob = tuple[torch.Tensor, torch.Tensor]  # (stored pages [layers, n, *page], engine block ids [n])


def move_pages(jobs: Sequence[PageJob], layers: Sequence[torch.Tensor], into_engine: bool,
               pool: Executor | None = None, workers: int = 1) -> None:
    """Run many page copies, the layers split over ``workers`` threads of ``pool``.

    Each thread takes every job for its own layers, so two threads never touch
    one tensor; torch releases the GIL while it copies, and the engine's cores
    sit idle during a load anyway.
    """
    def run(layer_indices: range) -> None:
        # inference mode is per thread: engines keep KV in inference tensors, which only it may update
        with torch.inference_mode():
            for pages, blocks in jobs:
                for index in layer_indices:
                    if into_engine:
                        layers[index].index_copy_(0, blocks, pages[index])
                    else:
                        torch.index_select(layers[index], 0, blocks, out=pages[index])

    if pool is None or workers <= 1 or not jobs:
        run(range(len(layers)))
        return
    step = -(-len(layers) // workers)
    futures = [pool.submit(run, range(start, min(start + step, len(layers))))
               for start in range(0, len(layers), step)]
    for future in futures:
        future.result()
