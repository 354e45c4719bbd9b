"""Blending quality against a full prefill: each selection rule at each recompute fraction (transformers, fp32).

RAG-style prompts of real text: a short header, ``--passages`` passages of ``--passage-tokens`` tokens in a
shuffled order, then a continuation of ``--follow`` tokens read teacher-forced.  Every passage's KV is
computed alone at position 0 (as stored the first time it was seen) and blended into the prompt
(``kvmesh.blend.reference``).  Against a full prefill of the identical tokens: mean KL and top-1 agreement over
the continuation, and how many of ``--greedy`` greedy tokens agree.  Brackets in the same run: ``none`` (full
reuse, only the header recomputed) and a fraction of 1.0 (everything recomputed: must equal the prefill).

    python benchmarks/blend_quality.py --prompts 5
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from kvmesh.bench.texts import document_token_ids
from kvmesh.blend.quality import continuation_logprobs, divergence, greedy, matching_prefix
from kvmesh.blend.reference import Passage, blend, passage_kv
from kvmesh.demo.model import default_model_dir, prepare_demo_model

HEADER = "Answer the question using the documents below.\n\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=5)
    parser.add_argument("--passages", type=int, default=5)
    parser.add_argument("--passage-tokens", type=int, default=256)
    parser.add_argument("--follow", type=int, default=64)
    parser.add_argument("--greedy", type=int, default=32)
    parser.add_argument("--fractions", default="0.05,0.15,0.3")
    parser.add_argument("--rules", default="cacheblend,passage-start,kvmesh,random")
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = prepare_demo_model(default_model_dir())
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, local_files_only=True).eval()
    header = tokenizer(HEADER).input_ids
    docs = document_token_ids(tokenizer, args.prompts * (args.passages + 1), args.passage_tokens + args.follow,
                              seed=17)
    configs = [("none", 0.0)] + [(rule, float(f)) for f in args.fractions.split(",") for rule in args.rules.split(",")]
    configs.append(("cacheblend", 1.0))
    results: dict[tuple[str, float], list[tuple[float, float, int, int, float]]] = {c: [] for c in configs}
    shuffle = random.Random(3)
    for index in range(args.prompts):
        group = docs[index * (args.passages + 1):(index + 1) * (args.passages + 1)]
        texts = [doc[:args.passage_tokens] for doc in group[:-1]]
        stored = [passage_kv(model, text) for text in texts]
        order = list(range(args.passages))
        shuffle.shuffle(order)
        tokens, passages = list(header), []
        for which in order:
            passages.append(Passage(len(tokens), len(tokens) + len(texts[which]), stored[which]))
            tokens += texts[which]
        follow = group[-1][:args.follow]
        started = time.perf_counter()
        full = passage_kv(model, tokens)
        prefill_s = time.perf_counter() - started
        reference = continuation_logprobs(model, full, follow)
        reference_greedy = greedy(model, full, follow[0], args.greedy)
        for rule, fraction in configs:
            started = time.perf_counter()
            blended = blend(model, tokens, passages, rule, fraction)
            seconds = time.perf_counter() - started
            measured = divergence(reference, continuation_logprobs(model, blended.kv, follow))
            agree = matching_prefix(reference_greedy, greedy(model, blended.kv, follow[0], args.greedy))
            results[(rule, fraction)].append((measured.kl, measured.top1, agree, len(blended.recomputed),
                                              seconds / prefill_s))
        print(f"prompt {index + 1}/{args.prompts}: {len(tokens)} tokens, prefill {prefill_s:.2f} s", flush=True)
    print(f"\n{args.prompts} prompts of {args.passages} passages x {args.passage_tokens} tokens (shuffled), "
          f"{args.follow} tokens teacher-forced, {args.greedy} greedy; medians over prompts except KL (mean)")
    print("| rule | recompute fraction | mean KL | top-1 agreement | greedy tokens agreeing | tokens recomputed "
          "after layer 1 | blend time / prefill time |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for (rule, fraction), rows in results.items():
        kl = statistics.mean(r[0] for r in rows)
        top1 = statistics.median(r[1] for r in rows)
        agree = statistics.median(r[2] for r in rows)
        recomputed = statistics.median(r[3] for r in rows)
        cost = statistics.median(r[4] for r in rows)
        print(f"| {rule} | {fraction:.0%} | {kl:.4f} | {top1:.1%} | {agree:.0f}/{args.greedy} | {recomputed:.0f} | "
              f"{cost:.2f} |")


if __name__ == "__main__":
    main()
