"""L1 put/get throughput through the node daemon vs a plain memcpy of the same bytes, in one run.

Usage: .venv/bin/python benchmarks/bench_l1.py [--rounds 7] [--threads 1]

A put reserves extents for a request's chunks, copies each chunk tensor into
shared memory and commits them; a get pins the chunks, copies them into
preallocated (warm) destination tensors and releases them: both one copy plus
two socket round trips per batch, which is what an engine pays.  The reference
is numpy's memcpy of the same bytes between warm buffers on one thread.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch

from kvmesh.client import KVMeshClient
from kvmesh.config import KVMeshConfig
from kvmesh.entry import EntryMeta
from kvmesh.keys import chunk_keys
from kvmesh.layout import KVLayout
from kvmesh.tensorbytes import copy_tensor

LAYOUTS = {
    "SmolLM2-135M (30x3x64 bf16, 23,040 B/token)": (KVLayout(30, 3, 64, "bfloat16", page_view="chunk"), 32),
    "Llama-3.1-8B (32x8x128 bf16, 131,072 B/token)": (KVLayout(32, 8, 128, "bfloat16", page_view="chunk"), 12),
}
CHUNK = 256


def big_memcpy_gbps(nbytes: int, rounds: int) -> float:
    """One numpy memcpy of all the bytes between two warm anonymous buffers: the machine's ceiling."""
    source = np.random.default_rng(0).integers(0, 255, nbytes, dtype=np.uint8)
    target = np.empty_like(source)
    np.copyto(target, source)
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        np.copyto(target, source)
        times.append(time.perf_counter() - started)
    return nbytes / statistics.median(times) / 1e9


@dataclass
class Row:
    memcpy: float  # the same chunks copied between process-private tensors
    put: float
    get: float


def measure(client: KVMeshClient, layout: KVLayout, count: int, rounds: int, tag: int) -> Row:
    """Reference, put and get interleaved round by round, so machine noise hits all three alike."""
    shape = layout.chunk_shape(CHUNK)
    chunks = [torch.randn(shape).to(torch.bfloat16) for _ in range(count)]
    targets = [torch.zeros_like(c) for c in chunks]
    meta = EntryMeta(layout.dtype, shape)
    nbytes = meta.nbytes * count
    ref_times, put_times, get_times = [], [], []
    for round_index in range(rounds):
        started = time.perf_counter()
        for chunk, target in zip(chunks, targets):
            copy_tensor(target, chunk)
        ref_times.append(time.perf_counter() - started)
        tokens = np.arange(count * CHUNK) + (tag * 1_000_000 + round_index * 100_000)
        keys = chunk_keys(tokens, layout.namespace("bench"), CHUNK)
        started = time.perf_counter()
        slots = client.reserve(keys, [meta] * count)
        for slot, chunk in zip(slots, chunks):
            copy_tensor(slot.tensor, chunk)
        client.commit(slots)
        put_times.append(time.perf_counter() - started)
        for target in targets:
            target.zero_()
        started = time.perf_counter()
        with client.acquire(keys) as read_slots:
            for slot, target in zip(read_slots, targets):
                copy_tensor(target, slot.tensor)
        get_times.append(time.perf_counter() - started)
        assert len(read_slots) == count and all(torch.equal(t, c) for t, c in zip(targets, chunks))
        client.delete(keys)
    return Row(*(nbytes / statistics.median(times) / 1e9 for times in (ref_times, put_times, get_times)))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the copies")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = KVMeshConfig.from_mapping({"instance": "bench-l1", "socket_dir": tempfile.mkdtemp(),
                                        "l1_size": "1GiB", "l1_prefault": True})
    print("| layout | chunk | batch | memcpy, one buffer GB/s | memcpy, same chunks GB/s | L1 put GB/s "
          "| L1 get GB/s | put / memcpy | get / memcpy |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    with KVMeshClient(config) as client:
        try:
            for tag, (name, (layout, count)) in enumerate(LAYOUTS.items()):
                chunk_mb = layout.chunk_bytes(CHUNK) / 1e6
                ceiling = big_memcpy_gbps(layout.chunk_bytes(CHUNK) * count, args.rounds)
                row = measure(client, layout, count, args.rounds, tag)
                print(f"| {name} | {CHUNK} tok = {chunk_mb:.1f} MB | {count} chunks | {ceiling:.1f} | "
                      f"{row.memcpy:.1f} | {row.put:.1f} | {row.get:.1f} | {row.put / row.memcpy:.0%} | "
                      f"{row.get / row.memcpy:.0%} |")
        finally:
            client.shutdown_daemon()


if __name__ == "__main__":
    main()
