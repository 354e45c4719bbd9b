"""The headline curve: returning-round mean TTFT over context length, one line per system.

Usage: .venv/bin/python benchmarks/plot_curve.py [--out docs/img/context-curve.png]
Reads results/headline-<context>*/results.json (from benchmarks/headline.sh and the LMCache rerun).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

LABELS = {"vllm": "vLLM prefix cache", "lmcache": "LMCache 0.5.6 (memory)", "kvmesh": "kvmesh (L1)",
          "vllm-big": "vLLM, pool holding everything (ideal)"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", type=Path, default=Path("results"))
    parser.add_argument("--out", type=Path, default=Path("docs/img/context-curve.png"))
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points: dict[str, dict[int, float]] = {}
    for path in sorted(args.results.glob("headline-*/results.json")):
        context = int(path.parent.name.split("-")[1])
        for summary in json.loads(path.read_text())["summaries"]:
            if summary["system"] in LABELS and summary.get("qps") is None:
                points.setdefault(summary["system"], {})[context] = summary["returning_mean_ttft"]
    figure, axes = plt.subplots(figsize=(7, 4.2))
    for system, label in LABELS.items():
        series = sorted(points.get(system, {}).items())
        if series:
            axes.plot([c for c, _ in series], [t for _, t in series], marker="o", label=label)
    axes.set_xlabel("context per user (tokens)")
    axes.set_ylabel("returning rounds: mean TTFT (s)")
    axes.set_yscale("log")
    axes.set_title("Returning chat users, history evicted from the engine (2-core CPU)")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    figure.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
