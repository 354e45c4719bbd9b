"""What explaining a miss costs on the lookup path: with and without, side by side, in alternating bursts.

    python benchmarks/bench_lookup_rate.py --tree src --without-explaining   # one tree, explaining off vs on
    git worktree add /tmp/before <commit before a change>
    python benchmarks/bench_lookup_rate.py --tree /tmp/before/src --tree src  # two trees

``--without-explaining``: the first worker runs the scheduler side with its explanation taken out (no reason,
no tokens per tier, no summary recorded with the daemon: ``finished`` makes no round trip); the second as it
ships.  The daemon's own part (the eviction record's check, the tiers named in a lookup's reply) runs in both.

For each tree a worker process (that tree on its ``PYTHONPATH``, pinned to the same core as the other) starts
its own private daemon with L1 and a disk tier, stores four kinds of prompt and then, told by this process,
runs bursts of one of three loops, each round robin over a full L1 hit, a hit that goes on on disk, a prompt
never stored, and a prompt held on disk only:

* ``lookup``: the daemon's lookup as an engine's scheduler asks it (``lookup_with_partials``);
* ``scheduler``: the engine's lookup path itself (``SchedulerSide.num_new_matched_tokens``: keys, the daemon's
  lookup, the plan, the explanation's reason and tokens per tier);
* ``request``: that and ``finished``, which records the request's summary with the daemon (a round trip):
  what a request pays for kvmesh's bookkeeping from its arrival to its summary kept.

Bursts alternate between the trees (A B, B A, ...), so both see the same machine; the result is the median
rate of each tree and the median of the per-pair ratios, with its interquartile range.  Lookups do not
promote (``prefetch=false``), so every burst sees the same tiers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from typing import Any

CHUNK = 256


@dataclass
class _Request:  # the parts of vLLM's Request the scheduler side reads
    request_id: str
    prompt_token_ids: list[int]
    cache_salt: str | None = None
    lora_request: Any = None
    mm_features: Any = None
    prompt_embeds: Any = None
    kv_transfer_params: Any = None


def _take_out_explaining() -> None:
    """The scheduler side without its explanation: what "without" measures."""
    from kvmesh.client import KVMeshClient
    from kvmesh.integrations.vllm import scheduler

    scheduler.hit_end_reason = lambda *args: ("", "")  # type: ignore[assignment]
    scheduler.tokens_by_tier = lambda *args: {}  # type: ignore[assignment]
    scheduler.content_digest = lambda tokens: b""  # type: ignore[assignment]
    KVMeshClient.record_request = lambda self, request_id, summary, *args, **kwargs: summary  # type: ignore[method-assign]


def serve(explaining: bool) -> None:
    """A worker: set up, then answer ``<loop> <count>`` lines with the seconds each burst took."""
    import torch

    if not explaining:
        _take_out_explaining()

    from kvmesh.client import KVMeshClient
    from kvmesh.config import KVMeshConfig
    from kvmesh.integrations.vllm.engine_link import DaemonLink
    from kvmesh.integrations.vllm.engine_shape import EngineKVShape
    from kvmesh.integrations.vllm.scheduler import SchedulerSide
    from kvmesh.keys import chunk_keys, model_namespace
    from kvmesh.layout import KVLayout

    layout = KVLayout(num_layers=2, num_kv_heads=1, head_size=8, dtype="bfloat16", block_size=16,
                      page_view="opaque")
    shape = EngineKVShape("bench-lookup", layout)
    with tempfile.TemporaryDirectory() as tmp:
        config = KVMeshConfig.from_mapping({
            "socket_dir": tmp, "instance": f"lr-{uuid.uuid4().hex[:6]}", "l1_size": "8MiB", "l1_prefault": False,
            "http_port": 0, "l1_eviction": "lru", "disk_path": f"{tmp}/disk", "disk_write_policy": "write_through",
            "prefetch": False, "chunk_size": CHUNK, "save_partial_chunks": False})
        ns = shape.namespace(config.tenant_salt)
        prompts = {"kept": list(range(0, 16 * CHUNK)), "on_disk": list(range(100000, 100000 + 8 * CHUNK)),
                   "unseen": list(range(500000, 500000 + 8 * CHUNK))}
        prompts["mixed"] = prompts["kept"][:4 * CHUNK] + prompts["on_disk"][4 * CHUNK:]  # diverges: a miss there
        chunk = torch.zeros(2, 2, CHUNK, 1, 8, dtype=torch.bfloat16)
        keys = {name: chunk_keys(tokens, ns, CHUNK) for name, tokens in prompts.items()}
        with KVMeshClient(config) as client:
            try:
                client.put(keys["on_disk"], [chunk] * len(keys["on_disk"]))
                filler = chunk_keys(list(range(200000, 200000 + 40 * CHUNK)), model_namespace("filler", "x"), CHUNK)
                for key in filler:  # one at a time, each evicting the least recently used (disk keeps them)
                    client.put([key], [torch.zeros(2, 2, CHUNK, 4, 64, dtype=torch.bfloat16)])
                client.put(keys["kept"], [chunk] * len(keys["kept"]))
                link = DaemonLink(config)
                link.connect_at_start()
                scheduler = SchedulerSide(config, shape, link)
                kinds = [keys[name] for name in ("kept", "mixed", "unseen", "on_disk")]
                tokens = [prompts[name] for name in ("kept", "mixed", "unseen", "on_disk")]
                served = 0

                def lookups(count: int) -> None:
                    for index in range(count):
                        client.lookup_with_partials(kinds[index % len(kinds)])

                def requests(count: int, finish: bool) -> None:
                    nonlocal served
                    for index in range(count):
                        served += 1
                        request = _Request(f"bench-{served}", tokens[index % len(tokens)])
                        scheduler.num_new_matched_tokens(request, 0)
                        if finish:
                            scheduler.finished(request.request_id)
                        else:
                            scheduler.trackers.pop(request.request_id)

                loops = {"lookup": lookups, "scheduler": lambda count: requests(count, finish=False),
                         "request": lambda count: requests(count, finish=True)}
                for loop in loops.values():  # warm both paths
                    loop(40)
                print("ready", flush=True)
                for line in sys.stdin:
                    loop_name, count = line.split()
                    started = time.perf_counter()
                    loops[loop_name](int(count))
                    print(time.perf_counter() - started, flush=True)
            finally:
                client.shutdown_daemon()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", action="append", required=True,
                        help="a kvmesh source tree (its src folder); give two (before, then after), or one with "
                             "--without-explaining")
    parser.add_argument("--without-explaining", action="store_true",
                        help="one tree: the first worker with the scheduler's explanation taken out")
    parser.add_argument("--bursts", type=int, default=40, help="bursts per tree and loop")
    parser.add_argument("--lookups", type=int, default=1000, help="lookups per burst")
    parser.add_argument("--requests", type=int, default=300, help="requests per burst")
    parser.add_argument("--core", type=int, default=1, help="the core both workers run on")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        return serve(not args.without_explaining)
    if args.without_explaining:
        if len(args.tree) != 1:
            parser.error("--without-explaining compares one tree with itself: give --tree once")
        runs = [(args.tree[0], ["--without-explaining"]), (args.tree[0], [])]
    elif len(args.tree) == 2:
        runs = [(tree, []) for tree in args.tree]
    else:
        parser.error("give --tree twice (the tree before a change, then the tree after it), or once with "
                     "--without-explaining")
    workers = []
    for tree, extra in runs:
        env = {**os.environ, "PYTHONPATH": os.path.abspath(tree)}
        worker = subprocess.Popen(["taskset", "-c", str(args.core), sys.executable, os.path.abspath(__file__),
                                   "--tree", tree, "--serve", *extra], env=env, stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)
        workers.append(worker)
    try:
        for worker in workers:
            assert worker.stdout is not None and worker.stdout.readline().strip() == "ready"
        report: dict[str, Any] = {"trees": args.tree, "first_without_explaining": args.without_explaining}
        for loop, count in (("lookup", args.lookups), ("scheduler", args.requests), ("request", args.requests)):
            rates: list[list[float]] = [[], []]
            for burst in range(args.bursts):
                order = (0, 1) if burst % 2 == 0 else (1, 0)
                for which in order:
                    worker = workers[which]
                    assert worker.stdin is not None and worker.stdout is not None
                    worker.stdin.write(f"{loop} {count}\n")
                    worker.stdin.flush()
                    rates[which].append(count / float(worker.stdout.readline()))
            ratios = sorted(after / before for before, after in zip(*rates))
            quartiles = statistics.quantiles(ratios, n=4)
            report[loop] = {"before_per_s": round(statistics.median(rates[0])),
                            "after_per_s": round(statistics.median(rates[1])),
                            "after_over_before": round(statistics.median(ratios), 4),
                            "ratio_iqr": [round(quartiles[0], 4), round(quartiles[2], 4)]}
        print(json.dumps(report, indent=1))
    finally:
        for worker in workers:
            if worker.stdin is not None:
                worker.stdin.close()
            worker.wait(timeout=60)


if __name__ == "__main__":
    main()
