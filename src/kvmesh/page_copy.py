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


# ----------------------------------------------------------------------------- engines on an accelerator
# A device engine's pages are copied by DMA between its KV tensors and L1's shared memory, which the worker
# registers as pinned (page-locked) memory: no copy through another host buffer.  Each run of consecutive
# blocks is one copy of ``length`` pages per layer; where runs are short (scattered blocks of small pages),
# the pages are gathered on the device into one contiguous staging tensor and moved in one copy, since every
# copy costs a few microseconds of CPU.  The same code runs on CPU tensors (the tests), where every copy is
# a plain memcpy; only the copy primitive's device differs.

DEVICE_MIN_RUN_BYTES = 256 * 1024  # a run moves as its own copy when it holds at least this many bytes


@dataclass(frozen=True, slots=True)
class DeviceCopyPlan:
    """How one job's pages move for one layer: as runs of consecutive blocks, or gathered through staging."""

    runs: list[BlockRun] | None  # None: gather/scatter on the device through one staging tensor
    copies: int  # copies issued per layer (runs, or one)


def plan_device_copy(blocks: Sequence[int], page_bytes: int) -> DeviceCopyPlan:
    """Runs where each carries enough bytes to pay for its own copy, else one gathered copy."""
    runs = block_runs(blocks)
    if not runs:
        return DeviceCopyPlan([], 0)
    if len(blocks) * page_bytes >= DEVICE_MIN_RUN_BYTES * len(runs):
        return DeviceCopyPlan(runs, len(runs))
    return DeviceCopyPlan(None, 1)


def move_pages_device(jobs: Sequence[PageJob], layers: Sequence[torch.Tensor], into_engine: bool) -> int:
    """Copy every job's pages between ``layers`` (the engine's, on any device) and the stored pages (host).

    Copies are issued ``non_blocking`` on the caller's current stream; the caller waits for them (an event)
    before it hands the host memory back (commit, lease release).  Returns the number of copies issued.
    """
    issued = 0
    with torch.inference_mode():
        for pages, blocks in jobs:
            if not len(blocks):
                continue
            device = layers[0].device
            plan = plan_device_copy(blocks.tolist(), pages[0, 0].numel() * pages.element_size())
            index = None if plan.runs is not None else blocks.to(device, non_blocking=True)
            for layer, stored in zip(layers, pages):
                if plan.runs is not None:
                    for r in plan.runs:
                        engine_run = layer[r.first_block:r.first_block + r.length]
                        stored_run = stored[r.offset:r.offset + r.length]
                        if into_engine:
                            engine_run.copy_(stored_run, non_blocking=True)
                        else:
                            stored_run.copy_(engine_run, non_blocking=True)
                elif into_engine:
                    assert index is not None
                    layer.index_copy_(0, index, stored.to(device, non_blocking=True))
                else:
                    assert index is not None
                    stored.copy_(layer.index_select(0, index), non_blocking=True)
                issued += plan.copies
    return issued
