"""The Grafana dashboard names only metrics a real daemon exports (with a disk and a Redis tier)."""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from kvmesh.bench.servers import free_port
from kvmesh.client import KVMeshClient
from kvmesh.config import KVMeshConfig

DASHBOARD = Path(__file__).resolve().parents[2] / "dashboards" / "grafana-kvmesh.json"
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


def _exported(text: str) -> set[str]:
    """Every series name the exposition can carry, samples or not (a labelled counter may have none yet)."""
    names = set()
    for family in text_string_to_metric_families(text):
        names |= {family.name + suffix for suffix in SUFFIXES.get(family.type, ("",))}
        names |= {sample.name for sample in family.samples}
    return names


def test_every_expression_in_the_dashboard_names_a_metric_kvmesh_exports(tmp_path: Path, redis_server) -> None:
    port = free_port()
    config = KVMeshConfig.from_mapping({"socket_dir": str(tmp_path / "sock"), "instance": "grafana-test",
                                        "l1_size": "16MiB", "l1_prefault": False, "http_port": port,
                                        "disk_path": str(tmp_path / "disk"), "redis_url": redis_server.url})
    with KVMeshClient(config) as client:
        try:
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        finally:
            client.shutdown_daemon()
    exported = _exported(text)
    dashboard = json.loads(DASHBOARD.read_text())
    expressions = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    assert len(expressions) >= 12
    named = {name for expr in expressions for name in re.findall(r"\bkvmesh_[a-z0-9_]+", expr)}
    assert named and named <= exported, sorted(named - exported)
    for wanted in ("kvmesh_tier_circuit_open", "kvmesh_write_queue_bytes", "kvmesh_load_seconds_bucket",
                   "kvmesh_tier_evictions", "kvmesh_errors_total"):
        assert wanted in named
    assert 'kvmesh_tier_circuit_open{tier="redis"} 0.0' in text  # the breaker's gauge, per lower tier
