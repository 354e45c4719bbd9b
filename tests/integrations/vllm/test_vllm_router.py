"""``kvmesh router`` in front of two real ``kvmesh serve`` engines, each with a daemon of its own (two nodes).

One router process and two engines (one core each) serve the whole module, in order: the router's tokens and
keys equal the connector's; a conversation's later turns go where its history is; a streamed answer comes
through; a stopped daemon costs routing quality only; a stopped engine is skipped without a failed request.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from engine_settings import default_path_settings, observer, stop_settings_daemon
from kvmesh.bench.servers import EngineServer, EngineSpec, RouterServer
from kvmesh.bench.texts import document_token_ids
from kvmesh.client import KVMeshClient
from kvmesh.router import ENGINE_HEADER
from kvmesh.router.nodes import EngineKeys, NodeLink, find_node
from kvmesh.router.prompts import LocalTokenizer, PromptRequest

pytestmark = pytest.mark.slow

MAX_LEN = 2048
POOL_TOKENS = 4096


class Fleet:
    def __init__(self, engines: list[EngineServer], settings: list[dict[str, object]], router: str) -> None:
        self.engines, self.settings, self.router = engines, settings, router

    def post(self, path: str, body: dict[str, object]) -> httpx.Response:
        return httpx.post(f"{self.router}{path}", json=body, timeout=300)


@pytest.fixture(scope="module")
def fleet(model: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    base = tmp_path_factory.mktemp("router")
    settings = [default_path_settings(base, name, disk_path=str(base / f"disk-{name}")) for name in ("a", "b")]
    engines = [EngineServer(EngineSpec(model, kvmesh=s, kv_pool_tokens=POOL_TOKENS, max_model_len=MAX_LEN,
                                       extra_env={"VLLM_CPU_OMP_THREADS_BIND": core}), base / f"engine-{core}.log")
               for s, core in zip(settings, ("0", "1"))]
    router = None
    try:
        for engine in engines:
            engine.start()
        router = RouterServer([e.base_url for e in engines], base / "router.log", str(settings[0]["socket_dir"]),
                              extra_args=["--check-fraction", "1"]).start()
        yield Fleet(engines, settings, router.base_url)
    finally:
        if router is not None:
            router.stop()
        for engine in engines:
            engine.stop()
        for s in settings:
            stop_settings_daemon(s)


@pytest.fixture(scope="module")
def texts(model: str) -> list[str]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model, local_files_only=True)
    return [tokenizer.decode(doc) for doc in document_token_ids(tokenizer, 8, 500, seed=41)]


def _counter(fleet: Fleet, name: str) -> float:
    metrics = httpx.get(f"{fleet.router}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines() if line.startswith(name))


def test_the_routers_tokens_and_keys_are_the_connectors(fleet: Fleet, model: str, texts: list[str]) -> None:
    """For chat (a system prompt; tools), completions and a cache salt: the router's tokens equal the engine's,
    and after the engine served the prompt the router's probe finds its node holding every chunk of it (the
    connector stored them under the keys the router computes), and the other node nothing."""
    tools = [{"type": "function", "function": {"name": "lookup", "description": "Look a word up.",
                                                "parameters": {"type": "object",
                                                               "properties": {"word": {"type": "string"}}}}}]
    bodies = [("chat", {"messages": [{"role": "system", "content": texts[0]},
                                     {"role": "user", "content": "What is this about?"}]}),
              ("chat", {"messages": [{"role": "user", "content": texts[1]}], "tools": tools, "tool_choice": "none"}),
              ("completion", {"prompt": texts[2]}),
              ("completion", {"prompt": texts[3], "cache_salt": "tenant-7"})]
    tokenizer = LocalTokenizer(model)
    links: dict[str, NodeLink] = {}
    config = observer(fleet.settings[0])
    a, b = (find_node(config, engine.base_url, model, None, links) for engine in fleet.engines)
    assert a is not None and b is not None
    for kind, body in bodies:
        path = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
        reply = httpx.post(f"{fleet.engines[0].base_url}{path}", timeout=300,
                           json={"model": model, "max_tokens": 2, "return_token_ids": True, **body})
        assert reply.status_code == 200, reply.text
        served = reply.json()
        tokens = tokenizer.tokens(PromptRequest.of(kind, body))
        engine_tokens = served["prompt_token_ids"] if kind == "chat" else served["choices"][0]["prompt_token_ids"]
        assert tokens == engine_tokens, kind
        salt = body.get("cache_salt")
        for (link, keys), expected in ((a, len(tokens)), (b, 0)):
            namespace = keys.namespace_for("", salt)  # type: ignore[arg-type]
            assert namespace is not None
            assert link.held(keys, tokens, namespace).tokens == expected, (kind, salt)
        if salt:  # another salt names other chunks
            other = a[1].namespace_for("", "tenant-8")
            assert other is not None and a[0].held(a[1], tokens, other).tokens == 0
    for link in links.values():
        link.close()
    assert _counter(fleet, "kvmesh_router_token_mismatches_total") == 0
    assert isinstance(a[1], EngineKeys)


def test_a_conversations_later_turns_go_to_the_engine_that_holds_its_history(fleet: Fleet, model: str,
                                                                             texts: list[str]) -> None:
    conversations = [[{"role": "system", "content": texts[4]}], [{"role": "system", "content": texts[5]}]]
    served_by: list[list[str]] = [[], []]
    for turn in range(3):
        for index, history in enumerate(conversations):
            history.append({"role": "user", "content": f"Question {turn}: what comes next?"})
            reply = fleet.post("/v1/chat/completions", {"model": model, "messages": history, "max_tokens": 8,
                                                        "temperature": 0})
            assert reply.status_code == 200, reply.text
            served_by[index].append(reply.headers[ENGINE_HEADER])
            history.append({"role": "assistant", "content": reply.json()["choices"][0]["message"]["content"]})
            if turn:
                cached = reply.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
                assert cached >= 500, (turn, cached)  # the history was found where the turn went
    assert all(len(set(engines)) == 1 for engines in served_by), served_by
    assert _counter(fleet, 'kvmesh_router_requests_total{cache="hit"') >= 4


def test_a_streamed_answer_comes_through(fleet: Fleet, model: str, texts: list[str]) -> None:
    body = {"model": model, "prompt": texts[6][:400], "max_tokens": 6, "temperature": 0}
    whole = fleet.post("/v1/completions", body).json()["choices"][0]["text"]
    with httpx.stream("POST", f"{fleet.router}/v1/completions", json={**body, "stream": True}, timeout=300) as reply:
        assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in reply.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    assert "".join(json.loads(line[6:])["choices"][0]["text"] for line in lines[:-1]) == whole


def test_a_prewarmed_and_pinned_prompt_survives_an_l1_flood(fleet: Fleet, model: str, texts: list[str],
                                                           tmp_path: Path) -> None:
    """kvmesh prewarm --pin stores a chat's system prompt and keeps it in L1; a flood of other prompts larger
    than L1 (256 MiB: ~11k tokens of the demo model) evicts an unpinned prompt prewarmed beside it, not the
    pinned one, and a conversation that starts from the pinned prompt loads it."""
    from transformers import AutoTokenizer

    system = [{"role": "system", "content": texts[6]}]
    (tmp_path / "system.json").write_text(json.dumps(system))
    (tmp_path / "other.txt").write_text(texts[7])
    engine = fleet.engines[0].base_url
    command = [sys.executable, "-m", "kvmesh.cli", "prewarm", "--engine", engine, "--pin",
               "--set", f"socket_dir={fleet.settings[0]['socket_dir']}", str(tmp_path / "system.json")]
    wide = {**os.environ, "COLUMNS": "200"}  # the table on one line a row
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=wide)
    assert done.returncode == 0, done.stderr
    row = next(line for line in done.stdout.splitlines() if "system.json" in line)
    pinned_chunks, not_pinned = [cell.strip() for cell in row.strip("│ ").split("│")][-2:]
    assert int(pinned_chunks) >= 2 and not_pinned == "0"  # every chunk of it pinned
    plain = subprocess.run(command[:6] + command[7:-1] + [str(tmp_path / "other.txt")], capture_output=True,
                           text=True, timeout=300, env=wide)  # prewarmed, not pinned
    assert plain.returncode == 0, plain.stderr
    tokenizer = AutoTokenizer.from_pretrained(model, local_files_only=True)
    for doc in document_token_ids(tokenizer, 14, 900, seed=77):  # ~12.6k tokens through the engine
        reply = httpx.post(f"{engine}/v1/completions", json={"model": model, "prompt": doc, "max_tokens": 1},
                           timeout=300)
        assert reply.status_code == 200, reply.text
    links: dict[str, NodeLink] = {}
    found = find_node(observer(fleet.settings[0]), engine, model, None, links)
    assert found is not None
    link, keys = found
    local = LocalTokenizer(model)
    pinned = local.tokens(PromptRequest("chat", {"messages": system, "add_generation_prompt": False}))
    other = local.tokens(PromptRequest("completion", {"prompt": texts[7]}))
    held_pinned, held_other = link.held(keys, pinned, keys.namespace), link.held(keys, other, keys.namespace)
    link.close()
    assert (held_pinned.tokens, held_pinned.below_l1) == (len(pinned), 0)  # all of it, in L1
    assert held_other.below_l1 > 0 or held_other.tokens < len(other)  # evicted from L1
    question = [*system, {"role": "user", "content": "Summarize that."}]
    reply = httpx.post(f"{engine}/v1/chat/completions", json={"model": model, "messages": question,
                                                              "max_tokens": 4}, timeout=300)
    assert reply.json()["usage"]["prompt_tokens_details"]["cached_tokens"] >= len(pinned) // 128 * 128
    unpinned = subprocess.run([sys.executable, "-m", "kvmesh.cli", "unpin", "--engine", engine, "--all",
                               "--set", f"socket_dir={fleet.settings[0]['socket_dir']}"],
                              capture_output=True, text=True, timeout=120)
    assert unpinned.returncode == 0 and "unpinned" in unpinned.stdout, unpinned.stderr


def test_a_stopped_daemon_costs_routing_quality_only(fleet: Fleet, model: str, texts: list[str]) -> None:
    with KVMeshClient(observer(fleet.settings[0]), check_config=False) as client:
        client.shutdown_daemon()
    for index in range(4):
        reply = fleet.post("/v1/completions", {"model": model, "prompt": texts[index][:300], "max_tokens": 4})
        assert reply.status_code == 200, reply.text


def test_a_stopped_engine_is_skipped_without_a_failed_request(fleet: Fleet, model: str, texts: list[str]) -> None:
    fleet.engines[1].stop()
    for index in range(4):
        reply = fleet.post("/v1/chat/completions", {"model": model, "max_tokens": 4,
                                                    "messages": [{"role": "user", "content": texts[index][:300]}]})
        assert reply.status_code == 200, reply.text
        assert reply.headers[ENGINE_HEADER] == fleet.engines[0].base_url
    listed = httpx.get(f"{fleet.router}/router/engines", timeout=10).json()["engines"]
    assert [e["up"] for e in listed] == [True, False]
