"""Blending in vLLM-CPU: TTFT and answers of RAG prompts whose passages come back in another order.

Each prompt is a chat: a system line, ``--per-prompt`` passages of ``--passage-tokens`` tokens drawn from a pool
(each its own user message) in a shuffled order, and a question.  Every passage of the pool is first seen in
warm-up prompts (stored by kvmesh as it goes), then each measured prompt is sent, one at a time:

* kvmesh serve --blend, the request asking for a blend;
* the same engine, the same prompt without blend: a full prefill (no exact prefix of a shuffled prompt is
  stored, and vLLM's own prefix cache is off in a blending engine) whose answer is the exact one;
* plain vLLM with its prefix cache on, after the same warm-up (``--skip-plain`` leaves it out);
* with ``--lmcache``: vLLM + LMCache's multi-process server with its CacheBlend engine (``--engine-type blend``,
  LMCache's own virtual environment: ``bash benchmarks/peers/setup_lmcache.sh``), after the same warm-up.

Reported: median TTFT of each, the blend's speed-up over the full prefill, how many greedy answers equal the
exact one (and their common prefix in tokens), and where the blend's time went (from the engine's debug log:
reading the prefix and the stored passages, the blend compute, writing the pages).

    python benchmarks/bench_blend.py --prompts 6
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import tempfile
import uuid
from pathlib import Path

from kvmesh.bench.openai_client import stream_completion
from kvmesh.bench.servers import EngineServer, EngineSpec
from kvmesh.bench.texts import document_token_ids
from kvmesh.client.stop import stop_daemon
from kvmesh.config import KVMeshConfig
from kvmesh.demo.model import default_model_dir, prepare_demo_model

QUESTION = "Which two passages are closest in topic, and why?"
BLEND = {"kv_transfer_params": {"kvmesh": {"blend": True}}}
TIMES = re.compile(r"blended request \S+ tokens (\d+)-(\d+): (\d+) passages reused, (\d+) tokens recomputed; "
                   r"read ([\d.]+)s, compute ([\d.]+)s, write ([\d.]+)s")


def _prompts(tokenizer, args) -> tuple[list[list[int]], list[list[int]]]:
    pool = [tokenizer.decode(doc) for doc in document_token_ids(tokenizer, args.pool, args.passage_tokens, seed=5)]

    def chat(order: list[int], question: str) -> list[int]:
        messages = ([{"role": "system", "content": "Answer from the passages."}]
                    + [{"role": "user", "content": pool[i]} for i in order] + [{"role": "user", "content": question}])
        ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

    rng = random.Random(args.seed)
    warm = [chat(list(range(start, min(start + args.per_prompt, args.pool))), "Summarize the passages.")
            for start in range(0, args.pool, args.per_prompt)]
    measured = [chat(rng.sample(range(args.pool), args.per_prompt), QUESTION) for _ in range(args.prompts)]
    return warm, measured


def _common_tokens(tokenizer, a: str, b: str) -> int:
    first, second = tokenizer.encode(a, add_special_tokens=False), tokenizer.encode(b, add_special_tokens=False)
    same = 0
    for x, y in zip(first, second):
        if x != y:
            break
        same += 1
    return same


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=6)
    parser.add_argument("--pool", type=int, default=16)
    parser.add_argument("--per-prompt", type=int, default=8)
    parser.add_argument("--passage-tokens", type=int, default=480)
    parser.add_argument("--answer", type=int, default=32)
    parser.add_argument("--fraction", type=float, default=None, help="blend_fraction (kvmesh's default if unset)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-plain", action="store_true")
    parser.add_argument("--lmcache", action="store_true", help="also LMCache's blend engine (its own venv)")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    model = str(prepare_demo_model(default_model_dir()))
    tokenizer = AutoTokenizer.from_pretrained(model, local_files_only=True)
    warm, measured = _prompts(tokenizer, args)
    max_len = max(len(p) for p in warm + measured) + args.answer + 16
    work = Path(tempfile.mkdtemp(prefix="bench-blend-"))
    os.chmod(work, 0o700)
    settings: dict[str, object] = {"instance": f"bench-blend-{uuid.uuid4().hex[:6]}", "socket_dir": str(work),
                                   "l1_size": "2GiB", "http_port": 0, "disk_path": "", "log_level": "debug"}
    if args.fraction is not None:
        settings["blend_fraction"] = args.fraction
    env = {"VLLM_CPU_OMP_THREADS_BIND": "0-1"}
    results: dict[str, list] = {"blend": [], "full": [], "plain": [], "lmcache": [],
                                "tokens": [len(p) for p in measured]}
    blend_log = work / "blend.log"
    spec = EngineSpec(model, kvmesh=settings, blend=True, max_model_len=max_len, kv_pool_tokens=2 * max_len,
                      extra_env=env)
    try:
        with EngineServer(spec, blend_log) as server:
            for prompt in warm:
                stream_completion(server.base_url, model, prompt, 1, extra=BLEND)
            for index, prompt in enumerate(measured):
                blended = stream_completion(server.base_url, model, prompt, args.answer, extra=BLEND)
                full = stream_completion(server.base_url, model, prompt, args.answer)
                results["blend"].append((blended.ttft, blended.text))
                results["full"].append((full.ttft, full.text))
                print(f"prompt {index} ({len(prompt)} tokens): blend {blended.ttft:.3f}s, full prefill "
                      f"{full.ttft:.3f}s, same answer: {blended.text == full.text}", flush=True)
    finally:
        stop_daemon(KVMeshConfig.load({**settings, "autostart_daemon": False}, env={}), settle=10.0)
    if not args.skip_plain:
        plain_spec = EngineSpec(model, kvmesh=None, max_model_len=max_len, kv_pool_tokens=8 * max_len, extra_env=env)
        with EngineServer(plain_spec, work / "plain.log") as server:
            for prompt in warm:
                stream_completion(server.base_url, model, prompt, 1)
            for prompt in measured:
                results["plain"].append((stream_completion(server.base_url, model, prompt, args.answer).ttft, ""))
    if args.lmcache:
        from kvmesh.bench.systems import prepare_system

        system = prepare_system("lmcache-blend", model, 2 * max_len, max_len, work, 2 * max_len)
        system.spec.extra_env = env
        try:
            with EngineServer(system.spec, work / "lmcache.log") as server:
                for prompt in warm:
                    stream_completion(server.base_url, model, prompt, 1)
                for index, prompt in enumerate(measured):
                    reply = stream_completion(server.base_url, model, prompt, args.answer)
                    results["lmcache"].append((reply.ttft, reply.text))
                    print(f"prompt {index}: LMCache blend {reply.ttft:.3f}s, same answer as the exact one: "
                          f"{reply.text == results['full'][index][1]}", flush=True)
        finally:
            system.cleanup()
        hits = re.findall(r"[Hh]it[^\n]{0,120}", (work / "lmcache-blend-server.log").read_text(errors="replace"))
        print(f"LMCache server log lines about hits: {hits[-3:]}")
    phases = [tuple(float(x) for x in m.groups()) for m in TIMES.finditer(blend_log.read_text(errors="replace"))]
    phases = phases[-len(measured):]
    blend_ttft = statistics.median(t for t, _ in results["blend"])
    full_ttft = statistics.median(t for t, _ in results["full"])
    same = sum(b == f for (_, b), (_, f) in zip(results["blend"], results["full"]))
    common = [_common_tokens(tokenizer, b, f) for (_, b), (_, f) in zip(results["blend"], results["full"])]
    print(f"\n{len(measured)} prompts of {statistics.median(results['tokens']):.0f} tokens (median), "
          f"{args.per_prompt} passages of {args.passage_tokens} tokens each, shuffled")
    print("| system | median TTFT (s) |\n| --- | --- |")
    print(f"| full prefill (kvmesh engine, no blend) | {full_ttft:.3f} |")
    if results["plain"]:
        print(f"| vLLM's prefix cache (plain vLLM) | {statistics.median(t for t, _ in results['plain']):.3f} |")
    print(f"| kvmesh blend | {blend_ttft:.3f} |")
    if results["lmcache"]:
        same_lm = sum(a == f for (_, a), (_, f) in zip(results["lmcache"], results["full"]))
        print(f"| LMCache, --engine-type blend | {statistics.median(t for t, _ in results['lmcache']):.3f} "
              f"(answers equal to the exact one: {same_lm}/{len(measured)}) |")
    print(f"speed-up over full prefill: {full_ttft / blend_ttft:.2f}x; greedy answers equal to the exact one: "
          f"{same}/{len(measured)}; common prefix (tokens of {args.answer}): median {statistics.median(common)}")
    if phases:
        read, compute, write = (statistics.median(p[i] for p in phases) for i in (4, 5, 6))
        recomputed = statistics.median(p[3] for p in phases)
        span = statistics.median(p[1] - p[0] for p in phases)
        print(f"blend phases (median): read {read:.3f}s, compute {compute:.3f}s, write {write:.3f}s; "
              f"{recomputed:.0f} of {span:.0f} blended tokens recomputed after layer 1")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "results": results, "phases": phases}, indent=1))


if __name__ == "__main__":
    main()
