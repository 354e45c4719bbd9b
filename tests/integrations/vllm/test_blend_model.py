"""Which engines blend: decided from vLLM's config before any request, with the reason in words."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from kvmesh.blend.compute import torch_attention
from kvmesh.integrations.vllm.blend_model import BlendUnavailable, EngineAttention, engine_model, why_not_blend


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


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_the_engines_attention_kernel_computes_what_torchs_does_for_scattered_queries(dtype, tolerance) -> None:
    """Runs of consecutive queries, single ones (decode steps for the kernel) and a prompt's first token."""
    if not EngineAttention.available():
        pytest.skip("this vLLM build has no CPU attention kernel")
    generator = torch.Generator().manual_seed(0)
    count, heads, kv_heads, dim = 700, 6, 2, 64
    positions = torch.tensor([0, 1, 2, 40, 41, 42, 43, 130, 255, 256, 257, 400, *range(500, 540), 699])
    keys = torch.randn(count, kv_heads, dim, generator=generator).to(dtype)
    values = torch.randn(count, kv_heads, dim, generator=generator).to(dtype)
    queries = torch.randn(len(positions), heads, dim, generator=generator).to(dtype)
    engine = EngineAttention(heads, kv_heads, dim, dtype, dim ** -0.5)(queries, positions, keys, values)
    expected = torch_attention(queries, positions, keys, values)
    torch.testing.assert_close(engine.float(), expected.float(), atol=tolerance, rtol=tolerance)
    everything = torch.arange(300, 700)  # one run: the kernel's causal prefill, from the middle of the prompt
    queries = torch.randn(len(everything), heads, dim, generator=generator).to(dtype)
    torch.testing.assert_close(
        EngineAttention(heads, kv_heads, dim, dtype, dim ** -0.5)(queries, everything, keys, values).float(),
        torch_attention(queries, everything, keys, values).float(), atol=tolerance, rtol=tolerance)
