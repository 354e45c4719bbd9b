"""The engine's own model, for blending: how the connector gets it, and its layers as ``compute.LayerModel``.

vLLM hands a connector its KV tensors but not its model.  kvmesh registers a model loader (``--load-format
kvmesh``, which ``kvmesh serve --blend`` sets) through vLLM's ``vllm.general_plugins`` entry point
(``plugin.py``): it loads weights exactly as vLLM's default loader does and remembers the model it built, in
the worker process where the connector's worker side runs.  No vLLM file is patched.

The blend computes with the engine's own modules and weights (its fused QKV projection, rotary embedding,
norms and MLP), so what it writes into the pages is what the engine would compute for the tokens it
recomputes.  Llama-style architectures first (the demo model, SmolLM2; Llama, Mistral without a window,
Qwen2); others fall back to prefix-only reuse.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any

import torch

from kvmesh.blend.rope import UnsupportedRope

log = logging.getLogger("kvmesh.vllm")

LOAD_FORMAT = "kvmesh"
BLEND_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")

_loaded: list[weakref.ReferenceType[Any]] = []  # the models this process's kvmesh loader built


class BlendUnavailable(RuntimeError):
    """The engine was asked to blend but its model cannot be run by the blend path (a setup error)."""


def remember_model(model: Any) -> None:
    _loaded.append(weakref.ref(model))


def engine_model() -> Any:
    """The model this process's engine loaded with ``--load-format kvmesh``; BlendUnavailable where none was."""
    for ref in reversed(_loaded):
        model = ref()
        if model is not None:
            return model
    raise BlendUnavailable("kvmesh: blending needs the engine's model, which vLLM loads through kvmesh's loader: "
                           f"start vLLM with --load-format {LOAD_FORMAT} (kvmesh serve --blend sets it)")


PURE_ROTATIONS = ("default", "llama3")  # RoPE kinds a delta rotation moves exactly (VLLMLayers.inv_freq)


def why_not_blend(vllm_config: Any, group_kinds: list[str]) -> str | None:
    """Why this engine cannot blend, in words (None: it can): the scheduler decides before any request.

    ``group_kinds``: the kind of each KV cache group (``layout.KVGroup.kind``).
    """
    load_format = str(getattr(vllm_config.load_config, "load_format", ""))
    if load_format != LOAD_FORMAT:
        return f"vLLM's load format is {load_format!r}, not {LOAD_FORMAT!r} (kvmesh serve --blend sets it)"
    if vllm_config.cache_config.enable_prefix_caching:
        return ("vLLM's own prefix cache is on: it would commit blended (approximate) blocks under exact token "
                "hashes (kvmesh serve --blend turns it off; kvmesh's exact prefixes still hit)")
    if vllm_config.parallel_config.tensor_parallel_size != 1:
        return "tensor parallelism: the blend runs the model's layers in one worker"
    architectures = list(getattr(vllm_config.model_config.hf_config, "architectures", None) or [])
    if not set(architectures) & set(BLEND_ARCHITECTURES):
        return f"architecture {architectures} (blending runs {', '.join(BLEND_ARCHITECTURES)})"
    if group_kinds != ["full"]:
        return f"KV cache groups {group_kinds} (blending runs full attention only: no window, no recurrent state)"
    hf_config = vllm_config.model_config.hf_config
    rope = getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {}
    kind = rope.get("rope_type") or rope.get("type") or "default"
    if kind not in PURE_ROTATIONS:
        return f"RoPE {kind!r} (a delta rotation moves {', '.join(PURE_ROTATIONS)} RoPE keys exactly)"
    return None


class VLLMLayers:
    """A vLLM Llama-style model's decoder layers as ``compute.LayerModel``, over flat ``[tokens, hidden]``."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.layers = model.model.layers
        attention = self.layers[0].self_attn
        self.num_layers = len(self.layers)
        self.head_dim = attention.head_dim
        self.num_kv_heads = attention.num_kv_heads
        self.q_size, self.kv_size = attention.q_size, attention.kv_size
        self.dtype = next(model.parameters()).dtype

    def inv_freq(self) -> torch.Tensor:
        rotary = self.layers[0].self_attn.rotary_emb
        kind = type(rotary).__name__
        if kind not in ("RotaryEmbedding", "Llama3RotaryEmbedding"):
            raise UnsupportedRope(f"kvmesh re-rotates default and llama3 RoPE; this model's is {kind}")
        if not rotary.is_neox_style:
            raise UnsupportedRope("kvmesh re-rotates neox-style RoPE (channel i with i + d/2); this model's pairs "
                                  "neighbouring channels")
        return rotary._compute_inv_freq(rotary.base).float()

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.model.embed_tokens(ids)

    def project(self, layer: int, hidden: torch.Tensor, positions: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        attention = self.layers[layer].self_attn
        qkv, _ = attention.qkv_proj(self.layers[layer].input_layernorm(hidden))
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = attention.rotary_emb(positions, q, k)
        count = len(positions)
        return (q.reshape(count, -1, self.head_dim), k.reshape(count, -1, self.head_dim),
                v.reshape(count, -1, self.head_dim))

    def finish(self, layer: int, hidden: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        decoder = self.layers[layer]
        out, _ = decoder.self_attn.o_proj(attended.to(hidden.dtype))
        hidden = hidden + out
        return hidden + decoder.mlp(decoder.post_attention_layernorm(hidden))
