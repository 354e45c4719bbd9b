"""The daemon's live status page: ``/status.json`` from a real daemon, and which summaries it lists as misses.

The page itself is driven in a real browser against a real engine in
``tests/integrations/vllm/test_vllm.py`` (``test_the_status_page_...``).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request

from kvmesh.bench.servers import free_port
from kvmesh.client import KVMeshClient
from kvmesh.config import KVMeshConfig
from kvmesh.daemon.status import is_miss, recent_misses
from kvmesh.keys import chunk_keys, model_namespace

NS = model_namespace("status-test-model", "L4.H2.D32.bfloat16")


def _get(port: int, path: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as reply:
            return reply.status, reply.headers["Content-Type"], reply.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers["Content-Type"], err.read()


def _summary(prompt: int, engine_hit: int, kvmesh_hit: int, reason: str) -> dict[str, object]:
    return {"prompt_tokens": prompt, "engine_hit_tokens": engine_hit, "kvmesh_hit_tokens": kvmesh_hit,
            "loaded_tokens": max(kvmesh_hit - engine_hit, 0), "reason": reason}


def test_a_request_is_a_miss_when_more_than_its_last_token_was_computed() -> None:
    assert is_miss(_summary(300, 0, 256, "ends at a chunk"))
    assert not is_miss(_summary(300, 0, 300, "every chunk stored"))
    assert not is_miss(_summary(300, 299, 0, "the engine's own hit"))  # vLLM's own cache held all but the last
    assert not is_miss(_summary(1, 0, 0, "one token"))
    summaries = [{"request_id": f"r{i}", **_summary(300, 0, 0 if i % 2 else 300, f"reason {i}")} for i in range(50)]
    listed = recent_misses(summaries, limit=3)
    assert [m["request_id"] for m in listed] == ["r49", "r47", "r45"]  # newest first, misses only
    assert listed[0]["reason"] == "reason 49"


def test_status_json_names_the_engines_the_tiers_and_the_recent_misses(tmp_path) -> None:
    port = free_port()
    config = KVMeshConfig.from_mapping({"socket_dir": str(tmp_path), "instance": "status-json", "l1_size": "16MiB",
                                        "l1_prefault": False, "http_port": port})
    engine = {"role": "scheduler", "model": "status-test-model", "fingerprint": "fp:0123", "namespace": "ab" * 16,
              "chunk_size": 64}
    with KVMeshClient(config, engine=engine) as client:
        try:
            keys = chunk_keys(list(range(256)), NS, 64)
            client.put(keys[:2], [_chunk() for _ in keys[:2]])
            assert client.lookup(keys) == 2
            client.record_request("cmpl-hit-0", _summary(256, 0, 256, "every chunk of the prompt is stored"))
            client.record_request("cmpl-miss-0", _summary(256, 0, 128, "chunk 2 (tokens 128-191) is not stored"))
            code, kind, body = _get(port, "/status.json")
            assert code == 200 and kind == "application/json"
            status = json.loads(body)
            assert status["status"] == "ok" and status["instance"] == "status-json"
            assert status["engines"] == [{**engine, "pid": status["engines"][0]["pid"]}]
            l1 = next(tier for tier in status["tiers"] if tier["name"] == "l1")
            assert l1["state"] == "up" and l1["entries"] == 2 and l1["hits"] == 2 and l1["misses"] == 1
            assert status["requests_recorded"] == 2
            assert [(m["request_id"], m["reason"]) for m in status["misses"]] == [
                ("cmpl-miss-0", "chunk 2 (tokens 128-191) is not stored")]
            code, kind, page = _get(port, "/")
            assert code == 200 and kind.startswith("text/html") and b'id="plot-hit-rate"' in page
            assert b"status.json" in page and b"<script src" not in page  # nothing fetched from elsewhere
            code, _, body = _get(port, "/nothing-here")
            assert code == 404 and b"the status page" in body
        finally:
            client.shutdown_daemon()


def _chunk():
    import torch

    return torch.zeros(2, 4, 64, dtype=torch.float16)
