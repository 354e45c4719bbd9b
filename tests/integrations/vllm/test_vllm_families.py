"""The model-coverage matrix: one tiny random-weight checkpoint per attention family, through `kvmesh serve`.

Each family (``kvmesh.demo.variants.FAMILIES``: Qwen2, Qwen3 with QK-norm, Mistral with a sliding window of
128 tokens, a Mixtral MoE, a DeepSeek-V2 MLA model with one latent per token; ``HYBRID_FAMILIES``: NemotronH,
Mamba2 layers beside attention) runs one engine on kvmesh's defaults, with vLLM's hybrid KV-cache manager on.
Per prompt of ``128·k + 1`` tokens: computed, then served from vLLM's own cache (all but the last token),
then, once fresh prompts have pushed it out of the engine's pool, served from kvmesh to the same depth: the
answer must be the engine's own cache-hit answer token for token, and the loaded pages the stored bytes.
The Llama-style demo model is the family of every other vLLM test.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from engine_settings import default_path_settings, observer, stop_settings_daemon
from kvmesh.bench.openai_client import stream_completion
from kvmesh.bench.servers import EngineServer, EngineSpec
from kvmesh.bench.texts import document_token_ids
from kvmesh.client import KVMeshClient
from kvmesh.demo.variants import FAMILIES, HYBRID_FAMILIES, tiny_checkpoint

pytestmark = pytest.mark.slow

BLOCK = 128
POOL_TOKENS = 10 * BLOCK
MAX_LEN = 1024
ANSWER = 16
LENGTHS = (2 * BLOCK + 1, 3 * BLOCK + 1)
HYBRID_LENGTHS = (2 * BLOCK + 1, 4 * BLOCK + 1)
HYBRID_POOL_BLOCKS = 14  # a 1,024-token request's 8 attention blocks and its states, and little else
FILLERS_EACH = 7  # fresh 600-token prompts before each served-from-kvmesh request (the sliding-window model
# kept its own hit through 3 of them)


@pytest.fixture(scope="module")
def prompts(demo_model: Path) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(demo_model), local_files_only=True)
    return document_token_ids(tokenizer, len(LENGTHS) * (1 + FILLERS_EACH), 600, seed=31)


def _served_as_from_its_own_cache(family: str, lengths: tuple[int, ...], demo_model: Path,
                                  prompts: list[list[int]], base: Path, extra_args: list[str],
                                  pool_tokens: int | None = POOL_TOKENS) -> None:
    """Per prompt: computed, then vLLM's own hit, then (pushed out of the engine's pool) kvmesh's hit of
    ``length - 1`` tokens, whose answer must be the own hit's."""
    model = str(tiny_checkpoint(family, demo_model, base / "model"))
    settings = default_path_settings(base, "family")
    watcher = observer(settings)
    spec = EngineSpec(model, kvmesh=settings, kv_pool_tokens=pool_tokens, max_model_len=MAX_LEN,
                      embedded_defaults=True, extra_args=extra_args)
    asked, fillers = prompts[:len(lengths)], iter(prompts[len(lengths):])
    try:
        with EngineServer(spec, base / "engine.log") as server:
            def ask(prompt: list[int]) -> str:
                return stream_completion(server.base_url, model, prompt, ANSWER).text

            for doc, length in zip(asked, lengths):
                prompt = doc[:length]
                ask(prompt)
                own_hit = ask(prompt)
                for _ in range(FILLERS_EACH):
                    ask(next(fillers))
                with KVMeshClient(watcher) as client:
                    before = client.metrics().get("kvmesh_loaded_tokens_total", 0.0)
                    served = ask(prompt)
                    metrics = client.metrics()
                assert metrics.get("kvmesh_loaded_tokens_total", 0.0) - before == length - 1, (family, length)
                assert served == own_hit, (family, length)
            assert metrics.get("kvmesh_load_verify_mismatches_total", 0.0) == 0
            assert metrics.get("kvmesh_load_verified_chunks_total", 0.0) >= len(lengths)
    finally:
        stop_settings_daemon(settings, settle=5.0)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_family_is_served_from_kvmesh_as_from_its_own_cache(
        family: str, demo_model: Path, prompts: list[list[int]], tmp_path_factory: pytest.TempPathFactory) -> None:
    _served_as_from_its_own_cache(family, LENGTHS, demo_model, prompts, tmp_path_factory.mktemp(family), [])


@pytest.mark.parametrize("family", HYBRID_FAMILIES)
def test_a_hybrid_model_is_served_from_kvmesh_with_its_recurrent_state(
        family: str, demo_model: Path, prompts: list[list[int]], tmp_path_factory: pytest.TempPathFactory) -> None:
    """Mamba layers beside attention: a hit restores the attention KV and the state after its last token.

    vLLM keeps a state per 128-token block and hits only where one is kept: prompts of ``128·k + 1`` tokens
    whose depth, ``128·k``, ends a kvmesh chunk (256 tokens), so kvmesh's hit is as deep as vLLM's own.
    ``kvmesh serve`` sets prefill steps of one block itself (vLLM-CPU's Mamba kernels need them); these
    checkpoints run in fp32 only.  The pool is given in blocks: the state and attention groups share them.
    """
    _served_as_from_its_own_cache(family, HYBRID_LENGTHS, demo_model, prompts, tmp_path_factory.mktemp(family),
                                  ["--dtype", "float32", "--num-gpu-blocks-override", str(HYBRID_POOL_BLOCKS)],
                                  pool_tokens=None)
