"""What both sides of the vLLM connector derive from vLLM's config: the model's identity and the page format.

Kept free of vLLM imports at module level, so the scheduler and worker sides can be built (and tested)
from a plain :class:`EngineKVShape`.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from kvmesh.entry import dtype_name
from kvmesh.keys import Namespace, model_namespace
from kvmesh.layout import KVGroup, KVLayout

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.kv_cache_interface import KVCacheConfig

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


# vLLM's GPU backends all view a layer's KV as [blocks, heads, tokens, keys then values] (the memory order is
# one KVCacheLayout for the whole engine; kvmesh asks for LBHNC); entries hold pages in that logical order
GPU_PAGES = PageKernel("vllm-gpu.logical", "vllm-pages")


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

    if current_platform.is_cuda():  # copied out of the backend's pages in their logical order, whatever its own
        return GPU_PAGES
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


def recurrent_state_message(model: object, architecture: str, kinds: list[str], missing: str) -> str:
    return (f"kvmesh: the model {model} ({architecture or 'unknown architecture'}; vLLM says {', '.join(kinds)}) "
            f"keeps recurrent state beside its attention KV, and {missing}: a hit would restore attention KV "
            "without the state and answer wrongly. Run this model without the kvmesh connector (vLLM's own "
            "prefix caching still works)")


def recurrent_state_kinds(model_config: object) -> list[str]:
    """What vLLM says of a model that keeps state besides attention KV (empty: attention only)."""
    return [name for name in RECURRENT_STATE_FLAGS if getattr(model_config, name, False)]


def layer_order(name: str) -> list[int]:
    """Sort key of vLLM's layer names: the numbers in them (``layers.10`` after ``layers.2``)."""
    return [int(n) for n in re.findall(r"\d+", name)]


KernelOf = Callable[[torch.dtype, int, int], PageKernel]


def _spec_group(spec: object, layer_names: tuple[str, ...], kernel_of: KernelOf) -> KVGroup:
    """One of vLLM's KV cache groups as kvmesh stores it; a kind of cache it cannot store exactly stops here."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec, MambaSpec, MLAAttentionSpec, SlidingWindowSpec

    kind = type(spec)
    if kind in (FullAttentionSpec, MLAAttentionSpec, SlidingWindowSpec):
        dtype = engine_dtype(spec.dtype)  # type: ignore[attr-defined]
        block_size, head_size = spec.block_size, spec.head_size  # type: ignore[attr-defined]
        kernel = kernel_of(dtype, block_size, head_size)  # in the namespace: kernels pack pages differently
        layout = KVLayout(num_layers=len(layer_names), num_kv_heads=spec.num_kv_heads,  # type: ignore[attr-defined]
                          head_size=head_size, dtype=dtype_name(dtype), block_size=block_size,
                          page_view=kernel.view, page_kernel=kernel.name,
                          kv_parts=1 if kind is MLAAttentionSpec else 2)  # MLA pages one latent per token
        if kind is SlidingWindowSpec:
            return KVGroup("window", layout, layer_names, window=spec.sliding_window)  # type: ignore[attr-defined]
        return KVGroup("full", layout, layer_names)
    if kind is MambaSpec:
        mode, speculative = spec.mamba_cache_mode, spec.num_speculative_blocks  # type: ignore[attr-defined]
        if mode != "align" or speculative:
            raise UnsupportedModel(
                "kvmesh stores recurrent state as vLLM's prefix caching keeps it (mamba_cache_mode 'align', no "
                f"speculative blocks); this engine runs mamba_cache_mode={mode!r} with {speculative} speculative "
                "blocks: enable prefix caching and turn speculative decoding off, or run without kvmesh")
        shapes, dtypes = spec.shapes, spec.dtypes  # type: ignore[attr-defined]
        state_bytes = sum(math.prod(shape) * dtype.itemsize
                          for shape, dtype in zip(shapes, dtypes))
        described = ",".join(f"{'x'.join(map(str, shape))}{dtype_name(dtype)}" for shape, dtype in zip(shapes, dtypes))
        return KVGroup.state(len(layer_names), state_bytes, spec.block_size,  # type: ignore[attr-defined]
                             f"{spec.mamba_type.name}:{described}", layer_names)  # type: ignore[attr-defined]
    raise UnsupportedModel(f"kvmesh cannot store vLLM's {kind.__name__} KV cache (layers {', '.join(layer_names)}) "
                           "exactly yet: run this model without the kvmesh connector")


def kv_groups(kv_cache_config: KVCacheConfig, kernel_of: KernelOf | None = None) -> tuple[KVGroup, ...]:
    """The engine's KV cache groups, from the config vLLM hands every connector (never a table of models)."""
    kernel_of = kernel_of or page_kernel
    groups = tuple(_spec_group(group.kv_cache_spec, tuple(sorted(group.layer_names, key=layer_order)), kernel_of)
                   for group in kv_cache_config.kv_cache_groups)
    if not groups:
        raise UnsupportedModel("kvmesh: vLLM's KV cache config has no KV cache groups (an attention-free model?)")
    sizes = sorted({group.block_size for group in groups})
    if len(sizes) > 1:
        raise UnsupportedModel(f"kvmesh needs one block size across vLLM's KV cache groups; this engine's are "
                               f"{', '.join(map(str, sizes))}")
    if all(group.kind == "state" for group in groups):
        raise UnsupportedModel("kvmesh: a model with recurrent state and no attention layers is not supported")
    return groups


@dataclass(frozen=True, slots=True)
class EngineKVShape:
    """The engine's KV as kvmesh sees it: the model's identity and the page format, both part of every key.

    ``groups`` are vLLM's KV cache groups (``layout.KVGroup``); a model whose layers are all alike has one,
    ``full``, whose layout is ``layout``.  ``layout`` is the first attention group's: its block size is every
    group's, and it names the pages in logs.
    """

    model_identity: str  # what names the weights (a fingerprint, or the user's model_fingerprint)
    layout: KVLayout  # one worker's pages: with tensor parallelism, its own share of the KV heads
    tp_world: int = 1  # tensor-parallel workers, each storing its share under keys of its own (keys.PartKeys)
    groups: tuple[KVGroup, ...] = ()  # () means one full group of ``layout`` (set in __post_init__)

    def __post_init__(self) -> None:
        if not self.groups:
            object.__setattr__(self, "groups", (KVGroup("full", self.layout),))

    @classmethod
    def from_vllm(cls, vllm_config: VllmConfig, model_identity: str,
                  kv_cache_config: KVCacheConfig | None = None) -> EngineKVShape:
        model_config, parallel = vllm_config.model_config, vllm_config.parallel_config
        if parallel.pipeline_parallel_size != 1:
            raise ValueError("kvmesh does not support pipeline parallelism yet "
                             f"(pipeline_parallel_size={parallel.pipeline_parallel_size}); "
                             "tensor parallelism is supported")
        cache_dtype = vllm_config.cache_config.cache_dtype
        if cache_dtype != "auto":
            raise ValueError(f"kvmesh stores bf16/fp16/fp32 KV; cache_dtype={cache_dtype!r} is not supported yet")
        if kv_cache_config is None:
            raise UnsupportedModel("kvmesh needs vLLM's KV cache config (vLLM 0.32 or later hands it to connectors)")
        groups = kv_groups(kv_cache_config)
        kinds = recurrent_state_kinds(model_config)
        if kinds and not any(group.kind == "state" for group in groups):
            architectures = getattr(getattr(model_config, "hf_config", None), "architectures", None) or []
            raise UnsupportedModel(recurrent_state_message(
                model_config.model, ", ".join(architectures), kinds, "vLLM gave its state no KV cache group"))
        layout = next(group.layout for group in groups if group.kind != "state")
        return cls(model_identity, layout, parallel.tensor_parallel_size, groups)

    @property
    def has_state(self) -> bool:
        """Whether a hit must end where a recurrent state is stored (``layout.KVGroup``'s ``state``)."""
        return any(group.kind == "state" for group in self.groups)

    @property
    def token_group(self) -> int:
        """The first group that stores every chunk's tokens (not a state): its saves and loads count tokens."""
        return next(index for index, group in enumerate(self.groups) if group.kind != "state")

    def fingerprint(self) -> str:
        """The page format of every group: one group's is its layout's (the keys single-group engines had)."""
        if len(self.groups) == 1 and self.groups[0].kind == "full" and self.groups[0].layout == self.layout:
            return self.layout.fingerprint()
        return "+".join(group.fingerprint() for group in self.groups)

    def namespace(self, salt: str) -> Namespace:
        return model_namespace(self.model_identity, self.fingerprint(), salt)
