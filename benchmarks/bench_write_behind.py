"""Writes behind the request: do they slow the engine? Both targets side by side in one run, plus writer bandwidth.

Usage:
    .venv/bin/python benchmarks/bench_write_behind.py [--variant NAME=SRC ...] [--rounds 3] [--stored 3]
        [--cold-run 6] [--tokens 2000] [--idle 8] [--disk-dir /var/tmp] [--out results/write_behind]

Every ``--variant NAME=SRC`` is one kvmesh engine (disk tier on, as ``kvmesh serve`` has it) whose engine and
daemon import kvmesh from ``SRC`` (put first on PYTHONPATH), so main's code and a branch run side by side on the
same machine in the same run; without ``--variant`` the kvmesh this script imports is the only variant. A plain
vLLM engine (no connector) runs beside them. All engines are up for the whole run but only one is sent a request
at a time (one request at a time); every engine has a KV pool that holds one prompt, so the next prompt evicts it.

(a) warm after stores vs after idle, per kvmesh variant and round: ``--stored`` cold prompts (stored, their disk
    writes queued), then at once prompt W, which the engine's pool has evicted but kvmesh holds in L1 ("busy");
    then again ``--stored`` cold prompts, a wait until the write queue is empty and ``--idle`` seconds more,
    then W ("idle"). Target: busy within 1.2x of idle (medians).
(b) consecutive cold prompts: ``--cold-run`` fresh prompts back to back on each engine, the systems taking turns
    block by block with the same prompts (between blocks the write queues drain), vLLM without a connector
    being the reference. Target: kvmesh's mean cold TTFT within 3% of vLLM's.
(c) the writer alone, no engine: a TieredStore with a DiskTier in ``--disk-dir`` writes ``--writer-chunks``
    chunks of 256 tokens of the demo model behind (from each variant's code, in a subprocess), against the
    sequential write bandwidth of a plain write loop into the same directory, alternated, in the same run.

Every engine runs with VLLM_CPU_NUM_OF_RESERVED_CPU=0 and HF_HUB_OFFLINE=1.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from kvmesh.bench.openai_client import stream_completion
from kvmesh.bench.servers import EngineServer, EngineSpec
from kvmesh.bench.texts import document_token_ids
from kvmesh.client import KVMeshClient
from kvmesh.config import KVMeshConfig
from kvmesh.demo.model import default_model_dir, prepare_demo_model

BYTES_PER_TOKEN = 23_040
CHUNK_TOKENS = 256
REPO = Path(__file__).resolve().parents[1]
ANSWER = 8


@dataclass
class Variant:
    name: str
    src: str | None  # None: whatever this interpreter imports
    settings: dict[str, object] = field(default_factory=dict)
    server: EngineServer | None = None

    def env(self) -> dict[str, str]:
        if self.src is None:
            return {}
        rest = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != self.src]
        return {"PYTHONPATH": os.pathsep.join([self.src, *rest])}


def _client(settings: dict[str, object]) -> KVMeshClient:
    return KVMeshClient(KVMeshConfig.load({**settings, "autostart_daemon": False}, env={}))


def _metrics(settings: dict[str, object]) -> dict[str, float]:
    with _client(settings) as client:
        return client.metrics()


def _flush(settings: dict[str, object]) -> None:
    with _client(settings) as client:
        client.flush()


def ttft(server: EngineServer, prompt: list[int]) -> float:
    return stream_completion(server.base_url, server.model, prompt, ANSWER).ttft


def disk_write_rate(before: dict[str, float], after: dict[str, float]) -> tuple[float, float]:
    """(MB written to disk, MB/s while writing) between two metric snapshots."""
    written = after.get("kvmesh_tier_written_bytes_total{tier=disk}", 0) - before.get(
        "kvmesh_tier_written_bytes_total{tier=disk}", 0)
    seconds = after.get("kvmesh_tier_write_seconds_sum{tier=disk}", 0) - before.get(
        "kvmesh_tier_write_seconds_sum{tier=disk}", 0)
    return written / 1e6, (written / seconds / 1e6 if seconds else float("nan"))


WRITER_PROBE = textwrap.dedent("""
    import json, os, shutil, sys, tempfile, time, torch
    from kvmesh.store import TieredStore
    from kvmesh.tiers.disk import DiskTier
    from kvmesh.tiers.memory import MemoryTier
    import inspect
    base, chunks, tokens, priority = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    # main's TieredStore has no writer_priority (its writer runs at normal priority)
    options = {"writer_priority": priority} if "writer_priority" in inspect.signature(TieredStore).parameters else {}
    chunk = torch.randn(30, 2, tokens, 3, 64).to(torch.bfloat16)  # the demo model's KV of one chunk
    size = chunk.numel() * 2
    l1 = MemoryTier(2 * chunks * size + (64 << 20), memoryview(bytearray(2 * chunks * size + (64 << 20))))
    directory = tempfile.mkdtemp(dir=base, prefix="kvmesh-writer-")
    try:
        store = TieredStore(l1, [DiskTier(directory, 1 << 40)], prefetch=False, **options)
        for i in range(chunks):  # fault L1's pages in first: the writer, not L1, is timed
            store._fill_l1(b"w" + i.to_bytes(15, "little"), chunk)
        keys = [b"w" + i.to_bytes(15, "little") for i in range(chunks)]
        writer = next(t for t in getattr(store, "threads", None) or store._threads if t.name == "kvmesh-writer")
        def schedstat():  # the writer thread's (cpu ns, run-queue wait ns)
            with open(f"/proc/self/task/{writer.native_id}/schedstat") as f:
                return [int(x) for x in f.read().split()[:2]]
        cpu0, wait0 = schedstat()
        started = time.perf_counter()
        for key in keys:
            store._write_down(key)
        store.flush(600)
        seconds = time.perf_counter() - started
        cpu1, wait1 = schedstat()
        store.close()
        print(json.dumps({"mb_per_s": chunks * size / seconds / 1e6, "seconds": seconds, "options": options,
                          "mb_per_cpu_s": chunks * size / max(cpu1 - cpu0, 1) * 1e3,
                          "runqueue_wait_s": (wait1 - wait0) / 1e9,
                          "module": __import__("kvmesh").__file__}))
    finally:
        shutil.rmtree(directory, ignore_errors=True)
""")


def writer_bandwidth(variant: Variant, base: Path, chunks: int, priority: str) -> dict[str, object]:
    env = {**os.environ, **variant.env()}
    out = subprocess.run([sys.executable, "-c", WRITER_PROBE, str(base), str(chunks), str(CHUNK_TOKENS), priority],
                         env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def sequential_write_bandwidth(base: Path, chunks: int) -> float:
    """MB/s of a plain write loop (1 MiB writes, one file per chunk, like the disk tier) into ``base``."""
    directory = Path(tempfile.mkdtemp(dir=base, prefix="kvmesh-dd-"))
    block = os.urandom(1 << 20)
    per_file = CHUNK_TOKENS * BYTES_PER_TOKEN
    try:
        started = time.perf_counter()
        for i in range(chunks):
            fd = os.open(directory / f"{i}.bin", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                left = per_file
                while left:
                    left -= os.write(fd, memoryview(block)[:min(left, len(block))])
            finally:
                os.close(fd)
        return chunks * per_file / (time.perf_counter() - started) / 1e6
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=SRC",
                        help="a kvmesh engine importing kvmesh from SRC (repeatable)")
    parser.add_argument("--tokens", type=int, default=2000, help="prompt length")
    parser.add_argument("--stored", type=int, default=3, help="(a) cold prompts stored before the warm one")
    parser.add_argument("--rounds", type=int, default=3, help="(a) busy/idle pairs per variant; (b) blocks")
    parser.add_argument("--cold-run", type=int, default=6, help="(b) consecutive cold prompts per block")
    parser.add_argument("--idle", type=float, default=8.0, help="(a) seconds of idle before the idle sample")
    parser.add_argument("--disk-dir", type=Path, default=Path("/var/tmp"),
                        help="where the disk tiers (and the writer probe) write")
    parser.add_argument("--writer-chunks", type=int, default=40, help="(c) chunks per writer sample")
    parser.add_argument("--writer-samples", type=int, default=3)
    parser.add_argument("--writer-priority", choices=("normal", "idle"), default="normal",
                        help="(c) the writer thread's priority where the code has the choice (normal: the writer's "
                             "own speed; idle: what it gets of a machine that other work keeps busy)")
    parser.add_argument("--skip-engines", action="store_true", help="only (c)")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "write_behind")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.update({"HF_HUB_OFFLINE": "1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"})
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop engines and daemons on the way out
    variants = [Variant(*item.split("=", 1)) for item in args.variant] or [Variant("kvmesh", None)]
    report: dict[str, object] = {"args": {k: str(v) for k, v in vars(args).items()}}

    # (c) the writer alone, alternated with the plain write loop
    writer: dict[str, list[float]] = {v.name: [] for v in variants}
    writer_cpu: dict[str, list[float]] = {v.name: [] for v in variants}  # bytes per second of the writer's CPU
    plain: list[float] = []
    for _ in range(args.writer_samples):
        plain.append(sequential_write_bandwidth(args.disk_dir, args.writer_chunks))
        for variant in variants:
            sample = writer_bandwidth(variant, args.disk_dir, args.writer_chunks, args.writer_priority)
            writer[variant.name].append(float(sample["mb_per_s"]))
            writer_cpu[variant.name].append(float(sample["mb_per_cpu_s"]))
    report["writer"] = {"plain_write_mb_s": plain, **{f"{k}_mb_s": v for k, v in writer.items()},
                        **{f"{k}_mb_per_cpu_s": v for k, v in writer_cpu.items()}}
    print(json.dumps(report["writer"]), flush=True)
    if args.skip_engines:
        _finish(args, report, variants, plain, writer, {}, {}, writer_cpu)
        return

    from transformers import AutoTokenizer

    model = str(prepare_demo_model(default_model_dir()))
    tokenizer = AutoTokenizer.from_pretrained(model, local_files_only=True)
    max_len = -(-(args.tokens + ANSWER + 64) // 128) * 128
    pool = max_len + 2 * 128  # tokens: one prompt and two spare blocks, the next prompt evicts it
    per_round_a = 2 * args.stored
    needed = 1 + args.rounds * (len(variants) * per_round_a + args.cold_run) + 1
    docs = document_token_ids(tokenizer, needed, args.tokens, seed=2024)
    warmup, docs = docs[-1][:256], docs[:-1]
    work = Path(tempfile.mkdtemp(prefix="kvmesh-wb-"))
    disk_root = Path(tempfile.mkdtemp(dir=args.disk_dir, prefix="kvmesh-wb-disk-"))
    for variant in variants:
        variant.settings = {"instance": f"wb-{variant.name}-{uuid.uuid4().hex[:6]}", "socket_dir": str(work),
                            "l1_size": "4GiB", "l1_prefault": False, "http_port": 0,
                            "disk_path": str(disk_root / variant.name)}
    vllm = EngineServer(EngineSpec(model, kvmesh=None, kv_pool_tokens=pool, max_model_len=max_len),
                        args.out / "vllm.log")
    busy: dict[str, list[float]] = {v.name: [] for v in variants}
    idle: dict[str, list[float]] = {v.name: [] for v in variants}
    cold: dict[str, list[float]] = {"vllm": [], **{v.name: [] for v in variants}}
    write_rates: dict[str, list[float]] = {v.name: [] for v in variants}
    events: list[dict[str, object]] = []  # wall-clock windows, to line up with outside samplers
    try:
        for variant in variants:
            spec = EngineSpec(model, kvmesh=variant.settings, kv_pool_tokens=pool, max_model_len=max_len,
                              extra_env=variant.env())
            variant.server = EngineServer(spec, args.out / f"{variant.name}.log").start()
        vllm.start()
        for server in [vllm, *(v.server for v in variants)]:
            ttft(server, warmup)
        target = docs.pop()  # W: stored once by each variant, then always served from its L1
        for variant in variants:
            ttft(variant.server, target)
            _flush(variant.settings)
        for round_index in range(args.rounds):
            # (a) per variant: busy then idle (order alternated between rounds)
            for variant in (variants if round_index % 2 == 0 else variants[::-1]):
                server = variant.server
                before = _metrics(variant.settings)
                started = time.time()
                for _ in range(args.stored):
                    ttft(server, docs.pop())
                warm_at = time.time()
                warm = ttft(server, target)
                events.append({"variant": variant.name, "stored_from": started, "warm_from": warm_at,
                               "warm_to": time.time()})
                loaded = _metrics(variant.settings)
                busy[variant.name].append(warm)
                _flush(variant.settings)
                write_rates[variant.name].append(disk_write_rate(before, _metrics(variant.settings))[1])
                for _ in range(args.stored):
                    ttft(server, docs.pop())
                _flush(variant.settings)
                time.sleep(args.idle)
                quiet = ttft(server, target)
                idle[variant.name].append(quiet)
                print(json.dumps({"round": round_index, "variant": variant.name, "busy_ttft": warm,
                                  "idle_ttft": quiet, "loaded_tokens_busy": loaded.get("kvmesh_loaded_tokens_total",
                                                                                      0) - before.get(
                                      "kvmesh_loaded_tokens_total", 0),
                                  "disk_mb_s": write_rates[variant.name][-1]}), flush=True)
            # (b) a block of consecutive cold prompts per system, the same prompts for each
            block = [docs.pop() for _ in range(args.cold_run)]
            systems = [("vllm", vllm, None), *((v.name, v.server, v.settings) for v in variants)]
            if round_index % 2:
                systems = systems[::-1]
            for name, server, settings in systems:
                times = [ttft(server, prompt) for prompt in block]
                cold[name].extend(times)
                if settings is not None:
                    _flush(settings)  # the next system's block starts on a quiet machine
                print(json.dumps({"round": round_index, "system": name, "cold_ttfts": times}), flush=True)
    finally:
        for variant in variants:
            if variant.server is not None:
                variant.server.stop()
            try:
                with _client(variant.settings) as client:
                    client.shutdown_daemon()
            except (ConnectionError, OSError):
                pass
        vllm.stop()
        shutil.rmtree(disk_root, ignore_errors=True)
    report.update({"events": events, "busy": busy, "idle": idle, "cold": cold, "disk_write_mb_s": write_rates})
    _finish(args, report, variants, plain, writer, {"busy": busy, "idle": idle, "rates": write_rates}, cold,
            writer_cpu)


def _finish(args: argparse.Namespace, report: dict[str, object], variants: list[Variant], plain: list[float],
            writer: dict[str, list[float]], warm: dict[str, dict[str, list[float]]],
            cold: dict[str, list[float]], writer_cpu: dict[str, list[float]]) -> None:
    (args.out / "results.json").write_text(json.dumps(report, indent=2))
    print(f"\nwriter alone, {args.writer_chunks} chunks of {CHUNK_TOKENS} tokens into {args.disk_dir} "
          f"(median of {args.writer_samples}):")
    print("| code | writer MB/s | plain write loop MB/s | writer / plain | writer MB per CPU-second |\n"
          "| --- | --- | --- | --- | --- |")
    for variant in variants:
        w, p = median(writer[variant.name]), median(plain)
        print(f"| {variant.name} | {w:.0f} | {p:.0f} | {w / p:.2f} | {median(writer_cpu[variant.name]):.0f} |")
    if warm:
        print(f"\n(a) warm TTFT of a {args.tokens}-token prompt served from L1 (disk tier on), median of "
              f"{args.rounds} rounds:")
        print("| code | right after storing " f"{args.stored} prompts s | after idle s | ratio (target <= 1.2) | "
              "disk writes MB/s while busy |\n| --- | --- | --- | --- | --- |")
        for variant in variants:
            b, i = median(warm["busy"][variant.name]), median(warm["idle"][variant.name])
            print(f"| {variant.name} | {b:.3f} | {i:.3f} | {b / i:.2f}x | {median(warm['rates'][variant.name]):.0f} |")
    if cold:
        ref = statistics.mean(cold["vllm"])
        print(f"\n(b) {len(cold['vllm'])} cold {args.tokens}-token prompts per system, {args.cold_run} consecutive "
              "per block:")
        print("| system | mean cold TTFT s | median s | vs vLLM (target <= +3%) |\n| --- | --- | --- | --- |")
        for name, times in cold.items():
            print(f"| {name} | {statistics.mean(times):.3f} | {median(times):.3f} | "
                  f"{statistics.mean(times) / ref - 1:+.1%} |")


if __name__ == "__main__":
    main()
