"""kvmesh's GPU copy path on a CUDA machine: bit-exact round trips, throughput, CPU cost, overlap; a JSON report.

Self-contained: PyTorch and kvmesh's own source only (no vLLM), so it runs on a bare CUDA machine:

    PYTHONPATH=src python benchmarks/gpu_check.py --out gpu_check.json

It drives the code a CUDA engine's connector runs (``DeviceCopier``: pinned L1, a side stream, events;
``page_copy.move_pages_device``: runs of blocks as single copies, else a gather through device staging)
between CUDA KV tensors in each of vLLM's layouts and a real POSIX shared-memory segment (kvmesh's L1), and
measures, per layout and block pattern:

* round trips bit-exact (save pages to the segment, load them into other blocks, compare), loads waited for
  and background loads (their event polled, as the worker does for vLLM's ``load_async``);
* saves and loads in GB/s, against a plain pinned ``copy_`` of the same bytes and the device's host-to-device
  peak (one large pinned copy);
* CPU time per copied block;
* overlap: a matmul loop on the engine's stream, alone and while background loads (vLLM's ``load_async``: no
  stream or host waits for them, their event is polled) run on the side stream (target: < 10% slower).

Targets (issue "The GPU data path"): loads and saves >= 80% of the plain pinned copy, overlap cost < 10%.
Runs in well under five minutes on an H100.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
import uuid
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from kvmesh.integrations.vllm.device_copy import DeviceCopier  # noqa: E402
from kvmesh.tiers.shm import SharedSegment  # noqa: E402

LAYERS, HEADS, BLOCK, HEAD_SIZE = 32, 8, 16, 128  # a Llama-8B-like layer: 64 KiB pages in bf16
CHUNK_BLOCKS = 16  # a 256-token chunk
CHUNKS = 8


def layer_views(layout: str, blocks: int, device: torch.device) -> list[torch.Tensor]:
    """Per-layer [blocks, heads, tokens, content] views in one of vLLM's memory orders (kv_cache_layout.py)."""
    dtype = torch.bfloat16
    if layout == "LBHNC":
        return [torch.randn(blocks, HEADS, BLOCK, 2 * HEAD_SIZE, device=device, dtype=dtype) for _ in range(LAYERS)]
    if layout == "LBNHC":
        return [torch.randn(blocks, BLOCK, HEADS, 2 * HEAD_SIZE, device=device, dtype=dtype).permute(0, 2, 1, 3)
                for _ in range(LAYERS)]
    if layout == "BLHNC":
        packed = torch.randn(blocks, LAYERS, HEADS, BLOCK, 2 * HEAD_SIZE, device=device, dtype=dtype)
        return [packed[:, layer] for layer in range(LAYERS)]
    if layout == "MLA":
        return [torch.randn(blocks, 1, BLOCK, 576, device=device, dtype=dtype) for _ in range(LAYERS)]
    raise ValueError(layout)


def block_pattern(pattern: str, count: int, total: int, generator: torch.Generator) -> list[int]:
    if pattern == "runs":
        return list(range(8, 8 + count))
    return torch.randperm(total, generator=generator)[:count].tolist()


def timed(action, repeat: int, device: torch.device) -> tuple[float, float]:
    """Median wall seconds and mean CPU seconds of ``action`` (which synchronizes itself)."""
    walls, cpus = [], []
    for _ in range(repeat):
        torch.cuda.synchronize(device)
        wall, cpu = time.perf_counter(), time.process_time()
        action()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return statistics.median(walls), statistics.mean(cpus)


def check_layout(layout: str, pattern: str, segment: SharedSegment, copier: DeviceCopier,
                 device: torch.device, repeat: int) -> dict[str, object]:
    generator = torch.Generator().manual_seed(0)
    total = CHUNKS * CHUNK_BLOCKS * 3
    source = layer_views(layout, total, device)
    target = [torch.zeros_like(layer) for layer in source]
    count = CHUNKS * CHUNK_BLOCKS
    saved_blocks = torch.tensor(block_pattern(pattern, count, total, generator))
    loaded_blocks = torch.tensor(block_pattern(pattern, count, total, generator))
    page = tuple(source[0].shape[1:])
    nbytes = LAYERS * count * source[0][0].numel() * source[0].element_size()
    host = torch.frombuffer(segment.buffer, dtype=torch.bfloat16, count=nbytes // 2).view(LAYERS, count, *page)
    jobs_save, jobs_load = [(host, saved_blocks)], [(host, loaded_blocks)]
    copier.move(jobs_save, source, into_engine=False)
    copier.move(jobs_load, target, into_engine=True)
    exact = all(torch.equal(t.index_select(0, loaded_blocks.to(device)), s.index_select(0, saved_blocks.to(device)))
                for s, t in zip(source, target))
    # a background load (vLLM's load_async): nothing waits for it but its event, which the worker polls
    background = [torch.zeros_like(layer) for layer in source]
    done = copier.move(jobs_load, background, into_engine=True, wait=False, engine_waits=False)
    while not done.query():
        time.sleep(0.0005)
    background_exact = all(torch.equal(b.index_select(0, loaded_blocks.to(device)),
                                       s.index_select(0, saved_blocks.to(device))) for s, b in zip(source, background))
    del background
    save_s, save_cpu = timed(lambda: copier.move(jobs_save, source, into_engine=False), repeat, device)
    load_s, load_cpu = timed(lambda: copier.move(jobs_load, target, into_engine=True), repeat, device)
    plain_host = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    plain_device = torch.empty(nbytes, dtype=torch.uint8, device=device)
    plain_load_s, _ = timed(lambda: (plain_device.copy_(plain_host, non_blocking=True),
                                     torch.cuda.synchronize(device)), repeat, device)
    plain_save_s, _ = timed(lambda: (plain_host.copy_(plain_device, non_blocking=True),
                                     torch.cuda.synchronize(device)), repeat, device)
    del host
    gb = nbytes / 1e9
    return {"layout": layout, "blocks": pattern, "bytes": nbytes, "bit_exact": exact and background_exact,
            "background_load_bit_exact": background_exact,
            "save_GBps": gb / save_s, "load_GBps": gb / load_s,
            "plain_pinned_save_GBps": gb / plain_save_s, "plain_pinned_load_GBps": gb / plain_load_s,
            "save_vs_plain": plain_save_s / save_s, "load_vs_plain": plain_load_s / load_s,
            "cpu_us_per_block_save": 1e6 * save_cpu / (count * LAYERS),
            "cpu_us_per_block_load": 1e6 * load_cpu / (count * LAYERS)}


def host_to_device_peak(device: torch.device) -> float:
    host = torch.empty(1 << 30, dtype=torch.uint8).pin_memory()
    target = torch.empty_like(host, device=device)
    seconds, _ = timed(lambda: (target.copy_(host, non_blocking=True), torch.cuda.synchronize(device)), 5, device)
    return host.numel() / 1e9 / seconds


def overlap_cost(segment: SharedSegment, copier: DeviceCopier, device: torch.device) -> dict[str, float]:
    """A matmul loop's time alone and while loads run on the side stream, from another thread."""
    a = torch.randn(4096, 4096, device=device, dtype=torch.bfloat16)

    def loop() -> float:
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(200):
            a @ a
        torch.cuda.synchronize(device)
        return time.perf_counter() - start

    loop()
    alone = statistics.median(loop() for _ in range(3))
    layers = layer_views("LBHNC", CHUNKS * CHUNK_BLOCKS, device)
    count = CHUNKS * CHUNK_BLOCKS
    nbytes = LAYERS * count * layers[0][0].numel() * 2
    host = torch.frombuffer(segment.buffer, dtype=torch.bfloat16, count=nbytes // 2).view(LAYERS, count,
                                                                                           *layers[0].shape[1:])
    stop = threading.Event()
    loads = [0]

    def keep_loading() -> None:
        # background loads as the worker runs them (vLLM's load_async): neither the engine's stream nor the host
        # waits; the worker polls the event each step.  This thread's "engine stream" is its own, so the copier
        # orders its copies after nothing of the matmuls' (in an engine, after the step that started them)
        with torch.cuda.device(device), torch.cuda.stream(torch.cuda.Stream(device)):
            while not stop.is_set():
                done = copier.move([(host, torch.arange(count))], layers, into_engine=True, wait=False,
                                   engine_waits=False)
                while not done.query():
                    time.sleep(0.0005)
                loads[0] += 1

    thread = threading.Thread(target=keep_loading)
    thread.start()
    try:
        busy = statistics.median(loop() for _ in range(3))
    finally:
        stop.set()
        thread.join()
    return {"matmul_alone_s": alone, "matmul_with_loads_s": busy, "slowdown": busy / alone - 1,
            "loads_during": loads[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device here")
    device = torch.device("cuda:0")
    copier = DeviceCopier(device)
    size = 1 << 30
    segment = SharedSegment.create(f"kvmesh-gpu-check-{uuid.uuid4().hex[:8]}", size, prefault=True)
    report: dict[str, object] = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__,
                                 "cuda": torch.version.cuda}
    try:
        copier.pin(segment)
        report["host_to_device_peak_GBps"] = host_to_device_peak(device)
        report["layouts"] = [check_layout(layout, pattern, segment, copier, device, args.repeat)
                             for layout in ("LBHNC", "LBNHC", "BLHNC", "MLA") for pattern in ("runs", "scattered")]
        report["overlap"] = overlap_cost(segment, copier, device)
    finally:
        segment.close()
        segment.unlink()
    rows = report["layouts"]
    assert isinstance(rows, list)
    report["all_bit_exact"] = all(row["bit_exact"] for row in rows)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
