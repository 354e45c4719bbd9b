"""The daemon's live status page: ``/`` (the page) and ``/status.json`` (what it draws), on the HTTP port.

The page is static (``status_page.html``, no script from elsewhere: machines here often reach no CDN); it
polls ``/status.json`` and keeps the history itself, so the daemon holds no time series and a page opened
later starts its plots then.  The snapshot is cheap (counters, the engines' records, the last summaries):
a poll never touches a tier's I/O path.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from importlib import resources
from typing import Any

from kvmesh.tiers.base import TierStats

MISSES_SHOWN = 20  # the recent misses the page lists, newest first
ENGINE_FIELDS = ("role", "model", "fingerprint", "layout_fingerprint", "namespace", "chunk_size", "parts",
                 "tp_rank", "tp_world", "api_port", "pid")


def status_page() -> bytes:
    """The page's HTML (shipped inside the package)."""
    return resources.files("kvmesh.daemon").joinpath("status_page.html").read_bytes()


def is_miss(summary: Mapping[str, Any]) -> bool:
    """A finished request that computed more of its prompt than its last token (what the engine had plus what
    kvmesh loaded fell short): the page lists these with their reasons."""
    prompt = int(summary.get("prompt_tokens", 0))
    held = max(int(summary.get("engine_hit_tokens", 0)), int(summary.get("kvmesh_hit_tokens", 0)))
    return prompt > 1 and held < prompt - 1


def recent_misses(summaries: Iterable[Mapping[str, Any]], limit: int = MISSES_SHOWN) -> list[dict[str, Any]]:
    """The newest ``limit`` misses among the daemon's recent summaries, newest first."""
    misses = [summary for summary in summaries if is_miss(summary)]
    return [{"request_id": s.get("request_id", ""), "model": s.get("engine", ""), "finished": s.get("finished"),
             "prompt_tokens": s.get("prompt_tokens", 0), "engine_hit_tokens": s.get("engine_hit_tokens", 0),
             "kvmesh_hit_tokens": s.get("kvmesh_hit_tokens", 0), "cause": s.get("cause", ""),
             "reason": s.get("reason", "")}
            for s in reversed(misses[-limit:])]


def status_snapshot(health: Mapping[str, Any], tiers: Mapping[str, TierStats],
                    engines: Iterable[Mapping[str, Any]], summaries: Iterable[Mapping[str, Any]],
                    requests_recorded: int) -> dict[str, Any]:
    """What ``/status.json`` answers: the health report, each tier's counters, the engines connected (what
    names their chunks) and the recent misses with their reasons."""
    states = {name: tier.get("state", "up") for name, tier in health.get("tiers", {}).items()}
    states["l1"] = health.get("l1", {}).get("state", "up")
    return {
        "time": time.time(),
        "status": health.get("status"),
        "instance": health.get("instance"),
        "version": health.get("version"),
        "uptime_seconds": health.get("uptime_seconds"),
        "problems": list(health.get("problems", [])),
        "tiers": [{"name": name, "state": states.get(name, "up"), **stats.to_dict()}
                  for name, stats in tiers.items()],
        "engines": [{field: engine.get(field) for field in ENGINE_FIELDS if field in engine} for engine in engines],
        "requests_recorded": requests_recorded,
        "misses": recent_misses(summaries),
    }
