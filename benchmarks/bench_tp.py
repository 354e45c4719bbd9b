"""Tensor parallelism: time to first token cold, from vLLM's own cache and from kvmesh, at TP=1 and TP=2.

The model is the demo model with two KV groups (``kvmesh.demo.variants.fewer_heads``: 6 heads, so two workers
hold one KV head each).  Each configuration runs one ``kvmesh serve`` engine whose own pool holds one
document; per round: document A cold, A again (vLLM's own hit), document B cold (A leaves the pool), A again
(served from kvmesh, each worker loading its own heads).  Medians over ``--rounds`` fresh documents.
TP=2 runs one worker per core (``VLLM_CPU_OMP_THREADS_BIND=0|1``), TP=1 one worker on both cores.

    python benchmarks/bench_tp.py --tokens 2000 --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import uuid
from pathlib import Path

from kvmesh.bench.openai_client import stream_completion
from kvmesh.bench.servers import EngineServer, EngineSpec
from kvmesh.bench.texts import document_token_ids
from kvmesh.client import KVMeshClient
from kvmesh.client.stop import stop_daemon
from kvmesh.config import KVMeshConfig
from kvmesh.demo.model import default_model_dir, prepare_demo_model
from kvmesh.demo.variants import fewer_heads

CONFIGS = {"tp1": ([], {"VLLM_CPU_OMP_THREADS_BIND": "0-1"}, 1),
           "tp2": (["--tensor-parallel-size", "2", "--distributed-executor-backend", "mp"],
                   {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}, 2)}


def run(config: str, model: str, docs: list[list[int]], tokens: int, work: Path) -> dict[str, list[float]]:
    args, env, world = CONFIGS[config]
    return warm_vs_cold(config, model, docs, tokens, work, args, env, world)


def warm_vs_cold(label: str, model: str, docs: list[list[int]], tokens: int, work: Path, args: list[str],
                 env: dict[str, str], world: int = 1, pool_margin: int = 400,
                 pool_in_blocks: bool = False, evictors: list[list[int]] | None = None) -> dict[str, list[float]]:
    """TTFTs of one ``kvmesh serve`` engine: cold, vLLM's own hit, from kvmesh after eviction (a list each).

    ``pool_in_blocks``: size the engine's pool in 128-token blocks (``--num-gpu-blocks-override``), for models
    whose state and attention groups share blocks; else in bytes, from the KV one token takes.  ``evictors``:
    more cold prompts after B (a sliding-window engine keeps its own hit of A through B alone).
    """
    settings: dict[str, object] = {"instance": f"bench-{uuid.uuid4().hex[:6]}", "socket_dir": str(work / "sock"),
                                   "disk_path": "", "l1_size": "2GiB", "http_port": 0}
    # the pool holds one document (per worker: its share of the heads, so the bytes are divided by the world)
    pool_tokens: int | None = (tokens + pool_margin) // world
    if pool_in_blocks:
        args = [*args, "--num-gpu-blocks-override", str(-(-(tokens + pool_margin) // 128))]
        pool_tokens = None
    spec = EngineSpec(model, kvmesh=settings, kv_pool_tokens=pool_tokens, max_model_len=tokens + 64,
                      extra_args=args, extra_env=env, embedded_defaults=True)
    times: dict[str, list[float]] = {"cold": [], "own hit": [], "from kvmesh": [], "loaded": [], "stored bytes": [],
                                     "stored tokens": []}
    try:
        with EngineServer(spec, work / f"{label}.log") as server:
            stream_completion(server.base_url, model, docs[-1][:64], 4)  # warm-up
            for round_index in range(0, len(docs) - 1, 2):
                a, b = docs[round_index], docs[round_index + 1]
                times["cold"].append(stream_completion(server.base_url, model, a, 8).ttft)
                times["own hit"].append(stream_completion(server.base_url, model, a, 8).ttft)
                stream_completion(server.base_url, model, b, 8)
                for evictor in evictors or []:
                    stream_completion(server.base_url, model, evictor, 8)
                with KVMeshClient(KVMeshConfig.load({**settings, "autostart_daemon": False}, env={})) as client:
                    before = client.metrics().get("kvmesh_loaded_tokens_total", 0.0)
                    times["from kvmesh"].append(stream_completion(server.base_url, model, a, 8).ttft)
                    metrics = client.metrics()
                times["loaded"].append(metrics.get("kvmesh_loaded_tokens_total", 0.0) - before)
            times["stored bytes"].append(metrics.get("kvmesh_stored_bytes_total", 0.0))
            times["stored tokens"].append(metrics.get("kvmesh_stored_tokens_total", 0.0))
    finally:
        stop_daemon(KVMeshConfig.load({**settings, "autostart_daemon": False}, env={}), settle=2.0)
    print(f"{label}: loaded tokens per warm request {times['loaded']}")
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--configs", default="tp1,tp2")
    parser.add_argument("--workdir", type=Path, help="keep the engines' logs here (default: a temporary folder)")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="bench-tp-") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        model = str(fewer_heads(prepare_demo_model(default_model_dir()), work / "model", kv_heads=2))
        tokenizer = AutoTokenizer.from_pretrained(model, local_files_only=True)
        docs = document_token_ids(tokenizer, 2 * args.rounds + 1, args.tokens, seed=5)
        rows = {config: run(config, model, docs, args.tokens, work) for config in args.configs.split(",")}
    print(f"\n{args.tokens}-token prompts, medians of {args.rounds} (TTFT, s)")
    print("| config | cold | vLLM's own hit | from kvmesh after eviction | cold / from kvmesh |")
    print("| --- | --- | --- | --- | --- |")
    for config, times in rows.items():
        cold, own, warm = (statistics.median(times[k]) for k in ("cold", "own hit", "from kvmesh"))
        print(f"| {config} | {cold:.3f} | {own:.3f} | {warm:.3f} | {cold / warm:.1f}x |")


if __name__ == "__main__":
    main()
