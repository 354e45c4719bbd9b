"""Loading a compressed entry vs a raw one from the disk and Redis tiers: get + decode, side by side.

Usage:
    .venv/bin/python benchmarks/bench_codec_load.py [--codecs raw lossless kivi:bits=8 cachegen]
        [--tokens 4096] [--rounds 5] [--view chunk|vllm-cpu-amx] [--tiers disk,redis] [--disk-dir /var/tmp]
        [--out results/bench_codec_load.json]

The demo model's real KV for ``--tokens`` tokens of documentation (transformers,
bf16) is cut into 256-token chunks (5.9 MB each), encoded once with each codec
(untimed), and written to a :class:`DiskTier` and a private ``redis-server``.
A *load* is what a promotion does: the tier's get of every chunk, then
``decode_any`` into a preallocated, warm bf16 buffer (as a promotion decodes
into its L1 extent).  Disk loads are measured cold (each file fsynced and
dropped from the page cache with ``posix_fadvise``, residency checked) and warm
(page cache); Redis loads fetch the batch with one pipeline.  Each round loads
every codec once, in rotating order, so machine noise hits all alike; the
table gives medians of GB/s of bf16 delivered (raw bytes / load seconds) and
the ratio to ``raw`` in the same rounds.  ``--view vllm-cpu-amx`` stores the
chunks as vLLM-CPU AMX pages (the layout vLLM users' entries have), which adds
the copy back into packed tiles to every lossy decode.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from bench_tiers import disk_root, drop_from_cache, entry_files, redis_server, resident_fraction
from kvmesh.bench.texts import document_token_ids
from kvmesh.codecs import decode_any, get_codec
from kvmesh.codecs.kvview import kv_targets
from kvmesh.demo import cache_to_chunk
from kvmesh.model import default_model_dir
from kvmesh.tiers.disk import DiskTier
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


def load_all(fetch, buffers: list[torch.Tensor]) -> float:  # noqa: ANN001 - fetch: () -> entries
    started = time.perf_counter()
    for data, buffer in zip(fetch(), buffers):
        decode_any(data, out=buffer)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--codecs", nargs="+", default=["raw", "lossless", "kivi:bits=8", "cachegen"])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--view", choices=["chunk", "vllm-cpu-amx"], default="chunk")
    parser.add_argument("--tiers", default="disk,redis")
    parser.add_argument("--disk-dir", type=Path, default=Path("/var/tmp"))
    parser.add_argument("--out", type=Path, default=Path("results/bench_codec_load.json"))
    args = parser.parse_args()
    chunks = real_chunks(args.tokens, args.view)
    raw_bytes = sum(c.numel() * c.element_size() for c in chunks)
    encoded = {}
    for spec in args.codecs:
        codec = get_codec(spec)
        encoded[spec] = [codec.encode(c, args.view) for c in chunks]
        decode_any(encoded[spec][0], out=torch.empty_like(chunks[0]))  # compile kernels outside the timing
    buffers = [torch.empty_like(c) for c in chunks]
    tiers = args.tiers.split(",")
    seconds: dict[str, dict[str, list[float]]] = {}
    with disk_root(args.disk_dir, allow_tmpfs=False) as (root, _), redis_server() as server:
        disk = DiskTier(root / "tier", capacity_bytes=4 * raw_bytes * len(args.codecs) + (1 << 30), name="bench")
        redis_tier = RedisTier(server.url, name="bench", namespace="bench-load")
        keys = {spec: [f"{spec}/{i}".encode() for i in range(len(chunks))] for spec in args.codecs}
        for spec in args.codecs:
            for key, data in zip(keys[spec], encoded[spec]):
                disk.put(key, data)
            if "redis" in tiers:
                redis_tier.put_many(zip(keys[spec], encoded[spec]))
        files = entry_files(root / "tier")
        residency = []
        for round_index in range(args.rounds):
            order = args.codecs[round_index % len(args.codecs):] + args.codecs[:round_index % len(args.codecs)]
            for spec in order:
                ks = keys[spec]
                if "disk" in tiers:
                    drop_from_cache(files)
                    residency.append(resident_fraction(files))
                    seconds.setdefault(f"disk cold|{spec}", []).append(
                        load_all(lambda: (disk.get(k) for k in ks), buffers))
                    seconds.setdefault(f"disk warm|{spec}", []).append(
                        load_all(lambda: (disk.get(k) for k in ks), buffers))
                if "redis" in tiers:
                    seconds.setdefault(f"redis|{spec}", []).append(
                        load_all(lambda: redis_tier.get_many(ks), buffers))
            for buffer, chunk in zip(buffers, chunks):  # every load delivered the entry (lossy: close to it)
                assert float((buffer.float() - chunk.float()).abs().max()) < 1.0
    rows = []
    for label, times in seconds.items():
        where, spec = label.split("|")
        ratio = sum(len(d) for d in encoded["raw"]) / sum(len(d) for d in encoded[spec]) if "raw" in encoded else 0
        baseline = statistics.median(seconds[f"{where}|raw"]) if f"{where}|raw" in seconds else float("nan")
        median = statistics.median(times)
        rows.append({"tier": where, "codec": spec, "size_ratio": round(ratio, 2),
                     "load_gbps": round(raw_bytes / median / 1e9, 2), "vs_raw": round(baseline / median, 2),
                     "seconds": times})
    print(f"{len(chunks)} chunks of {CHUNK} tokens ({raw_bytes / 1e6:.0f} MB bf16), view {args.view}, "
          f"{args.rounds} rounds; max page-cache residency after a drop: {max(residency, default=0):.0%}")
    print("| tier | codec | size vs bf16 | load GB/s (bf16 delivered) | speed vs raw |")
    print("| --- | --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row['tier']} | `{row['codec']}` | {row['size_ratio']:.2f}x | {row['load_gbps']:.2f} "
              f"| {row['vs_raw']:.2f}x |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"view": args.view, "tokens": args.tokens, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
