"""Tensor parallelism end to end: `kvmesh serve --tensor-parallel-size 2`, one request at a time.

The demo model's 9 heads in 3 KV groups cannot be split over two workers; the model here is the demo model
with its first two KV groups only (6 heads, ``kvmesh.demo.variants.fewer_heads``): each worker holds one
KV head.  Each worker stores its own heads under keys of its own, and a chunk is a hit only where both
are stored.  The reference is plain vLLM with the same split, one worker per core as here: its answer
from its own cache, at the depth kvmesh loads to (prompts of ``128·k + 1`` tokens, see
``test_vllm_defaults``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from engine_settings import default_path_settings, kv_bytes_per_token, stop_settings_daemon
from kvmesh.bench.openai_client import stream_completion
from kvmesh.bench.servers import EngineServer, EngineSpec
from kvmesh.bench.texts import document_token_ids
from kvmesh.client import KVMeshClient
from kvmesh.config import KVMeshConfig
from kvmesh.demo.variants import fewer_heads
from kvmesh.prompt_explain import engine_record, explain_prompt

pytestmark = pytest.mark.slow

BLOCK = 128
POOL_TOKENS = 10 * BLOCK  # each worker's own pool, in tokens
MAX_LEN = 1024
ANSWER = 24
TP = ["--tensor-parallel-size", "2", "--distributed-executor-backend", "mp"]
ONE_CORE_EACH = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}
REPEATED = {"one-chunk": 2 * BLOCK + 1, "chunk-and-tail": 3 * BLOCK + 1, "two-chunks-and-tail": 5 * BLOCK + 1}
TAIL, CONTINUED = 3 * BLOCK + 50, 3 * BLOCK + 110  # a prompt stored with a partial last chunk, then continued
# Both engines compute at most TAIL tokens a step, so plain vLLM's cold answer to CONTINUED computes what kvmesh's
# engine does (the stored TAIL in one step, then the rest): bf16 rounding depends on where a prefill is split.
SCHEDULING = ["--max-num-batched-tokens", str(TAIL)]
FILLERS = 2 * len(REPEATED) + 2


@pytest.fixture(scope="module")
def model(demo_model: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(fewer_heads(demo_model, tmp_path_factory.mktemp("models") / "demo-2-kv-heads", kv_heads=2))


@pytest.fixture(scope="module")
def prompts(model: str) -> dict[str, list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model, local_files_only=True)
    docs = document_token_ids(tokenizer, len(REPEATED) + FILLERS + 1, 700, seed=23)
    named = {name: docs[index][:length] for index, (name, length) in enumerate(REPEATED.items())}
    for index in range(FILLERS):
        named[f"filler-{index}"] = docs[len(REPEATED) + index][:600]
    named["tail"], named["continued"] = docs[-1][:TAIL], docs[-1][:CONTINUED]
    return named


def _spec(model: str, kvmesh: dict[str, object] | None) -> EngineSpec:
    # --kv-cache-memory-bytes is per worker, and each worker holds half the heads: half the tokens' bytes
    return EngineSpec(model, kvmesh=kvmesh, kv_pool_tokens=POOL_TOKENS // 2, max_model_len=MAX_LEN,
                      extra_args=TP + SCHEDULING, extra_env=ONE_CORE_EACH, embedded_defaults=True)


def _ask(server: EngineServer, prompt: list[int]) -> str:
    return stream_completion(server.base_url, server.model, prompt, ANSWER).text


@pytest.fixture(scope="module")
def reference(model: str, prompts: dict[str, list[int]], tmp_path_factory: pytest.TempPathFactory
              ) -> dict[str, tuple[str, str]]:
    """(computed, from plain vLLM's own cache) answers of each prompt, with the same split."""
    answers = {}
    with EngineServer(_spec(model, None), tmp_path_factory.mktemp("logs") / "plain-tp.log") as server:
        for name in REPEATED:
            answers[name] = (_ask(server, prompts[name]), _ask(server, prompts[name]))
        answers["continued"] = (_ask(server, prompts["continued"]), "")
    return answers


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    chosen = default_path_settings(tmp_path_factory.mktemp("tp"), "vllm-tp")
    yield chosen
    stop_settings_daemon(chosen)


def _client(settings: dict[str, object]) -> KVMeshClient:
    return KVMeshClient(KVMeshConfig.load({**settings, "autostart_daemon": False}, env={}))


def _metric(settings: dict[str, object], name: str) -> float:
    with _client(settings) as client:
        return client.metrics().get(name, 0.0)


def test_two_tensor_parallel_workers_are_served_their_own_heads_after_eviction(
        model: str, prompts: dict[str, list[int]], reference: dict[str, tuple[str, str]],
        settings: dict[str, object], tmp_path: Path) -> None:
    fillers = iter(prompts[f"filler-{index}"] for index in range(FILLERS))
    with EngineServer(_spec(model, settings), tmp_path / "kvmesh-tp.log") as server:
        computed = {name: _ask(server, prompts[name]) for name in REPEATED}
        with _client(settings) as client:
            engines = client.info()["engines"]
        served = {}
        for name in REPEATED:
            _ask(server, next(fillers))  # two fresh prompts push it out of both workers' own pools
            _ask(server, next(fillers))
            before = _metric(settings, "kvmesh_loaded_tokens_total")
            answer = _ask(server, prompts[name])
            served[name] = (answer, _metric(settings, "kvmesh_loaded_tokens_total") - before)
        _ask(server, prompts["tail"])  # stored with a partial last chunk: each rank its own entry of it
        _ask(server, next(fillers))
        _ask(server, next(fillers))
        before = _metric(settings, "kvmesh_loaded_tokens_total")
        continued = (_ask(server, prompts["continued"]), _metric(settings, "kvmesh_loaded_tokens_total") - before)
        mismatches = _metric(settings, "kvmesh_load_verify_mismatches_total")
        verified = _metric(settings, "kvmesh_load_verified_chunks_total")
        with _client(settings) as client:  # kvmesh explain --engine: a chunk is stored where both ranks hold it
            prompt = prompts["two-chunks-and-tail"]
            report = explain_prompt(client, engine_record(client.info()["engines"], server.model), server.model,
                                    prompt)
    workers = [e for e in engines if e.get("role") == "worker"]
    assert len(workers) == 2  # both ranks keep a link to the node's daemon
    for name in REPEATED:
        answer, loaded = served[name]
        assert computed[name] == reference[name][0], name  # the same split computes the same answer
        assert loaded == len(prompts[name]) - 1, name  # every rank's share of every chunk was there
        assert answer == reference[name][1], name
    assert continued == (reference["continued"][0], TAIL)  # both ranks found the stored tail; same answer
    assert verified >= 2 * len(REPEATED) and mismatches == 0  # each worker's loaded pages are its stored ones
    assert report.hit_tokens == len(prompt), report.reason  # every chunk, the partial last one too, on both ranks
    stored = [place for place in report.chunks if place.tier != "missing"]
    assert stored and all(place.tier == "L1" and place.codec == "raw" for place in stored)
    per_token = kv_bytes_per_token(model)  # both ranks' halves of the heads together
    assert [place.nbytes for place in stored] == [-(-place.key.num_tokens // 128) * 128 * per_token for place in stored]
