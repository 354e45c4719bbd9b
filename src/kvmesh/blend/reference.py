"""The transformers reference of blending: the oracle for the selection rule and for the vLLM path.

It runs ``compute.blend_kv`` (the algorithm, written once) over a transformers Llama-style model's layers, in
fp32, and is measured against a full prefill of the same tokens (``benchmarks/blend_quality.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from kvmesh.blend.compute import RULES, Blended, BlendSettings, Passage, blend_kv, torch_attention
from kvmesh.blend.quality import cache_tensor
from kvmesh.blend.rope import model_inv_freq

__all__ = ["RULES", "Blended", "Passage", "TransformersLayers", "blend", "passage_kv"]


@torch.inference_mode()
def passage_kv(model: Any, tokens: Sequence[int], start: int = 0) -> torch.Tensor:
    """The KV of ``tokens`` computed alone at positions ``start ..``: what is stored the first time they are seen."""
    ids = torch.tensor([list(tokens)])
    positions = torch.arange(start, start + len(tokens)).unsqueeze(0)
    return cache_tensor(model(input_ids=ids, position_ids=positions, use_cache=True).past_key_values)


class TransformersLayers:
    """A transformers Llama-style model as ``compute.LayerModel``: its modules run one layer at a time."""

    def __init__(self, model: Any) -> None:
        self.model = model
        inner = model.model
        self.layers = inner.layers
        attention = self.layers[0].self_attn
        self.num_layers = len(self.layers)
        self.head_dim = attention.head_dim
        self.num_kv_heads = attention.k_proj.out_features // attention.head_dim
        self.dtype = next(model.parameters()).dtype

    def inv_freq(self) -> torch.Tensor:
        return model_inv_freq(self.model)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.model.embed_tokens(ids)

    def project(self, layer: int, hidden: torch.Tensor, positions: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        attention = self.layers[layer].self_attn
        x = self.layers[layer].input_layernorm(hidden).unsqueeze(0)
        q = attention.q_proj(x).view(1, len(positions), -1, self.head_dim).transpose(1, 2)
        k = attention.k_proj(x).view(1, len(positions), -1, self.head_dim).transpose(1, 2)
        v = attention.v_proj(x).view(1, len(positions), -1, self.head_dim).transpose(1, 2)
        cos, sin = self.model.model.rotary_emb(x, positions.unsqueeze(0))
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        return q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1)

    def attention(self, queries: torch.Tensor, positions: torch.Tensor, keys: torch.Tensor, values: torch.Tensor
                  ) -> torch.Tensor:
        return torch_attention(queries, positions, keys, values)

    def finish(self, layer: int, hidden: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        decoder = self.layers[layer]
        hidden = hidden + decoder.self_attn.o_proj(attended)
        return hidden + decoder.mlp(decoder.post_attention_layernorm(hidden))


def blend(model: Any, tokens: Sequence[int], passages: Sequence[Passage], rule: str = "kvmesh",
          fraction: float = 0.15, check_layer: int = 1, first_tokens: int = 16, seed: int = 0,
          lookahead: Sequence[int] = ()) -> Blended:
    """The blended KV of ``tokens`` whose ``passages`` come from storage (``compute`` module docstring);
    ``lookahead``, the prompt's question after them, is read by the ``question`` rule only."""
    settings = BlendSettings(rule, fraction, check_layer, first_tokens, seed)
    return blend_kv(TransformersLayers(model), tokens, passages, settings, lookahead=lookahead)
