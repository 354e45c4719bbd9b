"""``/health``: what is true of the daemon now, and a status code a load balancer or a probe can act on.

* ``ok`` (200): L1 is usable and every lower tier is up.
* ``degraded`` (200): L1 is usable, but a lower tier is not (its circuit breaker is open or probing, or it is
  full): requests are served, with fewer hits.
* ``unavailable`` (503): L1 cannot serve: its shared-memory segment is gone from ``/dev/shm`` (removed by a
  cleaner or a container's restart), so no engine can map it; restart the daemon.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kvmesh.daemon.metrics import StoreGauges
from kvmesh.store.tiered import TieredStore
from kvmesh.tiers.base import TierStats
from kvmesh.tiers.breaker import circuit_open

FULL_AT = 0.99  # a tier at least this full evicts on every store


def _fill(stats: TierStats) -> float:
    return stats.bytes_used / stats.capacity if stats.capacity else 0.0


def _room(stats: TierStats) -> str:
    return "full" if stats.capacity and _fill(stats) >= FULL_AT else "up"


def tier_state(tier: Any, stats: TierStats) -> str:
    """``up``, ``full``, ``circuit_open`` or ``circuit_half_open`` (a breaker probing a server that failed)."""
    if circuit_open(tier):
        return f"circuit_{tier.breaker.state.name.lower()}"
    return _room(stats)


def daemon_health(store: TieredStore, segment_path: Path, identity: dict[str, Any]) -> dict[str, Any]:
    l1 = store.l1.stats()
    problems = []
    l1_state = _room(l1)
    if not segment_path.exists():
        l1_state = "unusable"
        problems.append(f"L1's shared-memory segment {segment_path} is gone: engines cannot map it; restart the "
                        "daemon")
    tiers = {}
    for lower in store.lower:
        stats = lower.tier.stats()
        state = tier_state(lower.tier, stats)
        tiers[lower.tier.name] = {"state": state, "bytes_used": stats.bytes_used, "capacity": stats.capacity,
                                  "entries": stats.entries, "errors": stats.errors}
        if state != "up" and state != "full":
            problems.append(f"tier {lower.tier.name} is {state.replace('_', ' ')}")
    status = "unavailable" if l1_state == "unusable" else ("degraded" if problems else "ok")
    return {"status": status, **identity, "problems": problems,
            "l1": {"state": l1_state, "bytes_used": l1.bytes_used, "capacity": l1.capacity, "entries": l1.entries,
                   "fill": round(_fill(l1), 4)},
            "tiers": tiers}


def store_gauges(store: TieredStore) -> StoreGauges:
    """The write-behind queue's depth, and each breaker-guarded tier's circuit (tiers without one: none)."""
    guarded = [lower.tier for lower in store.lower if getattr(lower.tier, "breaker", None) is not None]
    return StoreGauges(store.write_queue_bytes(), {tier.name: circuit_open(tier) for tier in guarded})
