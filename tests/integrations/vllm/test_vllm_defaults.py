"""The default path, end to end: what `kvmesh serve` and the demo run, one request at a time.

kvmesh runs on its defaults here: 256-token chunks (two of vLLM-CPU's 128-token blocks), partial chunks
stored and loaded down to the token, and `kvmesh serve`'s own disk tier.  Only the instance, the socket
folder, the L1 size and `verify_loads` (which compares the loaded pages with the stored bytes; it changes
nothing it checks) are set.

Loads then start and stop inside a block, so the reference needs care: an answer is compared with an
answer whose KV came from the *same* computation, split at the same token.  Any other split changes bf16
rounding.  Both engines, plain vLLM and vLLM with kvmesh, therefore run with one scheduling budget
(``STEP`` tokens a step), and each case is chosen so that the reference computes the same tokens in the
same steps:

- a repeated prompt of ``128·k + 1`` tokens: kvmesh loads all but the last token, which is exactly the
  depth of vLLM's own cache hit (whole blocks), so the reference is plain vLLM's own hit.  With k = 1
  the whole prompt is one partial chunk (under the namespace's root), with k = 2 one full chunk, with
  k = 3 a full chunk and a 129-token partial one;
- a chat's next turn: turn one is ``STEP`` tokens (300: two blocks and 44 tokens), turn two continues it.
  kvmesh loads the 300 tokens (a full chunk and a partial one that ends inside a block) and the engine
  computes the rest in one step.  Plain vLLM without its own hit computes the same turn two in two steps,
  the first 300 tokens, then the rest: the same two computations, so its cold answer is the reference.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine_settings import default_path_settings, stop_settings_daemon
from kvmesh.bench.openai_client import stream_completion
from kvmesh.bench.servers import EngineServer, EngineSpec
from kvmesh.bench.texts import document_token_ids
from kvmesh.client import KVMeshClient
from kvmesh.config import KVMeshConfig

pytestmark = pytest.mark.slow

BLOCK = 128
STEP = 300  # tokens a scheduler step computes at most, in both engines (a chat's first turn is one step)
POOL_TOKENS = 10 * BLOCK  # the engine's own pool: two ~600-token fillers push everything else out
MAX_LEN = 1024
ANSWER = 24
SCHEDULING = ["--max-num-batched-tokens", str(STEP), "--max-num-seqs", "8"]
REPEATED = {"tail-only": BLOCK + 1, "one-chunk": 2 * BLOCK + 1, "chunk-and-tail": 3 * BLOCK + 1}
CHAT_SECOND_TURN = 180  # tokens a second turn adds to the first turn's STEP
FILLERS = 32  # fresh 600-token prompts, two before each case: the engine's own pool then holds none of it


@pytest.fixture(scope="module")
def prompts(model: str) -> dict[str, list[int]]:
    """Prompts that share no tokens with each other (each from its own document)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model, local_files_only=True)
    docs = document_token_ids(tokenizer, 6 + FILLERS, 600, seed=11)
    named = {name: docs[index][:length] for index, (name, length) in enumerate(REPEATED.items())}
    named["chat-turn-1"] = docs[3][:STEP]
    # two second turns after the same first one: after the first is served its own tail is stored too,
    # and a repeat of it would load deeper than the first turn
    named["chat-turn-2"] = docs[3][:STEP] + docs[4][:CHAT_SECOND_TURN]
    named["chat-turn-2b"] = docs[3][:STEP] + docs[5][:CHAT_SECOND_TURN]
    for index in range(FILLERS):
        named[f"filler-{index}"] = docs[6 + index]
    return named


def _spec(model: str, kvmesh: dict[str, object] | None) -> EngineSpec:
    return EngineSpec(model, kvmesh=kvmesh, kv_pool_tokens=POOL_TOKENS, max_model_len=MAX_LEN,
                      extra_args=SCHEDULING, embedded_defaults=True)


def _ask(server: EngineServer, prompt: list[int]) -> str:
    return stream_completion(server.base_url, server.model, prompt, ANSWER).text


@pytest.fixture(scope="module")
def reference(model: str, prompts: dict[str, list[int]], tmp_path_factory: pytest.TempPathFactory
              ) -> dict[str, str]:
    """Each case's reference answer from plain vLLM (see the module docstring for why these)."""
    answers = {}
    with EngineServer(_spec(model, None), tmp_path_factory.mktemp("logs") / "plain.log") as server:
        for name in REPEATED:
            _ask(server, prompts[name])  # computed ...
            answers[name] = _ask(server, prompts[name])  # ... and served from vLLM's own cache
        for name in ("chat-turn-2", "chat-turn-2b"):
            answers[name] = _ask(server, prompts[name])  # cold: STEP tokens, then the rest
    return answers


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    chosen = default_path_settings(tmp_path_factory.mktemp("defaults"), "vllm-defaults")
    yield chosen
    stop_settings_daemon(chosen)


def _metrics(settings: dict[str, object]) -> dict[str, float]:
    with KVMeshClient(KVMeshConfig.load({**settings, "autostart_daemon": False}, env={})) as client:
        return client.metrics()


def _loaded_after(server: EngineServer, settings: dict[str, object], prompt: list[int]
                  ) -> tuple[str, float, list[dict[str, object]]]:
    """The answer to ``prompt`` once the engine's own pool holds none of it, the tokens kvmesh loaded, and the
    daemon's last request summaries (a failed assertion shows why a load fell short)."""
    before = _metrics(settings).get("kvmesh_loaded_tokens_total", 0.0)
    answer = _ask(server, prompt)
    with KVMeshClient(KVMeshConfig.load({**settings, "autostart_daemon": False}, env={})) as client:
        loaded = client.metrics().get("kvmesh_loaded_tokens_total", 0.0) - before
        return answer, loaded, client.recent_requests(limit=2)


def _engine_relinked(settings: dict[str, object]) -> bool:
    """Whether a new daemon has been asked by the engine's scheduler and stored to by its worker.

    Both sides of the connector re-make their link on their own, each after its first call fails; the
    daemon answering this test says nothing about them.
    """
    try:
        metrics = _metrics(settings)
    except ConnectionError:
        return False
    return metrics.get("kvmesh_lookups_total", 0.0) > 0 and metrics.get("kvmesh_stored_tokens_total", 0.0) > 0


def _expected_depth(name: str, prompts: dict[str, list[int]]) -> int:
    return STEP if name.startswith("chat-turn-2") else len(prompts[name]) - 1


def test_the_defaults_serve_the_engines_own_answers_from_l1_and_then_from_disk(
        model: str, prompts: dict[str, list[int]], reference: dict[str, str], settings: dict[str, object],
        tmp_path: Path) -> None:
    fillers = iter(prompts[f"filler-{index}"] for index in range(FILLERS))
    served: dict[tuple[str, str], tuple[str, float]] = {}
    with EngineServer(_spec(model, settings), tmp_path / "kvmesh.log") as server:
        for name in [*REPEATED, "chat-turn-1"]:
            _ask(server, prompts[name])  # computed and stored: full chunks and the partial tail
        for name in [*REPEATED, "chat-turn-2"]:
            _ask(server, next(fillers))  # two fresh prompts fill the engine's own pool
            _ask(server, next(fillers))
            served[name, "L1"] = _loaded_after(server, settings, prompts[name])
        with KVMeshClient(KVMeshConfig.load({**settings, "autostart_daemon": False}, env={})) as client:
            client.flush()  # everything written behind to the disk tier
            client.shutdown_daemon()
        deadline = time.monotonic() + 60
        # the engine re-makes its links and starts a new daemon: an empty L1 over the same disk
        while not _engine_relinked(settings):
            assert time.monotonic() < deadline, "the engine did not link to a new daemon within 60 s"
            _ask(server, next(fillers))
            time.sleep(1)
        for name in [*REPEATED, "chat-turn-2b"]:
            _ask(server, next(fillers))
            _ask(server, next(fillers))
            served[name, "disk"] = _loaded_after(server, settings, prompts[name])
        metrics = _metrics(settings)
    for (name, where), (answer, loaded, summaries) in served.items():
        # kvmesh loaded down to the token it promised (the engine computes the rest itself) ...
        assert loaded == _expected_depth(name, prompts), (name, where, summaries)
        # ... and the answer is token for token the reference's
        assert answer == reference[name], (name, where)
    assert metrics.get("kvmesh_tier_read_bytes_total{tier=disk}", 0.0) > 0
    assert metrics.get("kvmesh_load_verify_mismatches_total", 0.0) == 0
