"""Background loads (``load_async=on``) against loads before the step (``off``) on vLLM's CPU backend.

For each mode, one engine with kvmesh (vLLM's own prefix cache off, so every returning prompt is loaded from
kvmesh's L1) and its own daemon:

1. ``--prompts`` prompts of ``--prompt-tokens`` tokens are computed once and stored;
2. idle: each is asked again alone (one answer token): its TTFT;
3. busy, ``--rounds`` times: request D (a short prompt, ``--decode-tokens`` greedy tokens) decodes, and after
   ``--delay`` s the stored prompts return one after another while it does.

Printed per mode: the returning prompts' TTFT alone and beside D (medians), and D's inter-token gaps while
they load (p50, p99, max; gaps whose interval overlaps a returning request) against D alone.

    .venv/bin/python benchmarks/bench_load_async.py --modes off,on --rounds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
import uuid
from pathlib import Path

from kvmesh.bench.openai_client import CompletionResult, stream_completion
from kvmesh.bench.servers import EngineServer, EngineSpec, free_port
from kvmesh.bench.texts import document_token_ids, question_prompt
from kvmesh.client import KVMeshClient
from kvmesh.client.stop import stop_daemon
from kvmesh.config import KVMeshConfig
from kvmesh.demo.model import default_model_dir, prepare_demo_model


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def gap_intervals(result: CompletionResult, started: float) -> list[tuple[float, float]]:
    """D's inter-token gaps as (start, end) on the perf_counter clock (token times count from ``started``)."""
    times = [started + t for t in result.token_times]
    return list(zip(times, times[1:]))


def run_mode(mode: str, model: str, prompts: list[list[int]], decode_prompt: list[int], args: argparse.Namespace,
             work: Path) -> dict[str, object]:
    settings: dict[str, object] = {
        "instance": f"async-{mode}-{uuid.uuid4().hex[:6]}", "socket_dir": str(work / f"sock-{mode}"),
        "l1_size": "2GiB", "l1_prefault": False, "http_port": free_port(), "load_async": mode,
    }
    spec = EngineSpec(model, kvmesh=settings, kv_pool_tokens=args.prompt_tokens * 3,
                      max_model_len=args.prompt_tokens + 512, prefix_caching=False)
    config = KVMeshConfig.load({**settings, "autostart_daemon": False}, env={})
    idle, busy, disturbed, alone_gaps = [], [], [], []
    try:
        with EngineServer(spec, work / f"engine-{mode}.log") as server:
            stream_completion(server.base_url, model, decode_prompt, 8)  # warm-up
            for prompt in prompts:
                stream_completion(server.base_url, model, prompt, 1)  # computed, stored
            for _ in range(2):
                for prompt in prompts:
                    idle.append(stream_completion(server.base_url, model, prompt, 1).ttft)
            for _ in range(args.rounds):
                alone = stream_completion(server.base_url, model, decode_prompt, args.decode_tokens)
                alone_gaps += [b - a for a, b in zip(alone.token_times, alone.token_times[1:])]
                results: dict[str, CompletionResult] = {}
                started = time.perf_counter()
                decoder = threading.Thread(target=lambda: results.update(
                    d=stream_completion(server.base_url, model, decode_prompt, args.decode_tokens)))
                decoder.start()
                time.sleep(args.delay)
                windows = []
                for prompt in prompts:
                    sent = time.perf_counter()
                    answer = stream_completion(server.base_url, model, prompt, 1)
                    windows.append((sent, time.perf_counter()))
                    busy.append(answer.ttft)
                decoder.join()
                for start, end in gap_intervals(results["d"], started):
                    if any(start < w_end and end > w_start for w_start, w_end in windows):
                        disturbed.append(end - start)
            with KVMeshClient(config) as client:
                loaded = client.metrics().get("kvmesh_loaded_tokens_total", 0.0)
    finally:
        stop_daemon(config, settle=10.0)
    row = {
        "mode": mode, "loaded_tokens": loaded, "ttft_idle": statistics.median(idle),
        "ttft_beside_decode": statistics.median(busy),
        "itl_p50_during_loads": percentile(disturbed, 50), "itl_p99_during_loads": percentile(disturbed, 99),
        "itl_max_during_loads": max(disturbed), "itl_p50_alone": percentile(alone_gaps, 50),
        "itl_p99_alone": percentile(alone_gaps, 99), "gaps_during_loads": len(disturbed),
    }
    print(f"load_async={mode}: TTFT alone {row['ttft_idle']:.3f}s, beside a decode {row['ttft_beside_decode']:.3f}s"
          f" | D's gaps during loads p50 {row['itl_p50_during_loads'] * 1e3:.1f} ms, p99 "
          f"{row['itl_p99_during_loads'] * 1e3:.1f} ms, max {row['itl_max_during_loads'] * 1e3:.1f} ms "
          f"({len(disturbed)} gaps) | D alone p50 {row['itl_p50_alone'] * 1e3:.1f} ms, p99 "
          f"{row['itl_p99_alone'] * 1e3:.1f} ms | {loaded:,.0f} tokens loaded", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", default="off,on", help="load_async values to compare, in order")
    parser.add_argument("--prompt-tokens", type=int, default=4000)
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--decode-tokens", type=int, default=200)
    parser.add_argument("--delay", type=float, default=1.0, help="seconds of D's decoding before the prompts return")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()

    model = str(prepare_demo_model(default_model_dir()))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model, local_files_only=True)
    docs = document_token_ids(tokenizer, args.prompts + 1, args.prompt_tokens, seed=13)
    prompts = [question_prompt(tokenizer, doc, "What is this about?") for doc in docs[:-1]]
    decode_prompt = question_prompt(tokenizer, docs[-1][:40], "Write a long story about it.")
    work = Path(tempfile.mkdtemp(prefix="kvmesh-async-"))
    rows = [run_mode(mode, model, prompts, decode_prompt, args, work) for mode in args.modes.split(",")]
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
