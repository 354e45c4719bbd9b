"""The router's proxy: bytes through unchanged, retries before the first byte, clear errors.

The upstream here is a small HTTP server that answers with bytes fixed in advance (a real engine's answers
carry ids and times, so "byte for byte" needs an upstream whose bytes are known); everything an engine does
for real is tested against vLLM in ``test_router_engines.py``.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from kvmesh.config import KVMeshConfig
from kvmesh.router import ENGINE_HEADER
from kvmesh.router.app import Router, build_app, parse_engine
from kvmesh.router.nodes import RouterConfigError

PIECES = [b'data: {"id":"x","choices":[{"text":"Hel"}]}\n\n', b'data: {"id":"x","choices":[{"text":"lo"}]}\n',
          b'\ndata: {"id":"x","choices":[],"usage":{"prompt_tokens":9,"prompt_tokens_details":{"cached_tokens":4}}}',
          b"\n\ndata: [DONE]\n\n"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _upstream(received: list[dict] | None = None, model: str = "not-a-local-model",
              tokenized: list[dict] | None = None) -> FastAPI:
    app = FastAPI()
    received = [] if received is None else received
    tokenized = [] if tokenized is None else tokenized

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200)

    @app.get("/v1/models")
    async def models() -> Response:
        return JSONResponse({"data": [{"id": model}]})

    @app.post("/tokenize")
    async def tokenize(request: Request) -> Response:
        body = await request.json()
        tokenized.append(body)
        return JSONResponse({"tokens": list(range(len(json.dumps(body))))})

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = await request.json()
        received.append(body)
        if (body.get("kv_transfer_params") or {}).get("do_remote_decode"):  # as kvmesh's connector answers
            return JSONResponse({"kv_transfer_params": {"do_remote_prefill": True, "kvmesh": {"stored_tokens": 7}}})
        if body.get("stream"):
            async def pieces() -> AsyncIterator[bytes]:
                for piece in PIECES:
                    yield piece
                    await asyncio.sleep(0.01)
            return StreamingResponse(pieces(), media_type="text/event-stream")
        usage = {"prompt_tokens": 9, "prompt_tokens_details": {"cached_tokens": 4}}
        return JSONResponse({"echo": body, "usage": usage})

    return app


@contextmanager
def _serving(app: FastAPI) -> Iterator[str]:
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    with _serving(_upstream()) as url:
        yield url


def _run(router: Router, requests: list[tuple[str, str, bytes]]) -> list[httpx.Response]:
    async def go() -> list[httpx.Response]:
        await router.start()
        try:
            transport = httpx.ASGITransport(app=build_app(router))
            async with httpx.AsyncClient(transport=transport, base_url="http://router") as client:
                return [await client.request(method, path, content=body) for method, path, body in requests]
        finally:
            await router.stop()
    return asyncio.run(go())


def _router(engines: list[str], policy: str = "round-robin", tmp_path=None) -> Router:
    config = KVMeshConfig.from_mapping({"socket_dir": str(tmp_path), "autostart_daemon": False})
    return Router([parse_engine(url) for url in engines], policy, config)


def test_a_streamed_answer_comes_through_byte_for_byte(upstream: str, tmp_path) -> None:
    router = _router([upstream], "cache", tmp_path)
    body = json.dumps({"model": "not-a-local-model", "prompt": "Hello", "stream": True}).encode()
    [reply] = _run(router, [("POST", "/v1/completions", body)])
    assert reply.status_code == 200
    assert reply.content == b"".join(PIECES)
    assert reply.headers[ENGINE_HEADER] == upstream
    # the cached tokens were read from the stream's usage
    assert router.metrics.registry.get_sample_value("kvmesh_router_actual_cached_tokens_total") == 4


def test_an_engine_that_died_since_its_health_check_is_skipped_before_the_first_byte(upstream: str, tmp_path) -> None:
    dead = f"http://127.0.0.1:{_free_port()}"
    router = _router([dead, upstream], "round-robin", tmp_path)
    original = router.start

    async def start_then_die() -> None:
        await original()
        router.engines[dead].up = True  # it answered its last health check, and is gone now
        router.engines[dead].model = "not-a-local-model"

    router.start = start_then_die  # type: ignore[method-assign]
    body = json.dumps({"model": "not-a-local-model", "prompt": "Hi"}).encode()
    replies = _run(router, [("POST", "/v1/completions", body)] * 3)
    assert [r.status_code for r in replies] == [200, 200, 200]
    assert all(r.headers[ENGINE_HEADER] == upstream for r in replies)
    assert all(r.json()["echo"] == {"model": "not-a-local-model", "prompt": "Hi"} for r in replies)
    assert router.metrics.registry.get_sample_value("kvmesh_router_retries_total", {"engine": dead}) >= 1
    assert router.engines[dead].up is False


def test_no_engine_up_and_a_body_that_is_not_json_are_answered_with_clear_errors(upstream: str, tmp_path) -> None:
    down = _router([f"http://127.0.0.1:{_free_port()}"], "cache", tmp_path)
    [reply] = _run(down, [("POST", "/v1/completions", b'{"prompt": "x"}')])
    assert reply.status_code == 503 and "no engine is up" in reply.json()["error"]["message"]
    [health] = _run(_router([f"http://127.0.0.1:{_free_port()}"], "cache", tmp_path), [("GET", "/health", b"")])
    assert health.status_code == 503
    [bad] = _run(_router([upstream], "cache", tmp_path), [("POST", "/v1/completions", b"{not json")])
    assert bad.status_code == 400 and "not a JSON object" in bad.json()["error"]["message"]


def test_engine_arguments_are_checked() -> None:
    assert parse_engine("http://127.0.0.1:8000/") == ("http://127.0.0.1:8000", None)
    assert parse_engine("http://127.0.0.1:8000@node-a") == ("http://127.0.0.1:8000", "node-a")
    for bad in ("127.0.0.1:8000", "ftp://host:1", "http://"):
        with pytest.raises(RouterConfigError, match="expected http://HOST:PORT"):
            parse_engine(bad)
    with pytest.raises(RouterConfigError, match="more than once"):
        Router([("http://a:1", None), ("http://a:1", None)])
    with pytest.raises(RouterConfigError, match="at least one"):
        Router([])
    with pytest.raises(RouterConfigError, match="--check-fraction"):
        Router([("http://a:1", None)], check_fraction=2.0)


def test_prefill_decode_computes_the_prompt_on_a_prefill_engine_then_answers_on_a_decode_engine(tmp_path) -> None:
    """The prefill engine gets the request for one token, not streamed, marked do_remote_decode; the decode
    engine gets the client's bytes unchanged and answers; the answer is the decode engine's."""
    to_prefill: list[dict] = []
    to_decode: list[dict] = []
    with _serving(_upstream(to_prefill)) as prefill, _serving(_upstream(to_decode)) as decode:
        config = KVMeshConfig.from_mapping({"socket_dir": str(tmp_path), "autostart_daemon": False})
        router = Router([(decode, None)], "cache", config, prefill=[(prefill, None)])
        asked = {"model": "not-a-local-model", "prompt": "Hello", "stream": True, "max_tokens": 9,
                 "stream_options": {"include_usage": True}, "kv_transfer_params": {"kvmesh": {"explain": True}}}
        [reply] = _run(router, [("POST", "/v1/completions", json.dumps(asked).encode())])
    assert reply.status_code == 200 and reply.headers[ENGINE_HEADER] == decode
    assert reply.content == b"".join(PIECES)
    assert to_decode == [asked]
    assert to_prefill == [{"model": "not-a-local-model", "prompt": "Hello", "max_tokens": 1, "stream": False,
                           "kv_transfer_params": {"kvmesh": {"explain": True}, "do_remote_decode": True}}]
    registry = router.metrics.registry
    assert registry.get_sample_value("kvmesh_router_handoffs_total", {"outcome": "prefilled"}) == 1
    # the stream's usage says 4 cached where the prefill stored 7 (of a longer prompt): 3 short
    assert registry.get_sample_value("kvmesh_router_handoff_shortfall_tokens_total") == 3


def test_engines_join_and_leave_while_the_router_runs(upstream: str, tmp_path) -> None:
    other = f"http://127.0.0.1:{_free_port()}"
    router = _router([other], "cache", tmp_path)
    body = json.dumps({"model": "not-a-local-model", "prompt": "Hi"}).encode()
    replies = _run(router, [("POST", "/v1/completions", body),
                            ("POST", "/router/engines", json.dumps({"url": upstream}).encode()),
                            ("POST", "/v1/completions", body),
                            ("POST", "/router/engines", json.dumps({"url": "not a url"}).encode()),
                            ("DELETE", f"/router/engines?url={upstream}", b""),
                            ("POST", "/v1/completions", body),
                            ("GET", "/router/engines", b"")])
    assert replies[0].status_code == 503  # the only engine is down
    assert replies[1].json()["up"] is True
    assert replies[2].status_code == 200 and replies[2].headers[ENGINE_HEADER] == upstream
    assert replies[3].status_code == 400 and "expected http://HOST:PORT" in replies[3].json()["error"]["message"]
    assert replies[4].status_code == 200
    assert replies[5].status_code == 503
    assert [e["url"] for e in replies[6].json()["engines"]] == [other]


def test_a_request_naming_a_lora_adapter_gets_no_cache_credit(upstream: str, tmp_path) -> None:
    """The node holds the prompt under the engine's own namespace; a request for the base model is credited
    with it, one naming an adapter (whose chunks live in a namespace of the adapter's files) is not."""
    import torch

    from kvmesh.client import KVMeshClient
    from kvmesh.keys import chunk_keys, model_namespace

    namespace = model_namespace("lora-test-model", "layout", "")
    record = {"role": "scheduler", "model": "not-a-local-model", "fingerprint": "lora-test-model",
              "layout_fingerprint": "layout", "namespace": namespace.hex(), "chunk_size": 16, "partial_chunks": True,
              "api_port": int(upstream.rsplit(":", 1)[1])}
    config = KVMeshConfig.from_mapping({"socket_dir": str(tmp_path), "instance": "lora-node", "l1_size": "16MiB",
                                        "l1_prefault": False, "http_port": 0})
    prompt = {"model": "not-a-local-model", "prompt": "Hello"}
    tokens = list(range(len(json.dumps(prompt))))  # what the upstream's /tokenize answers for it
    keys = chunk_keys(tokens, namespace, 16)
    with KVMeshClient(config, engine=record) as engine_side:
        try:
            engine_side.put(keys, [torch.zeros(2, 16, dtype=torch.bfloat16)] * len(keys))
            router = _router([upstream], "cache", tmp_path)
            replies = _run(router, [("POST", "/v1/completions", json.dumps(prompt).encode()),
                                    ("POST", "/v1/completions", json.dumps({**prompt, "model": "my-lora"}).encode())])
        finally:
            engine_side.shutdown_daemon()
    assert [r.status_code for r in replies] == [200, 200]
    registry = router.metrics.registry
    assert registry.get_sample_value("kvmesh_router_predicted_cached_tokens_total") == keys[-1].end  # the first only
    assert registry.get_sample_value("kvmesh_router_requests_total", {"engine": upstream, "cache": "miss"}) == 1


def test_a_tokenizer_that_differs_from_the_engines_is_dropped_for_the_engines_own(tmp_path) -> None:
    """The engine serves the demo model, whose tokenizer the router loads; this engine's /tokenize answers
    other tokens, so the check at start counts a mismatch and the router asks the engine for every prompt."""
    from kvmesh.demo.model import default_model_dir, prepare_demo_model

    model = str(prepare_demo_model(default_model_dir()))
    tokenized: list[dict] = []
    with _serving(_upstream(model=model, tokenized=tokenized)) as upstream:
        router = _router([upstream], "cache", tmp_path)
        body = json.dumps({"model": model, "prompt": "Which tokens?"}).encode()
        [reply] = _run(router, [("POST", "/v1/completions", body)])
    assert reply.status_code == 200
    assert router.metrics.registry.get_sample_value("kvmesh_router_token_mismatches_total") == 1
    assert router.tokenizers[model] is None
    assert tokenized[-1] == {"model": model, "prompt": "Which tokens?"}  # the request's prompt, by the engine


def test_under_round_robin_a_prompt_the_decode_node_holds_skips_the_prefill(tmp_path) -> None:
    """P/D with a policy that does not ask the nodes to choose: the decode engine's node is still asked whether
    it holds the prompt, and a held prompt goes to the decode engine alone; one it does not hold is prefilled."""
    import torch

    from kvmesh.client import KVMeshClient
    from kvmesh.keys import chunk_keys, model_namespace

    to_prefill: list[dict] = []
    held = {"model": "not-a-local-model", "prompt": "A prompt the decode node holds"}
    # the upstream tokenizes any body as 0, 1, 2, ...: a longer prompt goes on past what the node holds
    other = {"model": "not-a-local-model", "prompt": "A prompt the decode node holds only the start of " * 3}
    namespace = model_namespace("pd-skip-model", "layout", "")
    tokens = list(range(len(json.dumps(held))))  # what the upstream's /tokenize answers for it
    keys = chunk_keys(tokens, namespace, 16)
    config = KVMeshConfig.from_mapping({"socket_dir": str(tmp_path), "instance": "pd-skip-node", "l1_size": "16MiB",
                                        "l1_prefault": False, "http_port": 0})
    with _serving(_upstream(to_prefill)) as prefill, _serving(_upstream()) as decode:
        record = {"role": "scheduler", "model": "not-a-local-model", "fingerprint": "pd-skip-model",
                  "layout_fingerprint": "layout", "namespace": namespace.hex(), "chunk_size": 16,
                  "partial_chunks": True, "api_port": int(decode.rsplit(":", 1)[1])}
        with KVMeshClient(config, engine=record) as decode_node:
            try:
                decode_node.put(keys, [torch.zeros(2, 16, dtype=torch.bfloat16)] * len(keys))
                router = Router([(decode, None)], "round-robin", KVMeshConfig.from_mapping(
                    {"socket_dir": str(tmp_path), "autostart_daemon": False}), prefill=[(prefill, None)])
                replies = _run(router, [("POST", "/v1/completions", json.dumps(held).encode()),
                                        ("POST", "/v1/completions", json.dumps(other).encode())])
            finally:
                decode_node.shutdown_daemon()
    assert [r.status_code for r in replies] == [200, 200]
    assert all(r.headers[ENGINE_HEADER] == decode for r in replies)
    assert [body["prompt"] for body in to_prefill] == [other["prompt"]]  # the held prompt was not prefilled
    registry = router.metrics.registry
    assert registry.get_sample_value("kvmesh_router_handoffs_total", {"outcome": "skipped"}) == 1
    assert registry.get_sample_value("kvmesh_router_handoffs_total", {"outcome": "prefilled"}) == 1


def test_engines_of_one_model_share_one_prefill_speed(upstream: str, tmp_path) -> None:
    with _serving(_upstream()) as same, _serving(_upstream(model="another-model")) as other:
        router = _router([upstream, same, other], "cache", tmp_path)
        _run(router, [("GET", "/router/engines", b"")])
    loads = {url: engine.load for url, engine in router.engines.items()}
    assert loads[upstream].speed is loads[same].speed  # one model: learned together (PrefillSpeed)
    assert loads[other].speed is not loads[upstream].speed
