"""Multi-round QA (users returning after their history left the engine's pool): throughput, TTFT, fidelity.

Usage:
    .venv/bin/python benchmarks/bench_multiturn.py [--users 20 --rounds 4 --context 1500] [--systems ...]

Requests are sent one at a time, round-robin over users, so each user's history is evicted from the
engine's ~4,200-token pool before the user returns. Systems (one engine each, same requests):
  nocache          vLLM, prefix caching off (the no-cache reference)
  vllm-big         vLLM, prefix caching on, a pool holding everything (the ideal in-engine hit; the fidelity reference)
  vllm             vLLM, prefix caching on, the small pool
  kvmesh           vLLM + kvmesh, default settings (256-token chunks, partial chunks on), the small pool
  kvmesh-full      vLLM + kvmesh with partial chunks off (hits stop at whole chunks, like LMCache)
  lmcache          vLLM + LMCache multi-process mode, the small pool
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
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kvmesh.bench.openai_client import stream_completion
from kvmesh.bench.servers import EngineServer, EngineSpec, free_port
from kvmesh.bench.workloads import MultiRoundSpec, multi_round
from kvmesh.client import KVMeshClient
from kvmesh.config import KVMeshConfig
from kvmesh.model import default_model_dir, prepare_demo_model

REPO = Path(__file__).resolve().parents[1]
BYTES_PER_TOKEN = 23_040
SMALL_POOL = 33 * 128 * BYTES_PER_TOKEN  # 4,224 tokens
SYSTEMS = ("nocache", "vllm-big", "vllm", "kvmesh", "kvmesh-full", "lmcache")


@dataclass
class Result:
    system: str
    seconds: float
    ttfts: list[float] = field(default_factory=list)
    rounds: list[int] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)
    loaded_tokens: int | None = None

    def summary(self, references: dict[str, "Result"]) -> dict[str, object]:
        returning = [t for t, r in zip(self.ttfts, self.rounds) if r > 0]
        first = [t for t, r in zip(self.ttfts, self.rounds) if r == 0]
        out: dict[str, object] = {
            "system": self.system, "requests": len(self.ttfts), "req_per_s": len(self.ttfts) / self.seconds,
            "mean_ttft_first_round": statistics.mean(first), "mean_ttft_returning": statistics.mean(returning),
            "p90_ttft_returning": sorted(returning)[int(0.9 * (len(returning) - 1))],
            "loaded_tokens": self.loaded_tokens}
        for name, ref in references.items():
            out[f"equal_to_{name}"] = sum(a == b for a, b in zip(self.answers, ref.answers))
        return out


def spec_for(system: str, model: str, work: Path, lmcache: tuple[int, str] | None) -> EngineSpec:
    spec = EngineSpec(model, kv_cache_bytes=SMALL_POOL, max_model_len=4096)
    if system == "nocache":
        spec.prefix_caching = False
    elif system == "vllm-big":
        spec.kv_cache_bytes = 400 * 128 * BYTES_PER_TOKEN
    elif system in ("kvmesh", "kvmesh-full"):
        spec.kvmesh = {"instance": f"mt-{system}-{uuid.uuid4().hex[:6]}", "socket_dir": str(work),
                       "l1_size": "4GiB", "http_port": 0, "save_partial_chunks": system == "kvmesh"}
    elif system == "lmcache":
        assert lmcache is not None
        port, python = lmcache
        config = {"kv_connector": "LMCacheMPConnector", "kv_role": "kv_both",
                  "kv_connector_extra_config": {"lmcache.mp.host": "tcp://localhost", "lmcache.mp.port": port,
                                                "lmcache.mp.mq_timeout": 60.0}}
        spec.extra_args = ["--kv-transfer-config", json.dumps(config)]
        spec.python = python
    return spec


def run_system(system: str, spec: EngineSpec, requests, answer_tokens: int, log: Path) -> Result:  # noqa: ANN001
    with EngineServer(spec, log) as server:
        stream_completion(server.base_url, server.model, requests[-1].prompt[:64], 4)  # warm-up
        result = Result(system, 0.0)
        started = time.perf_counter()
        for index, request in enumerate(requests):
            reply = stream_completion(server.base_url, server.model, request.prompt, answer_tokens)
            result.ttfts.append(reply.ttft)
            result.rounds.append(request.round)
            result.answers.append(reply.text)
            if (index + 1) % 20 == 0:
                print(f"  {system}: {index + 1}/{len(requests)} requests", flush=True)
        result.seconds = time.perf_counter() - started
        if spec.kvmesh is not None:
            config = KVMeshConfig.load({**spec.kvmesh, "autostart_daemon": False}, env={})
            with KVMeshClient(config) as client:
                result.loaded_tokens = int(client.metrics().get("kvmesh_loaded_tokens_total", 0))
                client.shutdown_daemon()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--context", type=int, default=1500)
    parser.add_argument("--answer-tokens", type=int, default=32)
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    parser.add_argument("--out", type=Path, default=REPO / "results" / "multiturn")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    from transformers import AutoTokenizer

    model = str(prepare_demo_model(default_model_dir()))
    tokenizer = AutoTokenizer.from_pretrained(model, local_files_only=True)
    requests = multi_round(tokenizer, MultiRoundSpec(users=args.users, rounds=args.rounds,
                                                     context_tokens=args.context))
    lengths = [len(r.prompt) for r in requests]
    print(f"{len(requests)} requests, prompts {min(lengths)}..{max(lengths)} tokens, "
          f"total distinct context ~{sum(len(r.prompt) for r in requests if r.round == args.rounds - 1):,} tokens")
    work = Path(tempfile.mkdtemp(prefix="kvmesh-mt-"))
    lmcache_server = None
    lmcache = None
    if "lmcache" in args.systems:
        from bench_longdoc import lmcache_server as start_lmcache  # noqa: PLC0415 - sibling script

        venv = Path(subprocess.run(["bash", str(REPO / "benchmarks/peers/setup_lmcache.sh")], check=True,
                                   capture_output=True, text=True).stdout.strip())
        port = free_port()
        lmcache_server = start_lmcache(venv, port, args.out / "lmcache-server.log")
        lmcache = (port, str(venv / "bin" / "python"))
    results: dict[str, Result] = {}
    try:
        for system in args.systems:
            print(f"{system} ...", flush=True)
            results[system] = run_system(system, spec_for(system, model, work, lmcache), requests,
                                         args.answer_tokens, args.out / f"{system}.log")
    finally:
        if lmcache_server is not None:
            os.killpg(lmcache_server.pid, signal.SIGTERM)
            lmcache_server.wait(timeout=60)
    references = {name: results[name] for name in ("nocache", "vllm-big") if name in results}
    summaries = [r.summary(references) for r in results.values()]
    (args.out / "results.json").write_text(json.dumps({"summaries": summaries,
                                                        "runs": [asdict(r) for r in results.values()]}, indent=2))
    keys = [k for k in summaries[0] if k != "system"]
    print("| system | " + " | ".join(keys) + " |")
    print("| --- " * (len(keys) + 1) + "|")
    for s in summaries:
        print(f"| {s['system']} | " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v)
                                                for k, v in s.items() if k != "system") + " |")


if __name__ == "__main__":
    main()
