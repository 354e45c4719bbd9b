"""Blending quality against a full prefill: each selection rule at each recompute fraction (transformers, fp32).

RAG-style prompts of real text: a short header, ``--passages`` passages of ``--passage-tokens`` tokens in a
shuffled order, then a continuation of ``--follow`` tokens read teacher-forced.  Every passage's KV is
computed alone at position 0 (as stored the first time it was seen) and blended into the prompt
(``kvmesh.blend.reference``).  Against a full prefill of the identical tokens: mean KL and top-1 agreement over
the continuation, and how many of ``--greedy`` greedy tokens agree.  Brackets in the same run: ``none`` (full
reuse, only the header recomputed) and a fraction of 1.0 (everything recomputed: must equal the prefill).

``--stored context`` stores passages as the vLLM path does: from the first prompt that held them (the header,
then every passage in order), keys rotated at the positions they had there.  ``--task facts`` plants an access
code in each passage and puts a question after the passages that asks for two of them; the answer is read
teacher-forced, and the share of its code tokens the model predicts is reported beside the full prefill's.

``--first-tokens 16,8,4,0`` runs the kvmesh and question rules once with each count of passage-start tokens.

    python benchmarks/blend_quality.py --prompts 5
    python benchmarks/blend_quality.py --prompts 8 --stored context --task facts
    python benchmarks/blend_quality.py --prompts 8 --fractions 0.15 --stored context --first-tokens 16,8,4,0
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from kvmesh.bench.texts import document_token_ids
from kvmesh.blend.quality import continuation_logprobs, divergence, extend_kv, greedy, matching_prefix
from kvmesh.blend.reference import Passage, blend, passage_kv
from kvmesh.demo.model import default_model_dir, prepare_demo_model

HEADER = "Answer the question using the documents below.\n\n"


PLACES = ("the north archive", "the blue vault", "the river station", "the east tower", "the old library",
          "the glass hall", "the west harbor", "the stone bridge", "the red gate", "the quiet garden")


@dataclass
class Task:
    """One prompt's passages (in their stored order), what follows them in the prompt, and the answer read after."""

    texts: list[list[int]]
    question: list[int]  # after the passages, in the prompt (computed exactly, never reused)
    follow: list[int]  # read teacher-forced after the prompt
    facts: list[int] = field(default_factory=list)  # positions in ``follow`` that copy a fact from a passage


def continuation_task(group: list[list[int]], passage_tokens: int, follow: int) -> Task:
    """Passages of real text, then the start of another text read on."""
    return Task([doc[:passage_tokens] for doc in group[:-1]], [], group[-1][:follow])


def facts_task(tokenizer: Any, group: list[list[int]], passage_tokens: int, rng: random.Random) -> Task:
    """Each passage holds one access code; the answer needs the codes of two passages.

    The answer is read teacher-forced, so its code tokens show whether the model, over blended KV, still
    copies facts out of two different passages.
    """
    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False)

    texts, codes = [], []
    places = rng.sample(PLACES, len(group) - 1)
    for doc, place in zip(group[:-1], places):
        code = str(rng.randrange(1000, 10000))
        fact = encode(f" The access code for {place} is {code}. ")
        at = rng.randrange(16, passage_tokens - len(fact))
        texts.append((doc[:at] + fact + doc[at:])[:passage_tokens])
        codes.append(code)
    first, second = rng.sample(range(len(texts)), 2)
    question = encode(f"\n\nQuestion: what are the access codes for {places[first]} and {places[second]}?\nAnswer:")
    follow, facts = [], []
    for piece, is_fact in ((f" The access code for {places[first]} is", False), (f" {codes[first]}", True),
                           (f", and the access code for {places[second]} is", False), (f" {codes[second]}", True),
                           (".", False)):
        ids = encode(piece)
        if is_fact:
            facts += range(len(follow), len(follow) + len(ids))
        follow += ids
    return Task(texts, question, follow, facts)


def facts_recalled(logprobs: torch.Tensor, follow: list[int], facts: list[int]) -> float:
    """The share of the answer's fact tokens the model predicts (top-1) from what precedes them."""
    hits = [int(logprobs[at - 1].argmax()) == follow[at] for at in facts if at > 0]
    return sum(hits) / len(hits) if hits else float("nan")


def stored_passages(model: object, header: list[int], texts: list[list[int]], stored: str
                    ) -> list[tuple[torch.Tensor, int]]:
    """Each passage's stored KV and the position its keys were rotated at."""
    if stored == "alone":
        return [(passage_kv(model, text), 0) for text in texts]
    first_seen = list(header) + [token for text in texts for token in text]
    kv = passage_kv(model, first_seen)
    placed, at = [], len(header)
    for text in texts:
        placed.append((kv[:, :, at:at + len(text)].clone(), at))
        at += len(text)
    return placed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=5)
    parser.add_argument("--passages", type=int, default=5)
    parser.add_argument("--passage-tokens", type=int, default=256)
    parser.add_argument("--follow", type=int, default=64)
    parser.add_argument("--greedy", type=int, default=32)
    parser.add_argument("--fractions", default="0.05,0.15,0.3")
    parser.add_argument("--rules", default="cacheblend,passage-start,kvmesh,question,random")
    parser.add_argument("--stored", choices=("alone", "context"), default="alone",
                        help="alone: each passage's KV computed by itself at position 0; context: as the vLLM path "
                             "stores it, from the first prompt that held it (the header, then the passages in order)")
    parser.add_argument("--first-tokens", default="16",
                        help="each passage's first tokens the kvmesh and question rules always recompute; several "
                             "(e.g. 16,8,4,0) run those rules once with each")
    parser.add_argument("--task", choices=("continue", "facts"), default="continue",
                        help="continue: another text read on after the passages; facts: each passage holds an "
                             "access code, and a question after them asks for two (the answer read teacher-forced)")
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = prepare_demo_model(default_model_dir())
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, local_files_only=True).eval()
    header = tokenizer(HEADER).input_ids
    docs = document_token_ids(tokenizer, args.prompts * (args.passages + 1), args.passage_tokens + args.follow,
                              seed=17)
    firsts = [int(n) for n in args.first_tokens.split(",")]
    configs = [("none", 0.0, firsts[0])] + [
        (rule, float(f), first) for f in args.fractions.split(",") for rule in args.rules.split(",")
        for first in (firsts if rule in ("kvmesh", "question") else firsts[:1])]
    configs.append(("cacheblend", 1.0, firsts[0]))
    results: dict[tuple[str, float, int], list[tuple[float, float, int, int, float, float]]] = {c: [] for c in configs}
    facts_rng, recalled_full = random.Random(5), []
    shuffle = random.Random(3)
    for index in range(args.prompts):
        group = docs[index * (args.passages + 1):(index + 1) * (args.passages + 1)]
        task = (facts_task(tokenizer, group, args.passage_tokens, facts_rng) if args.task == "facts"
                else continuation_task(group, args.passage_tokens, args.follow))
        texts, follow = task.texts, task.follow
        stored = stored_passages(model, header, texts, args.stored)
        order = list(range(args.passages))
        shuffle.shuffle(order)
        tokens, passages = list(header), []
        for which in order:
            kv, cached_start = stored[which]
            passages.append(Passage(len(tokens), len(tokens) + len(texts[which]), kv, cached_start))
            tokens += texts[which]
        started = time.perf_counter()
        full = passage_kv(model, tokens + task.question)
        prefill_s = time.perf_counter() - started
        reference = continuation_logprobs(model, full, follow)
        reference_greedy = greedy(model, full, follow[0], args.greedy)
        recalled_full.append(facts_recalled(reference, follow, task.facts))
        for rule, fraction, first in configs:
            started = time.perf_counter()
            blended = blend(model, tokens, passages, rule, fraction, first_tokens=first, lookahead=task.question)
            seconds = time.perf_counter() - started
            # the question computed exactly over the blended KV, as vLLM computes a blended prompt's rest
            answered = extend_kv(model, blended.kv, task.question)
            logprobs = continuation_logprobs(model, answered, follow)
            measured = divergence(reference, logprobs)
            agree = matching_prefix(reference_greedy, greedy(model, answered, follow[0], args.greedy))
            results[(rule, fraction, first)].append((measured.kl, measured.top1, agree, len(blended.recomputed),
                                              seconds / prefill_s, facts_recalled(logprobs, follow, task.facts)))
        print(f"prompt {index + 1}/{args.prompts}: {len(tokens)} tokens, prefill {prefill_s:.2f} s", flush=True)
    print(f"\n{args.prompts} prompts of {args.passages} passages x {args.passage_tokens} tokens (shuffled, "
          f"stored {args.stored}), "
          f"{args.follow} tokens teacher-forced, {args.greedy} greedy; medians over prompts except KL (mean)")
    if args.task == "facts":
        print("(--task facts reads the answer to the question, not --follow tokens)")
    facts = args.task == "facts"
    if facts:
        print(f"the full prefill recalls {statistics.mean(recalled_full):.1%} of the answers' code tokens")
    print("| rule | recompute fraction | mean KL | KL / full reuse's | top-1 agreement (median, mean) | greedy tokens "
          "agreeing | tokens recomputed after layer 1 | blend time / prefill time |"
          + (" code tokens recalled |" if facts else ""))
    print("| --- | --- | --- | --- | --- | --- | --- | --- |" + (" --- |" if facts else ""))
    full_reuse = statistics.mean(r[0] for r in results[configs[0]])
    for (rule, fraction, first), rows in results.items():
        kl = statistics.mean(r[0] for r in rows)
        top1, top1_mean = statistics.median(r[1] for r in rows), statistics.mean(r[1] for r in rows)
        agree = statistics.median(r[2] for r in rows)
        recomputed = statistics.median(r[3] for r in rows)
        cost = statistics.median(r[4] for r in rows)
        recalled = f" {statistics.mean(r[5] for r in rows):.1%} |" if facts else ""
        named = f"{rule} (first {first})" if rule in ("kvmesh", "question") and len(firsts) > 1 else rule
        print(f"| {named} | {fraction:.0%} | {kl:.4f} | {kl / full_reuse:.0%} | {top1:.1%}, {top1_mean:.1%} | "
              f"{agree:.0f}/{args.greedy} | {recomputed:.0f} | {cost:.2f} |{recalled}")


if __name__ == "__main__":
    main()
