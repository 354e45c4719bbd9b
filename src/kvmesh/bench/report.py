"""Turn benchmark runs into numbers, a markdown table, PNG plots and one self-contained HTML page."""

from __future__ import annotations

import base64
import html
import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from kvmesh.bench.runner import RunRecord


def percentile(values: Sequence[float], q: float) -> float:
    """Linear between the closest ranks; NaN for no values (NaNs are left out)."""
    ordered = sorted(v for v in values if not math.isnan(v))
    if not ordered:
        return float("nan")
    position = q * (len(ordered) - 1)
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _mean(values: Sequence[float]) -> float:
    clean = [v for v in values if not math.isnan(v)]
    return statistics.mean(clean) if clean else float("nan")


def summarize(run: RunRecord, references: dict[str, RunRecord] | None = None,
              ttft_objective: float = 2.0) -> dict[str, Any]:
    """The figures of one run: throughput, TTFT (all and returning rounds), hit rate, agreement with references."""
    ok = [r for r in run.requests if r.error is None]
    returning = [r for r in ok if r.round > 0]
    summary: dict[str, Any] = {
        "system": run.system, "qps": run.qps, "concurrency": run.concurrency, "requests": len(run.requests),
        "failed": len(run.requests) - len(ok), "req_per_s": len(ok) / run.wall_seconds if run.wall_seconds else 0.0,
        "mean_ttft": _mean([r.ttft for r in ok]), "p90_ttft": percentile([r.ttft for r in ok], 0.9),
    }
    if returning:
        first_sent = min(r.sent_at for r in returning)
        last_done = max(r.sent_at + r.latency for r in returning)
        summary.update({
            "returning_req_per_s": len(returning) / (last_done - first_sent) if last_done > first_sent else 0.0,
            "returning_mean_ttft": _mean([r.ttft for r in returning]),
            "returning_p50_ttft": percentile([r.ttft for r in returning], 0.5),
            "returning_p90_ttft": percentile([r.ttft for r in returning], 0.9),
        })
        summary["meets_objective"] = summary["returning_p90_ttft"] <= ttft_objective
    if run.samples:
        last = run.samples[-1]
        asked = last.get("kvmesh_lookup_tokens_total", 0.0)
        summary["hit_rate"] = last.get("kvmesh_hit_tokens_total", 0.0) / asked if asked else 0.0
        summary["loaded_tokens"] = int(last.get("kvmesh_loaded_tokens_total", 0.0))
    for name, reference in (references or {}).items():
        theirs = {r.index: r.text for r in reference.requests if r.error is None}
        summary[f"answers_equal_{name}"] = sum(1 for r in ok if theirs.get(r.index) == r.text)
    return summary


def sustained_throughput(summaries: Sequence[dict[str, Any]], system: str, key: str = "returning_req_per_s"
                         ) -> float | None:
    """The best throughput among a system's runs (a QPS sweep) whose returning-round p90 TTFT meets the objective."""
    rates = [float(s[key]) for s in summaries if s["system"] == system and s.get("meets_objective") and key in s]
    return max(rates) if rates else None


def markdown_table(summaries: Sequence[dict[str, Any]]) -> str:
    if not summaries:
        return ""
    columns = list(dict.fromkeys(k for s in summaries for k in s))
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    for s in summaries:
        lines.append("| " + " | ".join(_format(s.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def _format(value: object) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.3f}"
    return "" if value is None else str(value)


def write_plots(runs: Sequence[RunRecord], out: Path) -> list[Path]:
    """TTFT distribution per system, TTFT and throughput vs QPS (for sweeps), kvmesh hit rate over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    labels = [f"{r.system}" + (f"@{r.qps:g}" if r.qps else "") for r in runs]
    figure, axis = plt.subplots(figsize=(max(6, 1.3 * len(runs)), 4))
    data = [[q.ttft for q in r.requests if q.error is None and q.round > 0] or [float("nan")] for r in runs]
    axis.boxplot(data, showfliers=True)
    axis.set_xticks(range(1, len(labels) + 1), labels, rotation=30, ha="right")
    axis.set_ylabel("TTFT of returning rounds (s)")
    axis.set_yscale("log")
    axis.set_title("Time to first token per system")
    figure.tight_layout()
    written.append(_save(figure, out / "ttft_distribution.png"))
    plt.close(figure)

    swept = [r for r in runs if r.qps is not None]
    if len({r.qps for r in swept}) > 1:
        for metric, name, ylabel in (("returning_p90_ttft", "ttft_vs_qps.png", "p90 TTFT, returning rounds (s)"),
                                     ("req_per_s", "throughput_vs_qps.png", "requests/s")):
            figure, axis = plt.subplots(figsize=(6, 4))
            for system in dict.fromkeys(r.system for r in swept):
                points = sorted((r.qps or 0.0, summarize(r).get(metric, float("nan")))
                                for r in swept if r.system == system)
                axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=system)
            axis.set_xlabel("offered load (requests/s)")
            axis.set_ylabel(ylabel)
            axis.legend()
            figure.tight_layout()
            written.append(_save(figure, out / name))
            plt.close(figure)

    cached = [r for r in runs if r.samples]
    if cached:
        figure, axis = plt.subplots(figsize=(6, 4))
        for run in cached:
            times = [s["t"] for s in run.samples]
            rates = [s.get("kvmesh_hit_tokens_total", 0) / s["kvmesh_lookup_tokens_total"]
                     if s.get("kvmesh_lookup_tokens_total") else 0.0 for s in run.samples]
            axis.plot(times, rates, label=f"{run.system}: all tiers")
            tiers = sorted({k.split("tier=")[1].rstrip("}") for s in run.samples for k in s
                            if k.startswith("kvmesh_tier_hits{")})
            for tier in tiers:
                hits = [s.get(f"kvmesh_tier_hits{{tier={tier}}}", 0.0) for s in run.samples]
                total = max(hits[-1], 1.0)
                axis.plot(times, [h / total for h in hits], linestyle="--",
                          label=f"{run.system}: {tier} hits (share of final)")
        axis.set_xlabel("time (s)")
        axis.set_ylabel("cumulative hit rate (tokens)")
        axis.set_ylim(0, 1.05)
        axis.legend(fontsize=7)
        figure.tight_layout()
        written.append(_save(figure, out / "hit_rate.png"))
        plt.close(figure)
    return written


def _save(figure, path: Path) -> Path:
    figure.savefig(path, dpi=110)
    return path


def write_report(runs: Sequence[RunRecord], summaries: Sequence[dict[str, Any]], out: Path, title: str,
                 command: str, notes: Sequence[str] = ()) -> dict[str, Path]:
    """results.json, report.md, the PNG plots, and report.html embedding all of them."""
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.json"
    results.write_text(json.dumps({"title": title, "command": command, "summaries": summaries,
                                   "runs": [asdict(r) for r in runs]}, indent=1, default=str))
    table = markdown_table(summaries)
    markdown = out / "report.md"
    markdown.write_text(f"# {title}\n\nCommand: `{command}`\n\n{table}\n\n" + "\n".join(f"- {n}" for n in notes) + "\n")
    plots = write_plots(runs, out)
    page = out / "report.html"
    page.write_text(_html(title, command, summaries, plots, notes))
    return {"json": results, "markdown": markdown, "html": page, **{p.stem: p for p in plots}}


def _html(title: str, command: str, summaries: Sequence[dict[str, Any]], plots: Sequence[Path],
          notes: Sequence[str]) -> str:
    columns = list(dict.fromkeys(k for s in summaries for k in s))
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(_format(s.get(c)))}</td>" for c in columns) + "</tr>"
                   for s in summaries)
    images = "".join(
        f'<figure><img alt="{html.escape(p.stem)}" src="data:image/png;base64,'
        f'{base64.b64encode(p.read_bytes()).decode()}"><figcaption>{html.escape(p.stem)}</figcaption></figure>'
        for p in plots)
    items = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:13px}"
            "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}img{max-width:100%}</style></head>"
            f"<body><h1>{html.escape(title)}</h1><p><code>{html.escape(command)}</code></p>"
            f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table><ul>{items}</ul>{images}"
            "</body></html>")
