"""The page format's identity is exact: engines whose kernels pack pages differently never share an entry."""

from __future__ import annotations

import pytest
import torch

from kvmesh.client import KVMeshClient
from kvmesh.integrations.vllm.engine_shape import EngineKVShape, PageKernel, page_kernel
from kvmesh.keys import chunk_keys
from kvmesh.layout import KVLayout


def _shape(kernel: PageKernel) -> EngineKVShape:
    return EngineKVShape("fp:model", KVLayout(30, 3, 64, "bfloat16", block_size=128, page_view=kernel.view,
                                              page_kernel=kernel.name))


def test_kernels_kvmesh_reads_get_their_view_and_the_others_stay_lossless() -> None:
    assert PageKernel.of_cpu_isa("amx") == PageKernel("vllm-cpu.amx", "vllm-cpu-amx")
    assert PageKernel.of_cpu_isa("vec") == PageKernel("vllm-cpu.vec", "vllm-cpu-vec")
    for isa in ("vec16", "neon", "vsx", "vxe", "rvv"):
        assert PageKernel.of_cpu_isa(isa) == PageKernel(f"vllm-cpu.{isa}", "opaque")


def test_every_kernel_has_its_own_namespace_lossless_ones_included() -> None:
    kernels = [PageKernel.of_cpu_isa(isa) for isa in ("amx", "vec", "vec16", "neon", "vsx", "vxe", "rvv")]
    assert len({_shape(k).namespace("") for k in kernels}) == len(kernels)


@pytest.mark.parametrize("amx", [True, False])
def test_the_kernel_is_vllms_own_choice_for_this_cpu(monkeypatch: pytest.MonkeyPatch, amx: bool) -> None:
    # a machine cannot change its CPU: vLLM's own kernel choice is asked as if it had AMX or not
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_supported", lambda: True)
    assert page_kernel(torch.bfloat16, 128, 64).name == ("vllm-cpu.amx" if amx else "vllm-cpu.vec")
    assert page_kernel(torch.float32, 128, 64).name == "vllm-cpu.vec"  # AMX packs bf16 only
    assert page_kernel(torch.bfloat16, 16, 64).name == "vllm-cpu.vec16"


def test_engines_with_other_kernels_never_share_an_entry(client: KVMeshClient) -> None:
    """An engine on an AMX node stores a prompt; a vec16 and a vsx engine (both lossless) find none of it."""
    tokens = list(range(100, 612))
    stored = chunk_keys(tokens, _shape(PageKernel.of_cpu_isa("amx")).namespace(""), 128)
    chunks = [torch.randn(2, 1, 128, 2, 64).to(torch.bfloat16) for _ in stored]
    assert client.put(stored, chunks) == len(stored)
    assert client.lookup(stored) == len(stored)
    for isa in ("vec", "vec16", "vsx"):
        assert client.lookup(chunk_keys(tokens, _shape(PageKernel.of_cpu_isa(isa)).namespace(""), 128)) == 0
    vec16 = chunk_keys(tokens, _shape(PageKernel.of_cpu_isa("vec16")).namespace(""), 128)
    assert client.put(vec16[:1], chunks[:1]) == 1
    assert client.lookup(chunk_keys(tokens, _shape(PageKernel.of_cpu_isa("vsx")).namespace(""), 128)) == 0


def _config(*groups: tuple[list[str], object]):
    from vllm.v1.kv_cache_interface import KVCacheConfig, KVCacheGroupSpec

    return KVCacheConfig(num_blocks=8, kv_cache_tensors=[],
                         kv_cache_groups=[KVCacheGroupSpec(names, spec) for names, spec in groups])


def _vec(dtype: torch.dtype, block_size: int, head_size: int) -> PageKernel:
    return PageKernel.of_cpu_isa("vec")


def test_kv_cache_groups_come_from_the_specs_vllm_hands_the_connector() -> None:
    from vllm.v1.kv_cache_interface import FullAttentionSpec, MambaSpec, SlidingWindowSpec

    from kvmesh.integrations.vllm.engine_shape import kv_groups

    full = FullAttentionSpec(block_size=128, num_kv_heads=2, head_size=32, dtype=torch.float32)
    window = SlidingWindowSpec(block_size=128, num_kv_heads=2, head_size=32, dtype=torch.float32, sliding_window=96)
    mamba = MambaSpec(block_size=128, shapes=((3, 288), (8, 32, 16)), dtypes=(torch.float32, torch.float32),
                      mamba_cache_mode="align")
    groups = kv_groups(_config((["layers.10.attn", "layers.2.attn"], full), (["layers.1.attn"], window),
                               (["layers.0.mixer"], mamba)), _vec)
    assert [g.kind for g in groups] == ["full", "window", "state"]
    assert groups[0].layer_names == ("layers.2.attn", "layers.10.attn")  # by layer number, not by text
    assert groups[0].layout == KVLayout(2, 2, 32, "float32", 128, "vllm-cpu-vec", "vllm-cpu.vec")
    assert groups[1].window == 96 and groups[1].layout.num_layers == 1
    assert groups[2].page_elements == (3 * 288 + 8 * 32 * 16) * 4  # one layer's state, in bytes
    # every group's page format is in the namespace, and a single full group keeps the keys it had
    hybrid = EngineKVShape("fp:m", groups[0].layout, 1, groups)
    plain = EngineKVShape("fp:m", groups[0].layout, 1, groups[:1])
    assert plain.namespace("") == EngineKVShape("fp:m", groups[0].layout).namespace("")
    assert len({hybrid.namespace(""), plain.namespace(""),
                EngineKVShape("fp:m", groups[0].layout, 1, groups[:2]).namespace("")}) == 3
    assert hybrid.has_state and not plain.has_state


def test_a_cache_kvmesh_cannot_store_exactly_is_refused_naming_it() -> None:
    from vllm.v1.kv_cache_interface import ChunkedLocalAttentionSpec, FullAttentionSpec, MambaSpec

    from kvmesh.integrations.vllm.engine_shape import UnsupportedModel, kv_groups

    local = ChunkedLocalAttentionSpec(block_size=16, num_kv_heads=1, head_size=8, dtype=torch.float32,
                                      attention_chunk_size=64)
    with pytest.raises(UnsupportedModel, match="ChunkedLocalAttentionSpec KV cache \\(layers l.0\\)"):
        kv_groups(_config((["l.0"], local)), _vec)
    every = MambaSpec(block_size=16, shapes=((4,),), dtypes=(torch.float32,), mamba_cache_mode="all")
    with pytest.raises(UnsupportedModel, match="mamba_cache_mode='all'"):
        kv_groups(_config((["l.0"], every)), _vec)
    small = FullAttentionSpec(block_size=16, num_kv_heads=1, head_size=8, dtype=torch.float32)
    large = FullAttentionSpec(block_size=32, num_kv_heads=1, head_size=8, dtype=torch.float32)
    with pytest.raises(UnsupportedModel, match="one block size across vLLM's KV cache groups; this engine's are 16, 3"):
        kv_groups(_config((["l.0"], small), (["l.1"], large)), _vec)
