"""Prefill/decode through kvmesh: ``kvmesh router --prefill P --decode D``, two real engines, on one node
daemon or on two sharing a Redis.

The prefill engine computes the prompt (one token) and its connector stores every chunk; the decode engine
loads all of the prompt but its last token (from the node's L1, or from Redis) and computes that one.  Its
answer equals the prefill engine's own answer from its own cache at the same depth (prompts of ``128·k + 1``
tokens, so that vLLM's own hit, which ends at a block, and kvmesh's, which ends at the last token, are the
same depth).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from engine_settings import default_path_settings, stop_settings_daemon
from kvmesh.bench.servers import EngineServer, EngineSpec, RouterServer
from kvmesh.bench.texts import document_token_ids
from kvmesh.router import ENGINE_HEADER
from redis_servers import RedisServer

pytestmark = pytest.mark.slow

MAX_LEN = 2048
POOL_TOKENS = 4096


class PD:
    def __init__(self, prefill: EngineServer, decode: EngineServer, router: str, decode_settings: dict[str, object]
                 ) -> None:
        self.prefill, self.decode, self.router = prefill, decode, router
        self.decode_settings = decode_settings

    def decode_daemon_log(self, lines: int = 30) -> str:
        """The end of the decode node's daemon log (its faults are logged there)."""
        path = Path(str(self.decode_settings["socket_dir"])) / f"{self.decode_settings['instance']}.log"
        return "\n".join(path.read_text().splitlines()[-lines:]) if path.exists() else f"({path} is missing)"

    def metric(self, name: str) -> float:
        text = httpx.get(f"{self.router}/metrics", timeout=10).text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


@pytest.fixture(scope="module", params=["one-node", "two-nodes-redis"])
def pd(request: pytest.FixtureRequest, model: str, tmp_path_factory: pytest.TempPathFactory,
       redis_server: RedisServer) -> Iterator[PD]:
    """``one-node``: both engines on one daemon, the prompt handed over in its L1.  ``two-nodes-redis``: a
    daemon each, sharing a Redis the prefill node writes through (stored before the prefill answers)."""
    base = tmp_path_factory.mktemp("pd")
    if request.param == "one-node":
        settings = [default_path_settings(base, "pd")] * 2
    else:
        # the decode node's lookups wait for Redis up to 5 s, and reads and writes up to 10 s: on a CI machine's
        # two busy cores a round trip can take longer than the defaults (50 ms, 2 s), and a call that times out
        # is a miss (which the test would take for a lost handoff); the engines wait for their daemon longer
        # still (a lookup past call_timeout_seconds is a lost connection, seen once in CI at 1 s)
        shared = {"redis_url": redis_server.url, "redis_namespace": f"pd-{uuid.uuid4().hex[:8]}", "disk_path": "",
                  "redis_lookup_timeout_seconds": 5.0, "redis_timeout_seconds": 10.0, "call_timeout_seconds": 15.0}
        settings = [default_path_settings(base, "prefill", redis_write_policy="write_through", **shared),
                    default_path_settings(base, "decode", **shared)]
    engines = [EngineServer(EngineSpec(model, kvmesh=s, kv_pool_tokens=POOL_TOKENS, max_model_len=MAX_LEN,
                                       extra_env={"VLLM_CPU_OMP_THREADS_BIND": core}), base / f"engine-{core}.log")
               for s, core in zip(settings, ("0", "1"))]
    router = None
    try:
        for engine in engines:
            engine.start()
        router = RouterServer([engines[1].base_url], base / "router.log", str(settings[0]["socket_dir"]),
                              prefill=[engines[0].base_url]).start()
        yield PD(engines[0], engines[1], router.base_url, settings[1])
    finally:
        if router is not None:
            router.stop()
        for engine in engines:
            engine.stop()
        for s in settings[: 1 if request.param == "one-node" else 2]:
            stop_settings_daemon(s)


@pytest.fixture(scope="module")
def prompts(model: str) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model, local_files_only=True)
    lengths = (3 * 128 + 1, 5 * 128 + 1)
    return [doc[:length] for doc, length in zip(document_token_ids(tokenizer, 2, 700, seed=61), lengths)]


def test_the_decode_engine_computes_one_prompt_token_and_answers_as_the_engines_own_hit(
        pd: PD, model: str, prompts: list[list[int]]) -> None:
    for prompt in prompts:
        body = {"model": model, "prompt": prompt, "max_tokens": 16, "temperature": 0,
                "kv_transfer_params": {"kvmesh": {"explain": True}}}  # a shortfall then says why
        handed = httpx.post(f"{pd.router}/v1/completions", json=body, timeout=300)
        assert handed.status_code == 200, handed.text
        assert handed.headers[ENGINE_HEADER] == pd.decode.base_url
        usage = handed.json()["usage"]
        told = (handed.json().get("kv_transfer_params") or {}).get("kvmesh")
        assert usage["prompt_tokens_details"]["cached_tokens"] == len(prompt) - 1, (  # one prompt token computed
            f"the decode engine's kvmesh summary: {told}; its daemon's log ends: {pd.decode_daemon_log()}")
        # the reference: the prefill engine's own answer from its own cache (it computed the prompt once)
        own = httpx.post(f"{pd.prefill.base_url}/v1/completions", json=body, timeout=300).json()
        assert own["usage"]["prompt_tokens_details"]["cached_tokens"] == len(prompt) - 1
        assert handed.json()["choices"][0]["text"] == own["choices"][0]["text"]
    assert pd.metric('kvmesh_router_handoffs_total{outcome="prefilled"}') == len(prompts)
    assert pd.metric("kvmesh_router_handoff_shortfall_tokens_total") == 0


def test_a_prompt_the_decode_node_holds_skips_the_prefill_and_a_chat_streams_through(
        pd: PD, model: str, prompts: list[list[int]]) -> None:
    again = httpx.post(f"{pd.router}/v1/completions", timeout=300,
                       json={"model": model, "prompt": prompts[0], "max_tokens": 4})
    assert again.status_code == 200
    assert pd.metric('kvmesh_router_handoffs_total{outcome="skipped"}') >= 1
    chat = {"model": model, "max_tokens": 8, "stream": True, "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": "Tell me about prefill and decode. " * 40}]}  # > a chunk
    with httpx.stream("POST", f"{pd.router}/v1/chat/completions", json=chat, timeout=300) as reply:
        assert reply.status_code == 200
        lines = [line for line in reply.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    usage = next(line for line in reversed(lines) if '"usage"' in line and '"prompt_tokens"' in line)
    details = json.loads(usage[6:])["usage"]
    assert details["prompt_tokens_details"]["cached_tokens"] == details["prompt_tokens"] - 1


def test_a_prefill_engine_that_is_down_leaves_the_prompt_to_the_decode_engine(
        pd: PD, model: str, prompts: list[list[int]]) -> None:
    pd.prefill.stop()
    reply = httpx.post(f"{pd.router}/v1/completions", timeout=300,
                       json={"model": model, "prompt": list(reversed(prompts[1])), "max_tokens": 4})
    assert reply.status_code == 200, reply.text
    assert reply.headers[ENGINE_HEADER] == pd.decode.base_url
