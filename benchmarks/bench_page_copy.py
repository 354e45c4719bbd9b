"""Page copies between an engine's KV blocks and stored chunks: indexed copies vs slices of block runs vs memcpy.

An engine-shaped KV cache (per layer ``[blocks, kv_heads, block_size, 2 * head_size]``, vLLM-CPU's layout)
and a prompt's chunks as L1 holds them (``[layers, pages, *page]`` each).  Loading copies every chunk's
pages into the engine's blocks, saving the other way.  Three ways, in the same rounds:

- *indexed*: one ``index_copy_`` / ``index_select`` per (chunk, layer), what kvmesh did before;
- *runs*: ``kvmesh.page_copy.move_pages``: consecutive blocks as one slice copy, scattered ones indexed;
- *memcpy*: one copy of all the bytes between two warm buffers, the machine's ceiling.

The blocks are either consecutive (a fresh engine hands them out in order) or shuffled (a fragmented pool).

    python benchmarks/bench_page_copy.py --tokens 8000 --rounds 7
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from kvmesh.page_copy import PageJob, move_pages


def indexed(jobs: list[PageJob], layers: list[torch.Tensor], into_engine: bool) -> None:
    with torch.inference_mode():
        for pages, blocks in jobs:
            for index, layer in enumerate(layers):
                if into_engine:
                    layer.index_copy_(0, blocks, pages[index])
                else:
                    torch.index_select(layer, 0, blocks, out=pages[index])


def median_seconds(run: Callable[[], None], rounds: int) -> float:
    run()  # warm
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8000)
    parser.add_argument("--layers", type=int, default=30, help="the demo model: 30 layers, 3 KV heads of 64")
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--head-size", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    pages_per_chunk = args.chunk_size // args.block_size
    chunks = -(-args.tokens // args.chunk_size)
    num_blocks = chunks * pages_per_chunk * 2
    page = (args.kv_heads, args.block_size, 2 * args.head_size)
    with torch.inference_mode():
        layers = [torch.randn(num_blocks, *page).to(torch.bfloat16) for _ in range(args.layers)]
    stored = [torch.randn(args.layers, pages_per_chunk, *page).to(torch.bfloat16) for _ in range(chunks)]
    nbytes = sum(s.numel() * s.element_size() for s in stored)
    flat_a = torch.empty(nbytes, dtype=torch.uint8)
    flat_b = torch.ones(nbytes, dtype=torch.uint8)
    print(f"{chunks} chunks of {args.chunk_size} tokens, {pages_per_chunk} pages each, {args.layers} layers; "
          f"{nbytes / 1e6:.1f} MB per direction; torch threads 1")
    print("| blocks | direction | indexed GB/s | runs GB/s | memcpy GB/s | runs / memcpy | runs vs indexed |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    memcpy = median_seconds(lambda: flat_a.copy_(flat_b), args.rounds)
    for order in ("consecutive", "shuffled"):
        ids = torch.arange(chunks * pages_per_chunk) + num_blocks // 4
        if order == "shuffled":
            ids = torch.randperm(num_blocks)[:chunks * pages_per_chunk]
        jobs = [(stored[c], ids[c * pages_per_chunk:(c + 1) * pages_per_chunk].clone()) for c in range(chunks)]
        for into_engine in (True, False):
            old = median_seconds(lambda: indexed(jobs, layers, into_engine), args.rounds)
            new = median_seconds(lambda: move_pages(jobs, layers, into_engine), args.rounds)
            for pages, blocks in jobs:  # the two ways move the same bytes
                assert all(torch.equal(layer[blocks], pages[i]) for i, layer in enumerate(layers))
            gbps = [nbytes / s / 1e9 for s in (old, new, memcpy)]
            print(f"| {order} | {'load' if into_engine else 'save'} | {gbps[0]:.1f} | {gbps[1]:.1f} | "
                  f"{gbps[2]:.1f} | {new and memcpy / new:.0%} | {old / new:.2f}x |")


if __name__ == "__main__":
    main()
