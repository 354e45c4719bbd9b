"""The coverage matrix's measurement: per attention family, TTFT cold vs from kvmesh, and bytes stored per token.

One ``kvmesh serve`` engine per family (the tiny random-weight checkpoints of ``kvmesh.demo.variants``, and the
demo model), whose own pool holds one ``--tokens`` document; per round A cold, A again (vLLM's own hit), B cold
(A leaves the pool), A again (from kvmesh).  Medians over ``--rounds``.  Bytes per token: what the daemon
stored divided by the tokens it stored (whole pages: a prompt's last page is stored in full).

    python benchmarks/bench_families.py --tokens 2000 --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_tp import warm_vs_cold  # noqa: E402
from kvmesh.bench.texts import document_token_ids  # noqa: E402
from kvmesh.demo.model import default_model_dir, prepare_demo_model  # noqa: E402
from kvmesh.demo.variants import FAMILIES, HYBRID_FAMILIES, tiny_checkpoint  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--families", default=",".join(("demo-llama", *FAMILIES, *HYBRID_FAMILIES)))
    parser.add_argument("--workdir", type=Path, help="keep checkpoints and logs here (default: a temporary folder)")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    demo = prepare_demo_model(default_model_dir())
    tokenizer = AutoTokenizer.from_pretrained(str(demo), local_files_only=True)
    docs = document_token_ids(tokenizer, 2 * args.rounds + 1, args.tokens, seed=9)
    evictors = document_token_ids(tokenizer, 4, args.tokens, seed=10)
    rows = {}
    with tempfile.TemporaryDirectory(prefix="bench-families-") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for family in args.families.split(","):
            model = str(demo) if family == "demo-llama" else str(tiny_checkpoint(family, demo, work / family))
            if family in HYBRID_FAMILIES:  # fp32 only on vLLM-CPU; state and attention share the pool's blocks
                rows[family] = warm_vs_cold(family, model, docs, args.tokens, work, ["--dtype", "float32"], {},
                                            pool_margin=700, pool_in_blocks=True)
                continue
            # vLLM sizes a model's pool a little larger than the tokens it holds: some margin
            if "sliding-window" in family:  # with prefill steps of 256 tokens its requests hold a few blocks:
                # a pool of a few, else it keeps its own hit of A through any number of other documents
                rows[family] = warm_vs_cold(family, model, docs, args.tokens, work, ["--max-num-batched-tokens",
                                            "256"], {}, pool_margin=800 - args.tokens, evictors=evictors)
                continue
            rows[family] = warm_vs_cold(family, model, docs, args.tokens, work, [], {}, pool_margin=700)
    print(f"\n{args.tokens}-token prompts, medians of {args.rounds} (TTFT, s)")
    print("| family | cold | vLLM's own hit | from kvmesh after eviction | cold / from kvmesh | tokens loaded | "
          "bytes per token |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for family, times in rows.items():
        cold, own, warm = (statistics.median(times[k]) for k in ("cold", "own hit", "from kvmesh"))
        per_token = times["stored bytes"][0] / max(1.0, times["stored tokens"][0])
        loaded = statistics.median(times["loaded"])
        print(f"| {family} | {cold:.3f} | {own:.3f} | {warm:.3f} | {cold / warm:.1f}x | {loaded:,.0f} | "
              f"{per_token:,.0f} |")


if __name__ == "__main__":
    main()
