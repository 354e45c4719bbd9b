"""Control-message round trips between an engine and its daemon: the cost kvmesh adds per request besides copies.

Usage: .venv/bin/python benchmarks/bench_control.py [--chunks 32] [--rounds 300]
       .venv/bin/python benchmarks/bench_control.py --imports 15   # also: the engine side's import time

Times, against a real daemon of its own, an ``acquire`` + ``release`` and a ``reserve`` + ``commit`` of
``--chunks`` tiny chunks (the bytes are not copied: what is measured is the messages), median of
``--rounds``.  With ``--imports N`` it also times ``N`` whole processes that import the engine-side modules
(the connector's scheduler and worker sides and the client), median.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

from kvmesh.client import KVMeshClient
from kvmesh.config import KVMeshConfig
from kvmesh.entry import EntryMeta
from kvmesh.keys import chunk_keys
from kvmesh.layout import KVLayout

ENGINE_SIDE = "import kvmesh.client, kvmesh.integrations.vllm.scheduler, kvmesh.integrations.vllm.worker"


def round_trips(chunks: int, rounds: int) -> tuple[float, float]:
    """Median seconds of acquire+release and of reserve+commit for ``chunks`` chunks."""
    namespace = KVLayout(30, 3, 64, "bfloat16", page_view="chunk").namespace("bench-control")
    config = KVMeshConfig.from_mapping({"instance": f"bench-control-{time.time_ns()}", "l1_size": "256MiB",
                                        "socket_dir": tempfile.mkdtemp(), "http_port": 0, "l1_prefault": False})
    meta = EntryMeta("bfloat16", (2, 2, 16, 1, 16))
    acquire_times, reserve_times = [], []
    with KVMeshClient(config) as client:
        try:
            stored = chunk_keys(np.arange(chunks * 256), namespace, 256)
            client.commit(client.reserve(stored, [meta] * chunks))
            for round_index in range(rounds):
                started = time.perf_counter()
                with client.acquire(stored) as slots:
                    assert len(slots) == chunks
                acquire_times.append(time.perf_counter() - started)
                fresh = chunk_keys(np.arange(chunks * 256) + (round_index + 1) * 10**6, namespace, 256)
                started = time.perf_counter()
                client.commit(client.reserve(fresh, [meta] * chunks))
                reserve_times.append(time.perf_counter() - started)
                client.delete(fresh)
        finally:
            client.shutdown_daemon()
    return statistics.median(acquire_times), statistics.median(reserve_times)


def import_seconds(runs: int) -> float:
    """Median wall time of a process that imports the engine-side modules."""
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", ENGINE_SIDE], check=True)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--chunks", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--imports", type=int, default=0, help="also time this many engine-side imports")
    args = parser.parse_args()
    acquire, reserve = round_trips(args.chunks, args.rounds)
    print(f"{args.chunks} chunks: acquire+release {acquire * 1e6:.0f} us, reserve+commit {reserve * 1e6:.0f} us "
          f"(median of {args.rounds})")
    if args.imports:
        print(f"engine-side import: {import_seconds(args.imports):.2f} s (median of {args.imports} processes)")


if __name__ == "__main__":
    main()
