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


def cpu_page_view(dtype: torch.dtype, block_size: int, head_size: int) -> str:
    """How vLLM-CPU's attention kernel orders tokens and channels inside its pages (a ``kvmesh.entry`` view).

    The kernel is chosen per machine (``amx`` on CPUs with AMX for bf16, ``vec`` on other x86, others
    elsewhere) and each packs K and V its own way; lossy codecs need to know which, or they quantize the
    wrong groups.  Layouts kvmesh does not know are ``opaque``: lower tiers then store them lossless.
    """
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return "opaque"
    try:
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa
    except ImportError as err:  # a vLLM-CPU without this helper: the order is unknown, stay lossless
        log.info("kvmesh: vLLM-CPU's attention kernel is unknown (%s); pages stored lossless", err)
        return "opaque"
    isa = _get_attn_isa(dtype, block_size, head_size)
    return {"amx": "vllm-cpu-amx", "vec": "vllm-cpu-vec"}.get(isa, "opaque")


@dataclass(frozen=True, slots=True)
class EngineKVShape:
    """The engine's KV as kvmesh sees it: the model's identity and the page format, both part of every key."""

    model_identity: str  # what names the weights (a fingerprint, or the user's model_fingerprint)
    layout: KVLayout

    @classmethod
    def from_vllm(cls, vllm_config: VllmConfig, model_identity: str) -> EngineKVShape:
        model_config, parallel = vllm_config.model_config, vllm_config.parallel_config
        if parallel.tensor_parallel_size * parallel.pipeline_parallel_size != 1:
            raise ValueError("kvmesh supports one worker per engine for now "
                             f"(tensor_parallel_size={parallel.tensor_parallel_size}, "
                             f"pipeline_parallel_size={parallel.pipeline_parallel_size})")
        cache_dtype = vllm_config.cache_config.cache_dtype
        torch_dtype = engine_dtype(model_config.dtype) if cache_dtype == "auto" else None
        if torch_dtype is None:
            raise ValueError(f"kvmesh stores bf16/fp16/fp32 KV; cache_dtype={cache_dtype!r} is not supported yet")
        block_size = vllm_config.cache_config.block_size
        layout = KVLayout(
            num_layers=model_config.get_num_layers(parallel),
            num_kv_heads=model_config.get_num_kv_heads(parallel),
            head_size=model_config.get_head_size(),
            dtype=dtype_name(torch_dtype),
            block_size=block_size,
            # the in-page order is in the namespace: engines whose kernels pack pages differently never share
            page_view=cpu_page_view(torch_dtype, block_size, model_config.get_head_size()),
        )
        return cls(model_identity, layout)

    def namespace(self, salt: str) -> Namespace:
        return self.layout.namespace(self.model_identity, salt)
