"""``kvmesh top``: the node daemon, live in a terminal (rates over the last interval, from two snapshots).

Each frame compares two replies of the daemon's ``stats`` (its tier counters and Prometheus samples), so the
figures are what happened during the interval: hit rate, tokens loaded and stored per second, mean load and
store times, and per tier its fill, hits, misses, evictions, errors, bytes read and written, mean latencies and
its circuit breaker.  Nothing here talks to the daemon: ``cli.top`` polls, this renders.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text


@dataclass(frozen=True)
class Snapshot:
    """One reply of the daemon's ``stats``: tiers, metrics (``name{labels}: value``), engines, and when."""

    tiers: dict[str, dict[str, int]]
    metrics: dict[str, float]
    engines: list[dict[str, Any]]
    at: float

    @classmethod
    def of(cls, info: dict[str, Any], at: float) -> Snapshot:
        return cls(info["tiers"], info.get("metrics", {}), info.get("engines", []), at)


def _delta(new: Snapshot, old: Snapshot, name: str) -> float:
    return new.metrics.get(name, 0.0) - old.metrics.get(name, 0.0)


def _mean_seconds(new: Snapshot, old: Snapshot, name: str, labels: str = "") -> str:
    count = _delta(new, old, f"{name}_count{labels}")
    return f"{1000 * _delta(new, old, f'{name}_sum{labels}') / count:.1f} ms" if count else "-"


def _size(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(nbytes) < 1024 or unit == "GiB":
            return f"{nbytes:,.0f} {unit}" if unit == "B" else f"{nbytes:,.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes:,.1f} GiB"


def _share(part: float, whole: float) -> str:
    return f"{part / whole:.1%}" if whole else "-"


def render(new: Snapshot, old: Snapshot, instance: str) -> Group:
    """One frame: the interval between ``old`` and ``new``."""
    seconds = max(new.at - old.at, 1e-9)
    asked = _delta(new, old, "kvmesh_lookup_tokens_total")
    found = _delta(new, old, "kvmesh_hit_tokens_total")
    overall = _share(new.metrics.get("kvmesh_hit_tokens_total", 0.0),
                     new.metrics.get("kvmesh_lookup_tokens_total", 0.0))
    summary = Text.assemble(
        (f"kvmesh daemon '{instance}'", "bold"), f" — last {seconds:.1f} s: ",
        f"hit rate {_share(found, asked)} of {asked:,.0f} tokens asked (since start {overall}); ",
        f"loaded {_delta(new, old, 'kvmesh_loaded_tokens_total') / seconds:,.0f} tokens/s "
        f"(mean {_mean_seconds(new, old, 'kvmesh_load_seconds')}), ",
        f"stored {_delta(new, old, 'kvmesh_stored_tokens_total') / seconds:,.0f} tokens/s "
        f"(mean {_mean_seconds(new, old, 'kvmesh_store_seconds')}); ",
        f"write-behind queue {_size(new.metrics.get('kvmesh_write_queue_bytes', 0.0))}; ",
        f"stores dropped {sum(v for k, v in new.metrics.items() if k.startswith('kvmesh_dropped_stores_total')):,.0f}")
    tiers = Table(title="tiers", expand=True)
    for column in ("tier", "entries", "used", "fill", "hits/s", "misses/s", "hit rate", "evictions/s", "errors",
                   "read/s", "written/s", "read latency", "write latency", "circuit"):
        tiers.add_column(column, justify="left" if column == "tier" else "right")
    for name, now in new.tiers.items():
        before = old.tiers.get(name, now)
        hits, misses = now["hits"] - before["hits"], now["misses"] - before["misses"]
        label = f"{{tier={name}}}"
        circuit = new.metrics.get(f"kvmesh_tier_circuit_open{label}")
        tiers.add_row(
            name, f"{now['entries']:,}", _size(now["bytes_used"]), _share(now["bytes_used"], now["capacity"]),
            f"{hits / seconds:,.1f}", f"{misses / seconds:,.1f}", _share(hits, hits + misses),
            f"{(now['evictions'] - before['evictions']) / seconds:,.1f}", f"{now['errors']:,}",
            _size(_delta(new, old, f"kvmesh_tier_read_bytes_total{label}") / seconds),
            _size(_delta(new, old, f"kvmesh_tier_written_bytes_total{label}") / seconds),
            _mean_seconds(new, old, "kvmesh_tier_read_seconds", label),
            _mean_seconds(new, old, "kvmesh_tier_write_seconds", label),
            "-" if circuit is None else ("open" if circuit else "closed"))
    engines = Table(title=f"engines connected: {len(new.engines)}", expand=True)
    for column in ("pid", "role", "model", "fingerprint"):
        engines.add_column(column)
    for engine in new.engines:
        engines.add_row(*(str(engine.get(c, "")) for c in ("pid", "role", "model", "fingerprint")))
    return Group(summary, tiers, engines)
