"""Long-document QA: time to first token of the systems a user could pick, side by side in one run.

Usage:
    .venv/bin/python benchmarks/bench_longdoc.py [--lengths 2000 3500 8000] [--systems ...] [--out results/longdoc]

For each prompt length L and each system, one engine is started with a KV pool that holds one L-token
request, so the next document evicts the previous one. The sequence per engine: a short warm-up request,
document A (cold), A again (vLLM's own prefix-cache hit), document B (cold; evicts A), A again
("warm after eviction": served by the system's external cache, if it has one). Every engine runs with
VLLM_CPU_NUM_OF_RESERVED_CPU=0 (see PEERS.md). LMCache runs in multi-process mode from its own
virtual environment (benchmarks/peers/setup_lmcache.sh).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from kvmesh.bench.openai_client import stream_completion
from kvmesh.bench.servers import EngineServer, EngineSpec, free_port
from kvmesh.bench.texts import document_token_ids
from kvmesh.client import KVMeshClient
from kvmesh.config import KVMeshConfig
from kvmesh.demo.model import default_model_dir, prepare_demo_model

REPO = Path(__file__).resolve().parents[1]
SYSTEMS = ("vllm", "example", "lmcache", "kvmesh")


@dataclass
class Row:
    system: str
    length: int
    cold: float  # A, first time
    engine_hit: float  # A again, from vLLM's own prefix cache
    cold_b: float  # B, first time (a second cold sample)
    warm: float  # A after B evicted it from the engine
    error: str | None = None  # the system failed (its error, shortened); timings are NaN
    loaded_tokens: int | None = None
    load_gbps: float | None = None
    store_gbps: float | None = None
    store_ms_per_request: float | None = None


def lmcache_server(venv: Path, port: int, log: Path) -> subprocess.Popen:
    argv = [str(venv / "bin" / "lmcache"), "server", "--host", "localhost", "--port", str(port), "--chunk-size",
            "256", "--l1-size-gb", "2", "--eviction-policy", "LRU", "--max-workers", "1",
            "--supported-transfer-mode", "auto"]
    with open(log, "ab") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True)
    deadline = time.monotonic() + 180
    while "running" not in log.read_text(errors="replace").lower():
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"LMCache server did not start; see {log}")
        time.sleep(1)
    return process


def engine_spec(system: str, model: str, length: int, work: Path, lmcache_port: int | None,
                lmcache_python: str | None, kvmesh_settings: dict[str, object]) -> EngineSpec:
    max_len = min(8192, -(-(length + 64) // 128) * 128)
    # vLLM wants room for one max-length request plus a block; two spare blocks, no more, so B evicts A
    spec = EngineSpec(model, kv_pool_tokens=max_len + 2 * 128, max_model_len=max_len)
    if system == "example":
        config = {"kv_connector": "ExampleConnector", "kv_role": "kv_both",
                  "kv_connector_extra_config": {"shared_storage_path": str(work / f"example-{length}")}}
        spec.extra_args = ["--kv-transfer-config", json.dumps(config)]
    elif system == "lmcache":
        config = {"kv_connector": "LMCacheMPConnector", "kv_role": "kv_both",
                  "kv_connector_extra_config": {"lmcache.mp.host": "tcp://localhost", "lmcache.mp.port": lmcache_port,
                                                "lmcache.mp.mq_timeout": 60.0}}
        spec.extra_args = ["--kv-transfer-config", json.dumps(config)]
        spec.python = lmcache_python or spec.python
    elif system == "kvmesh":
        spec.kvmesh = kvmesh_settings
    return spec


def run_one(system: str, spec: EngineSpec, docs: list[list[int]], warmup: list[int], log: Path,
            kvmesh_settings: dict[str, object]) -> Row:
    answer = 16
    with EngineServer(spec, log) as server:
        def ttft(prompt: list[int]) -> float:
            return stream_completion(server.base_url, server.model, prompt, answer).ttft

        ttft(warmup)
        cold = ttft(docs[0])
        hit = ttft(docs[0])
        cold_b = ttft(docs[1])
        before = _kvmesh_metrics(kvmesh_settings) if system == "kvmesh" else {}
        warm = ttft(docs[0])
        row = Row(system, len(docs[0]), cold, hit, cold_b, warm)
        if system == "kvmesh":
            after = _kvmesh_metrics(kvmesh_settings)
            row.loaded_tokens = int(after["kvmesh_loaded_tokens_total"] - before["kvmesh_loaded_tokens_total"])
            row.load_gbps = _rate(after, "kvmesh_loaded_bytes_total", "kvmesh_load_seconds_sum")
            row.store_gbps = _rate(after, "kvmesh_stored_bytes_total", "kvmesh_store_seconds_sum")
            stores = after.get("kvmesh_store_seconds_count", 0)
            row.store_ms_per_request = after["kvmesh_store_seconds_sum"] / stores * 1e3 if stores else None
    return row


def _kvmesh_metrics(settings: dict[str, object]) -> dict[str, float]:
    with KVMeshClient(KVMeshConfig.load({**settings, "autostart_daemon": False}, env={})) as client:
        return client.metrics()


def _rate(metrics: dict[str, float], bytes_key: str, seconds_key: str) -> float | None:
    seconds = metrics.get(seconds_key, 0.0)
    return metrics.get(bytes_key, 0.0) / seconds / 1e9 if seconds else None


def table(rows: list[Row]) -> str:
    lines = ["| prompt tokens | system | cold TTFT s (A / B) | vLLM own hit s | warm after eviction s | "
             "warm / own hit | cold / warm |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        if row.error:
            lines.append(f"| {row.length:,} | {row.system} | failed: {row.error.splitlines()[0]} | | | | |")
            continue
        lines.append(f"| {row.length:,} | {row.system} | {row.cold:.3f} / {row.cold_b:.3f} | {row.engine_hit:.3f} | "
                     f"{row.warm:.3f} | {row.warm / row.engine_hit:.2f}x | {row.cold / row.warm:.1f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[2000, 3500, 8000])
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    parser.add_argument("--out", type=Path, default=REPO / "results" / "longdoc")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    from transformers import AutoTokenizer

    model = str(prepare_demo_model(default_model_dir()))
    tokenizer = AutoTokenizer.from_pretrained(model, local_files_only=True)
    work = Path(tempfile.mkdtemp(prefix="kvmesh-longdoc-"))
    kvmesh_settings: dict[str, object] = {"instance": f"bench-{uuid.uuid4().hex[:6]}", "socket_dir": str(work),
                                          "l1_size": "2GiB", "http_port": 0}
    lmcache = None
    lmcache_port = free_port()
    lmcache_python = None
    if "lmcache" in args.systems:
        venv = Path(subprocess.run(["bash", str(REPO / "benchmarks/peers/setup_lmcache.sh")], check=True,
                                   capture_output=True, text=True).stdout.strip())
        lmcache_python = str(venv / "bin" / "python")
        lmcache = lmcache_server(venv, lmcache_port, args.out / "lmcache-server.log")
    rows: list[Row] = []
    try:
        for index, length in enumerate(args.lengths):
            docs = document_token_ids(tokenizer, 3, length, seed=100 + index)
            warmup, docs = docs[2][:256], docs[:2]
            for system in args.systems:
                spec = engine_spec(system, model, length, work, lmcache_port, lmcache_python, kvmesh_settings)
                try:
                    row = run_one(system, spec, docs, warmup, args.out / f"{system}-{length}.log", kvmesh_settings)
                except Exception as err:  # noqa: BLE001 - a crashing peer is a result, not the end of the run
                    nan = float("nan")
                    row = Row(system, length, nan, nan, nan, nan, error=f"{type(err).__name__}: {str(err)[:160]}")
                rows.append(row)
                print(json.dumps(asdict(row)), flush=True)
    finally:
        if lmcache is not None:
            os.killpg(lmcache.pid, signal.SIGTERM)
            lmcache.wait(timeout=60)
        try:
            with KVMeshClient(KVMeshConfig.load({**kvmesh_settings, "autostart_daemon": False}, env={})) as c:
                c.shutdown_daemon()
        except ConnectionError:
            pass
    (args.out / "results.json").write_text(json.dumps([asdict(r) for r in rows], indent=2))
    print(table(rows))
    kvmesh_rows = [r for r in rows if r.system == "kvmesh"]
    if kvmesh_rows:
        print("kvmesh load GB/s (engine-side, cumulative):", [round(r.load_gbps or 0, 2) for r in kvmesh_rows])
        print("kvmesh store GB/s:", [round(r.store_gbps or 0, 2) for r in kvmesh_rows],
              "store ms per request:", [round(r.store_ms_per_request or 0, 1) for r in kvmesh_rows])
        vanilla = {r.length: r for r in rows if r.system == "vllm"}
        for r in kvmesh_rows:
            if r.length in vanilla:
                v = vanilla[r.length]
                overhead = statistics.median([r.cold, r.cold_b]) / statistics.median([v.cold, v.cold_b]) - 1
                print(f"miss overhead at {r.length}: {overhead:+.1%} (median of 2 cold requests each)")


if __name__ == "__main__":
    main()
