"""The model-coverage matrix: one tiny random-weight checkpoint per attention family, through `kvmesh serve`.

Each family (``kvmesh.demo.variants.FAMILIES``: Qwen2, Qwen3 with QK-norm, Mistral with a sliding window,
a Mixtral MoE, a DeepSeek-V2 MLA model with one latent per token) runs one engine on kvmesh's defaults.
Per prompt of ``128·k + 1`` tokens: computed, then served from vLLM's own cache (all but the last token),
then, once fresh prompts have pushed it out of the engine's pool, served from kvmesh to the same depth: the
answer must be the engine's own cache-hit answer token for token, and the loaded pages the stored bytes.
The Llama-style demo model is the family of every other vLLM test.  Hybrid models (recurrent state) are not
here: vLLM turns its hybrid KV-cache manager off for kvmesh, and they do not start (README, the matrix).
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
FILLERS_EACH = 3  # fresh 600-token prompts before each served-from-kvmesh request


@pytest.fixture(scope="module")
def prompts(demo_model: Path) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(demo_model), local_files_only=True)
    return document_token_ids(tokenizer, len(LENGTHS) * (1 + FILLERS_EACH), 600, seed=31)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_family_is_served_from_kvmesh_as_from_its_own_cache(
        family: str, demo_model: Path, prompts: list[list[int]], tmp_path_factory: pytest.TempPathFactory) -> None:
    base = tmp_path_factory.mktemp(family)
    model = str(tiny_checkpoint(family, demo_model, base / "model"))
    settings = default_path_settings(base, "family")
    watcher = observer(settings)
    spec = EngineSpec(model, kvmesh=settings, kv_pool_tokens=POOL_TOKENS, max_model_len=MAX_LEN,
                      embedded_defaults=True)
    asked, fillers = prompts[:len(LENGTHS)], iter(prompts[len(LENGTHS):])
    try:
        with EngineServer(spec, base / "engine.log") as server:
            def ask(prompt: list[int]) -> str:
                return stream_completion(server.base_url, model, prompt, ANSWER).text

            for doc, length in zip(asked, LENGTHS):
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
            assert metrics.get("kvmesh_load_verified_chunks_total", 0.0) >= len(LENGTHS)
    finally:
        stop_settings_daemon(settings, settle=5.0)


@pytest.mark.parametrize("family", HYBRID_FAMILIES)
def test_kvmesh_serve_refuses_a_hybrid_model_naming_what_is_missing(
        family: str, demo_model: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    """vLLM starts hybrid models only with its hybrid manager, which it turns off for kvmesh; kvmesh serve says
    why before vLLM starts, instead of vLLM's error about KV cache specs."""
    import subprocess
    import sys

    model = str(tiny_checkpoint(family, demo_model, tmp_path_factory.mktemp(family) / "model"))
    done = subprocess.run([sys.executable, "-m", "kvmesh.cli", "serve", model, "--set", "http_port=0"],
                          capture_output=True, text=True, timeout=300)
    output = " ".join((done.stdout + done.stderr).split())
    assert done.returncode == 2
    assert "NemotronHForCausalLM" in output and "keeps recurrent state beside its attention KV" in output
    assert "kvmesh does not store that state yet" in output
