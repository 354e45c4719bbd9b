"""Lookups per second on one daemon: what explaining a miss costs on the lookup path, measured side by side.

Runs against the kvmesh source tree on ``PYTHONPATH`` (its client and the daemon it starts), so two trees are
compared by running this twice, alternating, on the same machine:

    git worktree add /tmp/before <commit before the change>
    for i in 1 2 3; do
      PYTHONPATH=/tmp/before/src python benchmarks/bench_lookup_rate.py
      PYTHONPATH=src python benchmarks/bench_lookup_rate.py
    done

Each run starts a private daemon, stores 64 chunks of a 256-token-chunk prompt, evicts half of them by filling
L1, then times ``--lookups`` lookups of four kinds round robin: a full hit, a hit ending at an evicted chunk,
a prompt never stored, and an 8-chunk prompt whose first chunk was evicted.  It prints lookups per second.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import uuid

import torch

from kvmesh.client import KVMeshClient
from kvmesh.client.stop import stop_daemon
from kvmesh.config import KVMeshConfig
from kvmesh.keys import chunk_keys, model_namespace


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lookups", type=int, default=20000)
    args = parser.parse_args()
    ns = model_namespace("bench-lookup", "L2.H1.D8.bfloat16")
    with tempfile.TemporaryDirectory() as tmp:
        config = KVMeshConfig.from_mapping({"socket_dir": tmp, "instance": f"lr-{uuid.uuid4().hex[:6]}",
                                            "l1_size": "8MiB", "l1_prefault": False, "http_port": 0,
                                            "l1_eviction": "lru"})
        kept = chunk_keys(list(range(0, 64 * 256)), ns, 256)
        evicted = chunk_keys(list(range(100000, 100000 + 8 * 256)), ns, 256)
        unseen = chunk_keys(list(range(500000, 500000 + 8 * 256)), ns, 256)
        chunk = torch.zeros(2, 2, 256, 1, 8, dtype=torch.bfloat16)
        with KVMeshClient(config) as client:
            try:
                client.put(evicted, [chunk] * len(evicted))
                filler = chunk_keys(list(range(200000, 200000 + 40 * 256)), model_namespace("filler", "x"), 256)
                for key in filler:  # one at a time, each evicting the least recently used
                    client.put([key], [torch.zeros(2, 2, 256, 4, 64, dtype=torch.bfloat16)])
                client.put(kept, [chunk] * len(kept))
                kinds = [kept, kept[:4] + evicted[4:8], unseen, evicted]
                for keys in kinds:
                    client.lookup_with_partials(keys)
                started = time.perf_counter()
                for index in range(args.lookups):
                    client.lookup_with_partials(kinds[index % len(kinds)])
                seconds = time.perf_counter() - started
            finally:
                client.shutdown_daemon()
        stop_daemon(config, settle=2.0)
    print(f"{args.lookups / seconds:,.0f} lookups/s ({args.lookups} lookups in {seconds:.2f} s)")


if __name__ == "__main__":
    main()
