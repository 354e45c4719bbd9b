"""Which engines blend: decided from vLLM's config before any request, with the reason in words."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from kvmesh.integrations.vllm.blend_model import BlendUnavailable, engine_model, why_not_blend


def _config(load_format: str = "kvmesh", prefix_caching: bool = False, tp: int = 1,
            architectures: tuple[str, ...] = ("LlamaForCausalLM",), rope: dict | None = None) -> SimpleNamespace:
    hf_config = SimpleNamespace(architectures=list(architectures), rope_parameters=rope)
    return SimpleNamespace(load_config=SimpleNamespace(load_format=load_format),
                           cache_config=SimpleNamespace(enable_prefix_caching=prefix_caching),
                           parallel_config=SimpleNamespace(tensor_parallel_size=tp),
                           model_config=SimpleNamespace(hf_config=hf_config))


@pytest.mark.parametrize("config, kinds, reason", [
    (_config(), ["full"], None),
    (_config(rope={"rope_type": "llama3", "factor": 8.0}), ["full"], None),
    (_config(load_format="auto"), ["full"], "load format is 'auto'"),
    (_config(prefix_caching=True), ["full"], "own prefix cache is on"),
    (_config(tp=2), ["full"], "tensor parallelism"),
    (_config(architectures=("DeepseekV3ForCausalLM",)), ["full"], "DeepseekV3ForCausalLM"),
    (_config(), ["full", "window"], "no window"),
    (_config(), ["full", "state"], "recurrent state"),
    (_config(rope={"rope_type": "yarn", "factor": 4.0}), ["full"], "RoPE 'yarn'"),
])
def test_an_engine_blends_only_where_the_blend_path_is_exact_about_what_it_reuses(config, kinds, reason) -> None:
    why = why_not_blend(config, kinds)
    assert why is None if reason is None else reason in why


def test_without_kvmeshs_loader_there_is_no_model_and_the_error_says_how_to_start_vllm() -> None:
    with pytest.raises(BlendUnavailable, match="--load-format kvmesh"):
        engine_model()
