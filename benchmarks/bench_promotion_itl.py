"""Does a load from disk stall the other requests?  Inter-token latency of a decoding request while
another request's KV is promoted from disk.

One vLLM engine with kvmesh (disk tier on, vLLM's own prefix cache off so every hit comes from kvmesh).
Per round:

1. request P (a ~4k-token prompt) is computed once and stored (L1, then written behind to disk);
2. the node daemon is restarted (empty L1) and the disk files are dropped from the page cache, so P's
   chunks are on cold disk only;
3. request D (a short prompt, ``--decode-tokens`` greedy tokens) starts decoding; after ``--delay`` s,
   P is sent (one answer token): its chunks must come up from disk while D decodes;
4. D alone again, undisturbed (P is now in L1; nothing else runs).

Printed: D's inter-token gaps (p50, p99, max) with the promotion and undisturbed, the ratio, and P's
time to first token.  Compare kvmesh versions by running this with each on ``PYTHONPATH``.

    .venv/bin/python benchmarks/bench_promotion_itl.py --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
import uuid
from pathlib import Path

from kvmesh.bench.openai_client import CompletionResult, stream_completion
from kvmesh.bench.servers import EngineServer, EngineSpec
from kvmesh.bench.texts import document_token_ids, question_prompt
from kvmesh.client import KVMeshClient
from kvmesh.config import KVMeshConfig
from kvmesh.demo.model import default_model_dir, prepare_demo_model


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def gaps(result: CompletionResult) -> list[float]:
    return [b - a for a, b in zip(result.token_times, result.token_times[1:])]


def drop_page_cache(directory: Path) -> int:
    """Ask the kernel to forget the cached pages of every file under ``directory`` (cold reads next)."""
    count = 0
    for path in directory.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                count += 1
            finally:
                os.close(fd)
    return count


def restart_daemon(settings: dict[str, object]) -> None:
    config = KVMeshConfig.load(settings, env={})
    with KVMeshClient(KVMeshConfig.from_mapping({"autostart_daemon": False}, base=config)) as client:
        client.flush()
        client.shutdown_daemon()
    with KVMeshClient(config):  # start the new daemon now, not inside the measured requests
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompt-tokens", type=int, default=4000)
    parser.add_argument("--decode-tokens", type=int, default=300)
    parser.add_argument("--delay", type=float, default=1.0, help="seconds of D's decoding before P is sent")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--work-dir", default="/var/tmp", help="where the disk tier lives (a real disk)")
    parser.add_argument("--json", help="write the raw figures here")
    parser.add_argument("--kvmesh-set", action="append", default=[], metavar="KEY=VALUE",
                        help="a kvmesh setting for the engine and its daemon (repeatable)")
    args = parser.parse_args()

    model = str(prepare_demo_model(default_model_dir()))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model, local_files_only=True)
    work = Path(tempfile.mkdtemp(prefix="kvmesh-itl-", dir=args.work_dir))
    settings: dict[str, object] = {
        "instance": f"itl-{uuid.uuid4().hex[:8]}", "socket_dir": str(work / "sock"), "l1_size": "1GiB",
        "l1_prefault": False, "http_port": 0, "disk_path": str(work / "disk"),
        **dict(item.split("=", 1) for item in args.kvmesh_set),
    }
    docs = document_token_ids(tokenizer, args.rounds + 1, args.prompt_tokens, seed=11)
    decode_prompt = question_prompt(tokenizer, docs[-1][:40], "Write a long story about it.")
    spec = EngineSpec(model, kvmesh=settings, kv_pool_tokens=13_000, max_model_len=args.prompt_tokens + 512,
                      prefix_caching=False)
    rows = []
    with EngineServer(spec, work / "engine.log") as server:
        stream_completion(server.base_url, model, decode_prompt, 8)  # warm-up
        for round_index in range(args.rounds):
            prompt = question_prompt(tokenizer, docs[round_index], "What is this about?")
            cold = stream_completion(server.base_url, model, prompt, 1)
            restart_daemon(settings)
            dropped = drop_page_cache(work / "disk")
            stream_completion(server.base_url, model, decode_prompt[:20], 2)  # the engine reconnects
            results: dict[str, CompletionResult] = {}
            decoder = threading.Thread(target=lambda results=results: results.update(
                d=stream_completion(server.base_url, model, decode_prompt, args.decode_tokens)))
            decoder.start()
            time.sleep(args.delay)
            promoted = stream_completion(server.base_url, model, prompt, 1)
            decoder.join()
            alone = stream_completion(server.base_url, model, decode_prompt, args.decode_tokens)
            disturbed, undisturbed = gaps(results["d"]), gaps(alone)
            row = {
                "round": round_index, "prompt_tokens": len(prompt), "files_dropped_from_cache": dropped,
                "p_cold_ttft": cold.ttft, "p_promoted_ttft": promoted.ttft,
                "itl_p50_with": percentile(disturbed, 50), "itl_p99_with": percentile(disturbed, 99),
                "itl_max_with": max(disturbed), "itl_p50_alone": percentile(undisturbed, 50),
                "itl_p99_alone": percentile(undisturbed, 99), "itl_max_alone": max(undisturbed),
            }
            rows.append(row)
            print(f"round {round_index}: P {len(prompt)} tokens, cold TTFT {cold.ttft:.3f}s, promoted from disk "
                  f"{promoted.ttft:.3f}s | D's ITL with promotion p50 {row['itl_p50_with'] * 1e3:.1f} ms, "
                  f"p99 {row['itl_p99_with'] * 1e3:.1f} ms, max {row['itl_max_with'] * 1e3:.1f} ms | alone p50 "
                  f"{row['itl_p50_alone'] * 1e3:.1f} ms, p99 {row['itl_p99_alone'] * 1e3:.1f} ms, max "
                  f"{row['itl_max_alone'] * 1e3:.1f} ms", flush=True)
    with KVMeshClient(KVMeshConfig.load({**settings, "autostart_daemon": False}, env={})) as client:
        metrics = client.metrics()
        client.shutdown_daemon()
    p99_ratio = statistics.median(r["itl_p99_with"] / r["itl_p99_alone"] for r in rows)
    max_ratio = statistics.median(r["itl_max_with"] / r["itl_max_alone"] for r in rows)
    print(f"median over rounds: p99 ITL with promotion / alone = {p99_ratio:.2f}x, max gap ratio {max_ratio:.2f}x; "
          f"P promoted TTFT {statistics.median(r['p_promoted_ttft'] for r in rows):.3f}s vs cold "
          f"{statistics.median(r['p_cold_ttft'] for r in rows):.3f}s; disk bytes read "
          f"{metrics.get('kvmesh_tier_read_bytes_total{tier=disk}', 0):,.0f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "p99_ratio": p99_ratio, "max_ratio": max_ratio},
                                              indent=2))


if __name__ == "__main__":
    main()
