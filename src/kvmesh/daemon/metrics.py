"""What the node daemon counts, and the HTTP endpoint that shows it (``/metrics``, ``/health``, and the live
status page: ``/`` and ``/status.json``, ``daemon/status.py``).

Counters live in a registry of the daemon's own (nothing global), so several
daemons in one test process never collide.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from kvmesh.tiers.base import TierStats

log = logging.getLogger("kvmesh.daemon")

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


@dataclass(frozen=True)
class StoreGauges:
    """What the store is doing now, beside its tiers' counters: read at each scrape."""

    write_queue_bytes: int = 0
    circuit_open: dict[str, bool] = field(default_factory=dict)  # per tier with a breaker: it is not closed


class DaemonMetrics:
    def __init__(self, tier_stats: Callable[[], dict[str, TierStats]],
                 gauges: Callable[[], StoreGauges] = StoreGauges) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.lookups = Counter("kvmesh_lookups", "Lookup requests.", registry=r)
        self.lookup_tokens = Counter("kvmesh_lookup_tokens", "Tokens asked for in lookups.", registry=r)
        self.hit_tokens = Counter("kvmesh_hit_tokens", "Tokens found in lookups (prefix hits).", registry=r)
        self.loaded_tokens = Counter("kvmesh_loaded_tokens", "Tokens loaded into engines.", registry=r)
        self.loaded_bytes = Counter("kvmesh_loaded_bytes", "Bytes loaded into engines.", registry=r)
        self.stored_tokens = Counter("kvmesh_stored_tokens", "Tokens stored from engines.", registry=r)
        self.stored_bytes = Counter("kvmesh_stored_bytes", "Bytes stored from engines.", registry=r)
        self.load_seconds = Histogram("kvmesh_load_seconds", "Engine-side time to load one request's KV.",
                                      buckets=_LATENCY_BUCKETS, registry=r)
        self.store_seconds = Histogram("kvmesh_store_seconds", "Engine-side time to store one batch of KV.",
                                       buckets=_LATENCY_BUCKETS, registry=r)
        self.errors = Counter("kvmesh_errors", "Errors, by kind.", ["kind"], registry=r)
        self.blended_tokens = Counter("kvmesh_blended_tokens", "Tokens materialized by blending stored passages "
                                      "(approximate KV; not in kvmesh_loaded_tokens).", registry=r)
        self.blend_passages = Counter("kvmesh_blend_passages_reused", "Stored passages reused by blends.", registry=r)
        self.blend_recomputed = Counter("kvmesh_blend_recomputed_tokens",
                                        "Tokens blends recomputed after the check layer.", registry=r)
        self.blend_seconds = Histogram("kvmesh_blend_seconds", "Engine-side time to blend one request.",
                                       buckets=_LATENCY_BUCKETS, registry=r)
        self.verified_chunks = Counter("kvmesh_load_verified_chunks",
                                       "Loaded chunks read back from the engine and compared (verify_loads).",
                                       registry=r)
        self.verify_mismatches = Counter("kvmesh_load_verify_mismatches",
                                         "Loaded chunks whose engine copy differed from the stored bytes.",
                                         registry=r)
        self.tier_bytes_read = Counter("kvmesh_tier_read_bytes", "Bytes read from a lower tier.", ["tier"], registry=r)
        self.tier_bytes_written = Counter("kvmesh_tier_written_bytes", "Bytes written to a lower tier.", ["tier"],
                                          registry=r)
        self.tier_read_seconds = Histogram("kvmesh_tier_read_seconds", "Latency of one read from a lower tier.",
                                           ["tier"], buckets=_LATENCY_BUCKETS, registry=r)
        self.tier_write_seconds = Histogram("kvmesh_tier_write_seconds", "Latency of one write to a lower tier.",
                                            ["tier"], buckets=_LATENCY_BUCKETS, registry=r)
        self.dropped_stores = Counter("kvmesh_dropped_stores", "Stores not done, by reason.", ["reason"], registry=r)
        self.codec_raw_bytes = Counter("kvmesh_codec_input_bytes", "Entry bytes encoded for lower tiers, by codec.",
                                       ["codec"], registry=r)
        self.codec_encoded_bytes = Counter("kvmesh_codec_output_bytes", "Encoded bytes written, by codec "
                                           "(input / output = compression ratio).", ["codec"], registry=r)
        self.codec_seconds = Counter("kvmesh_codec_seconds", "Time spent encoding and decoding entries.",
                                     ["direction"], registry=r)
        r.register(_TierCollector(tier_stats, gauges))

    # StoreObserver
    def tier_read(self, tier: str, nbytes: int, seconds: float) -> None:
        self.tier_bytes_read.labels(tier).inc(nbytes)
        self.tier_read_seconds.labels(tier).observe(seconds)

    def tier_write(self, tier: str, nbytes: int, seconds: float) -> None:
        self.tier_bytes_written.labels(tier).inc(nbytes)
        self.tier_write_seconds.labels(tier).observe(seconds)

    def dropped_store(self, reason: str, key: bytes | None = None) -> None:
        self.dropped_stores.labels(reason).inc()

    def tier_fault(self, tier: str, action: str) -> None:
        self.errors.labels(f"{tier}_{action}").inc()

    def encoded(self, codec: str, raw_bytes: int, encoded_bytes: int, seconds: float) -> None:
        self.codec_raw_bytes.labels(codec).inc(raw_bytes)
        self.codec_encoded_bytes.labels(codec).inc(encoded_bytes)
        self.codec_seconds.labels("encode").inc(seconds)

    def decoded(self, raw_bytes: int, seconds: float) -> None:
        self.codec_seconds.labels("decode").inc(seconds)

    def snapshot(self) -> dict[str, float]:
        """Every sample as ``name{labels}: value`` (what ``kvmesh stats`` and tests read)."""
        values: dict[str, float] = {}
        for family in self.registry.collect():
            for sample in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                values[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
        return values


class _TierCollector:
    def __init__(self, tier_stats: Callable[[], dict[str, TierStats]], gauges: Callable[[], StoreGauges]) -> None:
        self._tier_stats = tier_stats
        self._gauges = gauges

    def describe(self) -> list:
        return []

    def collect(self):
        stats = self._tier_stats()
        fields = list(TierStats.__dataclass_fields__)
        for stat in fields:
            family = GaugeMetricFamily(f"kvmesh_tier_{stat}", f"Tier {stat.replace('_', ' ')}.",
                                       labels=["tier"])
            for name, tier in stats.items():
                family.add_metric([name], getattr(tier, stat))
            yield family
        gauges = self._gauges()
        queue = GaugeMetricFamily("kvmesh_write_queue_bytes", "Bytes waiting to be written to the lower tiers.")
        queue.add_metric([], gauges.write_queue_bytes)
        yield queue
        circuit = GaugeMetricFamily("kvmesh_tier_circuit_open", "1 while a lower tier's circuit breaker is open or "
                                    "probing (its server failed; requests skip it).", labels=["tier"])
        for name, is_open in gauges.circuit_open.items():
            circuit.add_metric([name], 1.0 if is_open else 0.0)
        yield circuit


def start_http(host: str, port: int, metrics: DaemonMetrics, health: Callable[[], dict[str, Any]],
               status: Callable[[], dict[str, Any]] | None = None) -> ThreadingHTTPServer | None:
    """Serve /metrics, /health and (given ``status``) the status page in a background thread; None (with a
    warning) if the port is taken."""
    from kvmesh.daemon.status import status_page

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            code = 200
            path = self.path.split("?", 1)[0]
            if status is not None and path in ("/", "/status"):
                body, kind = status_page(), "text/html; charset=utf-8"
            elif status is not None and path == "/status.json":
                body, kind = json.dumps(status()).encode(), "application/json"
            elif self.path.startswith("/metrics"):
                body, kind = generate_latest(metrics.registry), "text/plain; version=0.0.4"
            elif self.path.startswith("/health"):
                report = health()
                body, kind = json.dumps(report).encode(), "application/json"
                code = 503 if report.get("status") == "unavailable" else 200
            else:
                self.send_error(404, "try / (the status page), /metrics or /health")
                return
            self.send_response(code)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    try:
        server = ThreadingHTTPServer((host, port), Handler)
    except OSError as err:
        log.warning("metrics endpoint disabled: cannot listen on %s:%d (%s)", host, port, err.strerror)
        return None
    threading.Thread(target=server.serve_forever, name="kvmesh-http", daemon=True).start()
    return server
