"""Quality, size and speed of every KV codec on the demo model, measured on real text.

Usage: .venv/bin/python benchmarks/codec_quality.py [--contexts 1000 4000] [--samples 4]
           [--codecs raw lossless fp8 kivi:bits=8 kivi:bits=4 cachegen ...] [--out results/codec_quality.json]

For each context length, ``--samples`` documents from Python's bundled
documentation (``pydoc_data.topics``) are read by SmolLM2-135M-Instruct with
transformers.  The prefix KV (all but the context's last token) is cut into
256-token chunks as kvmesh stores them, each chunk is encoded and decoded by the
codec, and the model continues from the decoded KV:

* next-token top-1 agreement and mean KL(raw || codec) over the next 256 positions (teacher forced);
* perplexity of those 256 tokens (raw KV's figure beside it);
* greedy agreement: of 64 greedy tokens, how many equal the raw-KV run's before the first difference,
  and how many of the samples agree on all 64.

The prefix KV is computed in bf16, as an engine stores it; the continuation
runs in float32 by default (``--eval-dtype``).  In bf16 the model's logits are
so coarse that top-1 ties are common: flipping single low bits of the KV (a
0.1% relative perturbation) already changes the top-1 token at ~2% of the
positions, which would hide every codec's own effect.

Size ratio is bf16 bytes over encoded bytes (headers included); encode and
decode GB/s are of bf16 bytes on one thread (torch and numba), medians over the
chunks of the longest context, decoding into a warm preallocated tensor (as a
promotion decodes into its L1 extent).  ``--speed-only`` measures speeds alone.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from kvmesh.bench.texts import document_token_ids
from kvmesh.codecs import decode_any, get_codec
from kvmesh.demo.model import default_model_dir
from kvmesh.demo.run import cache_to_chunk, chunks_to_cache

CHUNK = 256
FOLLOW = 256
GREEDY = 64
DEFAULT_CODECS = ["raw", "lossless", "lossless:compressor=lz4", "fp8", "kivi:bits=8", "kivi:bits=4", "kivi:bits=2",
                  "cachegen:key_bits=8,value_bits=6", "cachegen", "cachegen:key_bits=5-6-6,value_bits=4-5-5",
                  "cachegen:key_bits=5,value_bits=4", "ecq:key_step=0.08,value_step=0.1", "ecq",
                  "ecq:key_step=0.15,value_step=0.19", "ecq:key_step=0.2,value_step=0.25",
                  "ecq:profile=smollm2-135m-heads,key_step=0.12,value_step=0.144"]


def chunks_of(cache, length: int) -> list[torch.Tensor]:
    return [cache_to_chunk(cache, start, min(start + CHUNK, length)).contiguous() for start in range(0, length, CHUNK)]


def through_codec(codec_spec: str, chunks: list[torch.Tensor]) -> tuple[list[torch.Tensor], int]:
    codec = get_codec(codec_spec)
    decoded, size = [], 0
    for chunk in chunks:
        data = codec.encode(chunk, "chunk")
        size += len(data)
        decoded.append(decode_any(data, tuple(chunk.shape), chunk.dtype))
    return decoded, size


def continue_from(model, chunks: list[torch.Tensor], follow: torch.Tensor) -> torch.Tensor:
    """Log-probabilities of the model reading ``follow`` after the KV in ``chunks``."""
    out = model(input_ids=follow, past_key_values=chunks_to_cache(chunks), use_cache=True)
    return torch.log_softmax(out.logits[0].float(), dim=-1)


def greedy_from(model, chunks: list[torch.Tensor], first: torch.Tensor, steps: int) -> list[int]:
    cache = chunks_to_cache(chunks)
    token, produced = first, []
    for _ in range(steps):
        out = model(input_ids=token, past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        token = out.logits[:, -1:].argmax(-1)
        produced.append(int(token))
    return produced


def measure_speed(codec_spec: str, chunks: list[torch.Tensor], rounds: int = 3) -> tuple[float, float]:
    codec = get_codec(codec_spec)
    codec.encode(chunks[0], "chunk")  # compile numba kernels, warm caches
    encode_times, decode_times = [], []
    for chunk in chunks:
        started = time.perf_counter()
        for _ in range(rounds):
            data = codec.encode(chunk, "chunk")
        encode_times.append((time.perf_counter() - started) / rounds / chunk.numel() / chunk.element_size())
        target = torch.empty_like(chunk)  # a warm destination, as an L1 extent is
        decode_any(data, out=target)
        started = time.perf_counter()
        for _ in range(rounds):
            decode_any(data, out=target)
        decode_times.append((time.perf_counter() - started) / rounds / chunk.numel() / chunk.element_size())
    return 1e-9 / statistics.median(encode_times), 1e-9 / statistics.median(decode_times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[1000, 4000])
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--codecs", nargs="+", default=DEFAULT_CODECS)
    parser.add_argument("--out", type=Path, default=Path("results/codec_quality.json"))
    parser.add_argument("--eval-dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--speed-only", action="store_true", help="skip the quality runs")
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = default_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, local_files_only=True).eval()
    eval_dtype = getattr(torch, args.eval_dtype)
    reader = AutoModelForCausalLM.from_pretrained(path, dtype=eval_dtype, local_files_only=True).eval()

    def as_eval(chunks: list[torch.Tensor]) -> list[torch.Tensor]:
        return [chunk.to(eval_dtype) for chunk in chunks]
    results: list[dict[str, object]] = []
    speed_chunks: list[torch.Tensor] = []
    with torch.inference_mode():
        for context in args.contexts:
            if args.speed_only:
                doc = document_token_ids(tokenizer, 1, context, seed=context)[0]
                cache = model(input_ids=torch.tensor([doc]), use_cache=True).past_key_values
                speed_chunks = chunks_of(cache, context)
                continue
            docs = document_token_ids(tokenizer, args.samples, context + FOLLOW + 1, seed=context)
            totals: dict[str, dict[str, float]] = {c: {"agree": 0, "positions": 0, "kl": 0.0, "nll": 0.0,
                                                       "raw_nll": 0.0, "greedy": 0, "greedy_all": 0,
                                                       "size": 0, "raw_size": 0} for c in args.codecs}
            for doc in docs:
                ids = torch.tensor([doc])
                prefix, follow = ids[:, :context - 1], ids[:, context - 1:context - 1 + FOLLOW]
                cache = model(input_ids=prefix, use_cache=True).past_key_values
                raw_chunks = chunks_of(cache, prefix.shape[1])
                speed_chunks = raw_chunks
                reference = continue_from(reader, as_eval(raw_chunks), follow)
                targets = ids[0, context:context + FOLLOW]
                reference_greedy = greedy_from(reader, as_eval(raw_chunks), follow[:, :1], GREEDY)
                for spec in args.codecs:
                    decoded, size = through_codec(spec, raw_chunks)
                    logp = continue_from(reader, as_eval(decoded), follow)
                    greedy = greedy_from(reader, as_eval(decoded), follow[:, :1], GREEDY)
                    same = next((i for i, (a, b) in enumerate(zip(greedy, reference_greedy)) if a != b), GREEDY)
                    row = totals[spec]
                    row["agree"] += int((logp.argmax(-1) == reference.argmax(-1)).sum())
                    row["positions"] += FOLLOW
                    row["kl"] += float((reference.exp() * (reference - logp)).sum(-1).sum())
                    row["nll"] += float(-logp[torch.arange(len(targets)), targets].sum())
                    row["raw_nll"] += float(-reference[torch.arange(len(targets)), targets].sum())
                    row["greedy"] += same
                    row["greedy_all"] += int(same == GREEDY)
                    row["size"] += size
                    row["raw_size"] += sum(c.numel() * c.element_size() for c in raw_chunks)
                print(f"context {context}: sample done", flush=True)
            for spec, row in totals.items():
                results.append({
                    "codec": spec, "context": context, "samples": len(docs),
                    "top1_agreement": row["agree"] / row["positions"],
                    "mean_kl": row["kl"] / row["positions"],
                    "perplexity": float(torch.exp(torch.tensor(row["nll"] / row["positions"]))),
                    "raw_perplexity": float(torch.exp(torch.tensor(row["raw_nll"] / row["positions"]))),
                    "greedy_prefix_mean": row["greedy"] / len(docs),
                    "greedy_all_equal": f"{row['greedy_all']}/{len(docs)}",
                    "size_ratio": row["raw_size"] / row["size"], "eval_dtype": args.eval_dtype,
                })
                print(json.dumps(results[-1]), flush=True)
        torch.set_num_threads(1)  # speeds are quoted per core
        for spec in args.codecs:
            encode_gbps, decode_gbps = measure_speed(spec, speed_chunks)
            for row in results:
                if row["codec"] == spec:
                    row["encode_gbps"], row["decode_gbps"] = encode_gbps, decode_gbps
            if args.speed_only:
                results.append({"codec": spec, "encode_gbps": encode_gbps, "decode_gbps": decode_gbps})
            print(f"{spec}: encode {encode_gbps:.2f} GB/s, decode {decode_gbps:.2f} GB/s", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    if not args.speed_only:
        print(markdown(results))


def markdown(results: list[dict[str, object]]) -> str:
    lines = ["| codec | context | size vs bf16 | top-1 agreement | mean KL | perplexity (raw) | greedy tokens equal "
             "(of 64, mean) | greedy all 64 equal | encode GB/s | decode GB/s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        lines.append(f"| {r['codec']} | {r['context']} | {r['size_ratio']:.2f}x | {100 * r['top1_agreement']:.2f}% "
                     f"| {r['mean_kl']:.5f} | {r['perplexity']:.3f} ({r['raw_perplexity']:.3f}) "
                     f"| {r['greedy_prefix_mean']:.1f} | {r['greedy_all_equal']} | {r.get('encode_gbps', 0):.2f} "
                     f"| {r.get('decode_gbps', 0):.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
