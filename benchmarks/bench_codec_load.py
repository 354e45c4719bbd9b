"""Promoting compressed vs raw entries from the disk and Redis tiers into L1, side by side.

Usage:
    .venv/bin/python benchmarks/bench_codec_load.py [--codecs raw lossless kivi:bits=8 cachegen]
        [--tokens 4096] [--rounds 5] [--threads 1 2] [--view chunk|vllm-cpu-amx] [--tiers disk,redis]
        [--disk-dir /var/tmp] [--link-gbit 10] [--out results/bench_codec_load.json]

The demo model's real KV for ``--tokens`` tokens of documentation (transformers,
bf16) is cut into 256-token chunks (5.9 MB each), encoded once with each codec
(untimed), and written to a :class:`DiskTier` and a private ``redis-server``.
A *load* is what a request that finds its chunks below L1 waits for, through
kvmesh's own :class:`TieredStore`: ``lookup`` of all the chunks (which starts
the prefetchers: ``--threads`` of them read an entry and decode it into its L1
extent), then ``acquire`` of each chunk in order.  Disk loads are measured cold
(each file fsynced and dropped from the page cache with ``posix_fadvise``,
residency checked) and warm (page cache).  Each round loads every (codec,
threads) pair once, in rotating order, so machine noise hits all alike; the
table gives medians of GB/s of bf16 delivered into L1 (raw bytes / load
seconds) and the speed relative to ``raw`` with the same threads in the same
rounds.  ``--view vllm-cpu-amx`` stores the chunks as vLLM-CPU AMX pages (the
layout vLLM users' entries have), which adds the scatter back into packed tiles
to every lossy decode.  ``--link-gbit N`` shapes the loopback interface to N
Gbit/s with a token-bucket qdisc (``tc``, needs root) while it runs, so Redis is
reached as over a network link of that speed (loopback itself moves ~30 Gbit/s);
the qdisc is removed afterwards.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from bench_tiers import disk_root, drop_from_cache, entry_files, redis_server, resident_fraction
from kvmesh.bench.texts import document_token_ids
from kvmesh.codecs import decode_any, get_codec
from kvmesh.codecs.kvview import kv_targets
from kvmesh.demo.model import default_model_dir
from kvmesh.demo.run import cache_to_chunk
from kvmesh.store import LowerTier, TieredStore
from kvmesh.tiers.disk import DiskTier
from kvmesh.tiers.memory import MemoryTier
from kvmesh.tiers.redis import RedisTier

CHUNK = 256


def real_chunks(tokens: int, view: str) -> list[torch.Tensor]:
    """``tokens`` tokens of the demo model's KV as 256-token entries in ``view``'s layout."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = default_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, local_files_only=True).eval()
    ids = torch.tensor([document_token_ids(tokenizer, 1, tokens, seed=3)[0]])
    with torch.inference_mode():
        cache = model(input_ids=ids, use_cache=True).past_key_values
    chunks = [cache_to_chunk(cache, start, start + CHUNK).contiguous() for start in range(0, tokens, CHUNK)]
    if view == "chunk":
        return chunks
    pages = []
    for chunk in chunks:  # [L, 2, T, H, D] -> two 128-token pages per chunk, packed as the AMX kernel packs them
        layers, _, _, heads, head_size = chunk.shape
        entry = torch.empty(layers, CHUNK // 128, heads, 128, 2 * head_size, dtype=chunk.dtype)
        logical = chunk.view(layers, 2, CHUNK // 128, 128, heads, head_size).permute(0, 1, 2, 4, 3, 5)
        with kv_targets(entry, view) as (keys, values):
            keys.copy_(logical[:, 0])
            values.copy_(logical[:, 1])
        pages.append(entry)
    return pages


@contextmanager
def shaped_loopback(gbit: float | None) -> Iterator[None]:
    """Loopback limited to ``gbit`` Gbit/s (a token bucket on ``lo``) for the duration, if asked."""
    if not gbit:
        yield
        return
    subprocess.run(["tc", "qdisc", "add", "dev", "lo", "root", "tbf", "rate", f"{gbit}gbit", "burst", "4mb",
                    "latency", "100ms"], check=True)
    try:
        yield
    finally:
        subprocess.run(["tc", "qdisc", "del", "dev", "lo", "root"], check=False)


def load(store: TieredStore, keys: list[bytes]) -> float:
    """Seconds from the lookup to the last chunk pinned in L1 (the store promotes what is below)."""
    started = time.perf_counter()
    assert store.lookup(keys) == len(keys)
    for key in keys:
        extent = store.acquire(key)
        assert extent is not None, "a stored chunk did not come back"
        store.release(key, extent)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--codecs", nargs="+", default=["raw", "lossless", "kivi:bits=8", "cachegen"])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--view", choices=["chunk", "vllm-cpu-amx"], default="chunk")
    parser.add_argument("--tiers", default="disk,redis")
    parser.add_argument("--disk-dir", type=Path, default=Path("/var/tmp"))
    parser.add_argument("--link-gbit", type=float, default=None, help="shape loopback (Redis) to this speed")
    parser.add_argument("--out", type=Path, default=Path("results/bench_codec_load.json"))
    args = parser.parse_args()
    chunks = real_chunks(args.tokens, args.view)
    raw_bytes = sum(c.numel() * c.element_size() for c in chunks)
    encoded = {spec: [get_codec(spec).encode(c, args.view) for c in chunks] for spec in args.codecs}
    for spec in args.codecs:  # compile kernels outside the timing
        decode_any(encoded[spec][0], out=torch.empty_like(chunks[0]))
    l1_bytes = raw_bytes + (64 << 20)
    seconds: dict[tuple[str, str, int], list[float]] = {}
    residency: list[float] = []
    with disk_root(args.disk_dir, allow_tmpfs=False) as (root, _), redis_server() as server, \
            shaped_loopback(args.link_gbit):
        tiers: dict[str, object] = {}
        if "disk" in args.tiers:
            tiers["disk"] = DiskTier(root / "tier", capacity_bytes=2 * raw_bytes * len(args.codecs) + (1 << 30))
        if "redis" in args.tiers:
            tiers["redis"] = RedisTier(server.url, namespace="bench-load")
        keys = {spec: [hashlib.blake2b(f"{spec}/{i}".encode(), digest_size=16).digest() for i in range(len(chunks))]
                for spec in args.codecs}
        for tier in tiers.values():
            for spec in args.codecs:
                for key, data in zip(keys[spec], encoded[spec]):
                    assert tier.put(key, data)
        stores = {(name, threads): TieredStore(MemoryTier(l1_bytes, memoryview(bytearray(l1_bytes))),
                                               [LowerTier(tier, "write_through")], prefetch_threads=threads)
                  for name, tier in tiers.items() for threads in args.threads}
        cases = [(spec, threads) for spec in args.codecs for threads in args.threads]
        for round_index in range(args.rounds + 1):  # the first round warms L1's pages and is not counted
            shift = round_index % len(cases)
            for spec, threads in cases[shift:] + cases[:shift]:
                for name in tiers:
                    store = stores[(name, threads)]
                    states = ["cold", "warm"] if name == "disk" else [""]
                    for state in states:
                        for key in keys[spec]:
                            store.l1.delete(key)
                        if state == "cold":
                            files = entry_files(root / "tier")
                            drop_from_cache(files)
                            residency.append(resident_fraction(files))
                        taken = load(store, keys[spec])
                        if round_index:
                            seconds.setdefault((f"{name} {state}".strip(), spec, threads), []).append(taken)
            for key, chunk in zip(keys[args.codecs[-1]], chunks):  # the loads delivered the entries
                got = stores[next(iter(stores))].get(key)
                assert got is not None and float((got.float() - chunk.float()).abs().max()) < 1.0
        for store in stores.values():
            store.close()
    raw_size = sum(c.numel() * c.element_size() for c in chunks)
    rows = []
    for (where, spec, threads), times in seconds.items():
        median = statistics.median(times)
        baseline = seconds.get((where, "raw", threads))
        rows.append({"tier": where, "codec": spec, "threads": threads,
                     "size_ratio": round(raw_size / sum(len(d) for d in encoded[spec]), 2),
                     "load_gbps": round(raw_bytes / median / 1e9, 2),
                     "vs_raw": round(statistics.median(baseline) / median, 2) if baseline else None,
                     "seconds": times})
    rows.sort(key=lambda r: (r["tier"], r["threads"], args.codecs.index(r["codec"])))
    link = f", loopback shaped to {args.link_gbit:g} Gbit/s" if args.link_gbit else ""
    print(f"{len(chunks)} chunks of {CHUNK} tokens ({raw_bytes / 1e6:.0f} MB bf16), view {args.view}{link}, "
          f"{args.rounds} rounds; max page-cache residency after a drop: {max(residency, default=0):.0%}")
    print("| tier | prefetch threads | codec | size vs bf16 | load GB/s (bf16 into L1) | speed vs raw |")
    print("| --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row['tier']} | {row['threads']} | `{row['codec']}` | {row['size_ratio']:.2f}x "
              f"| {row['load_gbps']:.2f} | {row['vs_raw']:.2f}x |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"view": args.view, "tokens": args.tokens, "link_gbit": args.link_gbit,
                                    "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
