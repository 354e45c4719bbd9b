"""What both sides of the vLLM connector derive from vLLM's config: the model's identity and the page format.

Kept free of vLLM imports at module level, so the scheduler and worker sides can be built (and tested)
from a plain :class:`EngineKVShape`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from kvmesh.entry import dtype_name
from kvmesh.keys import Namespace
from kvmesh.layout import KVLayout

if TYPE_CHECKING:
    from vllm.config import VllmConfig

log = logging.getLogger("kvmesh.vllm")


def engine_dtype(value: object) -> torch.dtype:
    """vLLM's ``model_config.dtype``, which its config has resolved to a torch dtype by the time engines start."""
    if not isinstance(value, torch.dtype):
        raise TypeError(f"vLLM's model_config.dtype is {value!r}, not a torch dtype (an unsupported vLLM version?)")
    return value


# vLLM-CPU's attention kernels whose in-page order kvmesh's codecs can read (a kvmesh.entry KV view each)
KNOWN_KERNEL_VIEWS = {"amx": "vllm-cpu-amx", "vec": "vllm-cpu-vec"}


@dataclass(frozen=True, slots=True)
class PageKernel:
    """The attention kernel that packs the engine's pages: its exact name and the view codecs read.

    ``name`` is part of every key's namespace, so engines whose kernels pack pages differently never share
    an entry, through Redis or a shared disk included.  Kernels kvmesh cannot read (``vec16``, ``neon``,
    ``vsx``, ``rvv``, ...) keep their own name with the ``opaque`` view: stored lossless, shared only with
    the same kernel.  A kernel vLLM does not name is identified by what could decide its order: vLLM's
    version, the CPU's architecture and torch's vector ISA.
    """

    name: str  # e.g. "vllm-cpu.amx", "vllm-cpu.vec16", "vllm-cpu.unnamed-0.32.0-x86_64-AVX512"
    view: str  # a kvmesh.entry KV view: what the lossy codecs may read

    @classmethod
    def of_cpu_isa(cls, isa: str) -> PageKernel:
        return cls(f"vllm-cpu.{isa}", KNOWN_KERNEL_VIEWS.get(isa, "opaque"))


def _unnamed_kernel(platform: str) -> PageKernel:
    import platform as host

    import vllm

    capability = torch.backends.cpu.get_cpu_capability()
    return PageKernel(f"{platform}.unnamed-{vllm.__version__}-{host.machine()}-{capability}", "opaque")


def page_kernel(dtype: torch.dtype, block_size: int, head_size: int) -> PageKernel:
    """Which attention kernel vLLM runs on this machine for these pages (vLLM's own choice, asked).

    The kernel is chosen per machine (``amx`` on CPUs with AMX for bf16, ``vec`` on other x86 at block sizes
    that are multiples of 32, ``vec16`` otherwise, ``neon`` on Arm, ...), and each packs K and V its own way.
    """
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return _unnamed_kernel(str(current_platform.device_type or "unknown"))
    try:
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa
    except ImportError as err:  # a vLLM-CPU without this helper: the order is unknown, stay lossless
        log.info("kvmesh: vLLM-CPU's attention kernel is not named (%s); pages stored lossless", err)
        return _unnamed_kernel("vllm-cpu")
    return PageKernel.of_cpu_isa(_get_attn_isa(dtype, block_size, head_size))


def cpu_page_view(dtype: torch.dtype, block_size: int, head_size: int) -> str:
    """The KV view of this machine's pages (``opaque`` where kvmesh cannot read the kernel's order)."""
    return page_kernel(dtype, block_size, head_size).view


class UnsupportedModel(ValueError):
    """A model whose exact KV kvmesh cannot store: refused at start, never served approximately."""


# what vLLM says of a model (its ModelConfig, or its registry's inspection of an architecture) when it keeps
# state besides attention KV
RECURRENT_STATE_FLAGS = ("is_hybrid", "has_inner_state", "is_attention_free")


def recurrent_state_message(model: object, architecture: str, kinds: list[str]) -> str:
    return (f"kvmesh: the model {model} ({architecture or 'unknown architecture'}; vLLM says {', '.join(kinds)}) "
            "keeps recurrent state beside its attention KV. kvmesh does not store that state yet (nor declare "
            "vLLM's SupportsHMA), so a hit would restore attention KV without it and answer wrongly: run this "
            "model without the kvmesh connector (vLLM's own prefix caching still works)")


def refuse_recurrent_state(model_config: object) -> None:
    """Stop at start for models that keep state besides attention KV (Mamba, gated delta nets, convolutions).

    A hit on such a model is exact only with the recurrent state at the end of the hit restored too;
    kvmesh stores attention KV only, so it would answer from a state that does not match the prompt.  vLLM
    asks the model itself (``is_hybrid``, ``has_inner_state``, ``is_attention_free``): no table of names.
    ``kvmesh serve`` refuses such a model before vLLM starts (``serve.refuse_recurrent_state_model``).
    """
    kinds = [name for name in RECURRENT_STATE_FLAGS if getattr(model_config, name, False)]
    if kinds:
        architectures = getattr(getattr(model_config, "hf_config", None), "architectures", None) or []
        raise UnsupportedModel(recurrent_state_message(getattr(model_config, "model", "?"),
                                                       ", ".join(architectures), kinds))


@dataclass(frozen=True, slots=True)
class EngineKVShape:
    """The engine's KV as kvmesh sees it: the model's identity and the page format, both part of every key."""

    model_identity: str  # what names the weights (a fingerprint, or the user's model_fingerprint)
    layout: KVLayout  # one worker's pages: with tensor parallelism, its own share of the KV heads
    tp_world: int = 1  # tensor-parallel workers, each storing its share under keys of its own (keys.RankKeys)

    @classmethod
    def from_vllm(cls, vllm_config: VllmConfig, model_identity: str) -> EngineKVShape:
        model_config, parallel = vllm_config.model_config, vllm_config.parallel_config
        if parallel.pipeline_parallel_size != 1:
            raise ValueError("kvmesh does not support pipeline parallelism yet "
                             f"(pipeline_parallel_size={parallel.pipeline_parallel_size}); "
                             "tensor parallelism is supported")
        refuse_recurrent_state(model_config)
        cache_dtype = vllm_config.cache_config.cache_dtype
        torch_dtype = engine_dtype(model_config.dtype) if cache_dtype == "auto" else None
        if torch_dtype is None:
            raise ValueError(f"kvmesh stores bf16/fp16/fp32 KV; cache_dtype={cache_dtype!r} is not supported yet")
        block_size = vllm_config.cache_config.block_size
        # the kernel is in the namespace: engines whose kernels pack pages differently never share
        kernel = page_kernel(torch_dtype, block_size, model_config.get_head_size())
        layout = KVLayout(
            num_layers=model_config.get_num_layers(parallel),
            num_kv_heads=model_config.get_num_kv_heads(parallel),
            head_size=model_config.get_head_size(),
            dtype=dtype_name(torch_dtype),
            block_size=block_size,
            page_view=kernel.view,
            page_kernel=kernel.name,
            kv_parts=1 if model_config.use_mla else 2,  # MLA pages hold one latent per token, not K and V
        )
        return cls(model_identity, layout, parallel.tensor_parallel_size)

    def namespace(self, salt: str) -> Namespace:
        return self.layout.namespace(self.model_identity, salt)
