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
