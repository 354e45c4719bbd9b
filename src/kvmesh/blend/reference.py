"""The transformers reference of blending: stored passages' KV placed in a new prompt, a few tokens recomputed.

It is the oracle for the selection rule (measured against a full prefill of the same tokens,
``benchmarks/blend_quality.py``) and for the vLLM path.  Llama-style models (the demo model): their layers'
modules are run one by one, in fp32, with torch's scaled-dot-product attention over the whole prompt.

How a prompt is blended (CacheBlend's structure):

1. Every passage's stored KV (computed alone, at positions starting at ``cached_start``) is placed where the
   passage now stands, its keys re-rotated to the new positions (``rope.rerotate_keys``); values unchanged.
2. Tokens no passage covers (instructions, separators, the question's context) are always computed.
3. Layers ``0 .. check_layer`` are computed in full for every token.  At ``check_layer`` each reused token's
   fresh key is compared with its stored, re-rotated key; the selection rule picks which reused tokens to
   recompute in the later layers (a ``fraction`` of them).
4. Later layers compute only the selected and uncovered tokens, over the blended keys and values of all.

Selection rules, at equal budgets: ``cacheblend`` (the largest key deviation at the check layer),
``passage-start`` (each passage's first tokens, EPIC's rule: they carry the attention sink a passage computed
alone has), ``random`` (the control), and ``kvmesh`` (each passage's first ``first_tokens``, then the largest
deviation).  ``none`` reuses everything and computes only the uncovered tokens, in every layer alone: the
full-reuse bracket.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from kvmesh.blend.rope import model_inv_freq, rerotate_keys

RULES = ("cacheblend", "passage-start", "random", "kvmesh", "none")


@dataclass(frozen=True)
class Passage:
    """A stored passage placed in a prompt: tokens ``[start, end)`` of the prompt, its KV as computed alone.

    ``kv`` is ``[layers, 2 (K, V), tokens, kv_heads, head_dim]`` with keys rotated at ``cached_start ..``.
    """

    start: int
    end: int
    kv: torch.Tensor
    cached_start: int = 0

    def __post_init__(self) -> None:
        if self.kv.shape[2] != self.end - self.start:
            raise ValueError(f"a passage of tokens [{self.start}, {self.end}) holds KV of {self.kv.shape[2]} tokens")


@dataclass(frozen=True)
class Blended:
    """A prompt's blended KV (``[layers, 2, tokens, kv_heads, head_dim]``) and the tokens recomputed."""

    kv: torch.Tensor
    recomputed: torch.Tensor  # positions recomputed after the check layer (uncovered ones included)
    reused: int  # tokens covered by passages


@torch.inference_mode()
def passage_kv(model: Any, tokens: Sequence[int], start: int = 0) -> torch.Tensor:
    """The KV of ``tokens`` computed alone at positions ``start ..``: what is stored the first time they are seen."""
    ids = torch.tensor([list(tokens)])
    positions = torch.arange(start, start + len(tokens)).unsqueeze(0)
    cache = model(input_ids=ids, position_ids=positions, use_cache=True).past_key_values
    return torch.stack([torch.stack([layer.keys[0].transpose(0, 1), layer.values[0].transpose(0, 1)])
                        for layer in cache.layers])


def _select(rule: str, fraction: float, passages: Sequence[Passage], deviation: torch.Tensor,
            first_tokens: int, generator: torch.Generator) -> torch.Tensor:
    """Positions of reused tokens to recompute: a ``fraction`` of them, chosen by ``rule``."""
    if not passages:
        return torch.zeros(0, dtype=torch.long)
    reused = torch.cat([torch.arange(p.start, p.end) for p in passages])
    budget = min(len(reused), round(fraction * len(reused)))
    if budget == 0 or rule == "none":
        return torch.zeros(0, dtype=torch.long)
    if rule == "cacheblend":
        return reused[deviation[reused].topk(budget).indices]
    if rule == "random":
        return reused[torch.randperm(len(reused), generator=generator)[:budget]]
    if rule == "passage-start":
        return _starts(passages, budget, -(-budget // len(passages)))
    if rule == "kvmesh":
        starts = _starts(passages, budget, first_tokens)
        rest = torch.ones(deviation.shape[0], dtype=torch.bool)
        rest[starts] = False
        candidates = reused[rest[reused]]
        more = candidates[deviation[candidates].topk(min(len(candidates), budget - len(starts))).indices]
        return torch.cat((starts, more))
    raise ValueError(f"unknown selection rule {rule!r}; known: {', '.join(RULES)}")


def _starts(passages: Sequence[Passage], budget: int, each: int) -> torch.Tensor:
    """The first ``each`` tokens of every passage, in order, at most ``budget`` in all."""
    picked = [torch.arange(p.start, min(p.end, p.start + each)) for p in passages]
    return torch.cat(picked)[:budget] if picked else torch.zeros(0, dtype=torch.long)


def _attend(layer: Any, hidden: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
            sin: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """One decoder layer for the tokens at ``positions`` (``hidden``: their states), writing their K and V into
    ``keys``/``values`` (``[kv_heads, tokens, head_dim]``, every token of the prompt) and attending over all."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    attention = layer.self_attn
    head_dim = attention.head_dim
    x = layer.input_layernorm(hidden)
    q = attention.q_proj(x).view(1, len(positions), -1, head_dim).transpose(1, 2)
    k = attention.k_proj(x).view(1, len(positions), -1, head_dim).transpose(1, 2)
    v = attention.v_proj(x).view(1, len(positions), -1, head_dim).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos[:, positions], sin[:, positions])
    keys[:, positions] = k[0]
    values[:, positions] = v[0]
    groups = q.shape[1] // keys.shape[0]
    every = torch.arange(keys.shape[1])
    mask = every.unsqueeze(0) <= positions.unsqueeze(1)  # causal, by position
    out = F.scaled_dot_product_attention(q, keys.repeat_interleave(groups, 0).unsqueeze(0),
                                         values.repeat_interleave(groups, 0).unsqueeze(0), attn_mask=mask)
    hidden = hidden + attention.o_proj(out.transpose(1, 2).reshape(1, len(positions), -1))
    return hidden + layer.mlp(layer.post_attention_layernorm(hidden))


@torch.inference_mode()
def blend(model: Any, tokens: Sequence[int], passages: Sequence[Passage], rule: str = "kvmesh",
          fraction: float = 0.15, check_layer: int = 1, first_tokens: int = 16, seed: int = 0) -> Blended:
    """The blended KV of ``tokens`` whose ``passages`` come from storage (module docstring)."""
    if rule not in RULES:
        raise ValueError(f"unknown selection rule {rule!r}; known: {', '.join(RULES)}")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"the recompute fraction is between 0 and 1, got {fraction}")
    inner = model.model
    count = len(tokens)
    inv_freq = model_inv_freq(model)
    first = passages[0].kv if passages else None
    layers = len(inner.layers)
    kv_heads = inner.layers[0].self_attn.k_proj.out_features // inner.layers[0].self_attn.head_dim
    head_dim = inner.layers[0].self_attn.head_dim
    stored = torch.zeros(layers, 2, count, kv_heads, head_dim, dtype=first.dtype if first is not None else None)
    covered = torch.zeros(count, dtype=torch.bool)
    for passage in sorted(passages, key=lambda p: p.start):
        if covered[passage.start:passage.end].any() or passage.end > count:
            raise ValueError(f"passages overlap or run past the prompt at [{passage.start}, {passage.end})")
        covered[passage.start:passage.end] = True
        stored[:, 0, passage.start:passage.end] = rerotate_keys(passage.kv[:, 0], passage.start - passage.cached_start,
                                                                inv_freq)
        stored[:, 1, passage.start:passage.end] = passage.kv[:, 1]
    uncovered = torch.nonzero(~covered).flatten()
    ids = torch.tensor([list(tokens)])
    hidden_all = inner.embed_tokens(ids)
    cos, sin = inner.rotary_emb(hidden_all, torch.arange(count).unsqueeze(0))
    full_layers = 0 if rule == "none" else check_layer + 1
    active = torch.arange(count) if full_layers else uncovered
    hidden = hidden_all[:, active]
    out = stored.clone()
    generator = torch.Generator().manual_seed(seed)
    recomputed = uncovered
    for index, layer in enumerate(inner.layers):
        keys, values = out[index, 0].transpose(0, 1), out[index, 1].transpose(0, 1)  # [kv_heads, tokens, dim]
        if len(active):
            hidden = _attend(layer, hidden, active, cos, sin, keys, values)
        if index == full_layers - 1:  # the check layer: choose what the later layers recompute
            deviation = (keys.transpose(0, 1) - stored[index, 0]).float().pow(2).sum(dim=(1, 2))
            chosen = _select(rule, fraction, sorted(passages, key=lambda p: p.start), deviation, first_tokens,
                             generator)
            recomputed = torch.cat((uncovered, chosen)).unique(sorted=True)
            hidden = hidden[:, recomputed]
            active = recomputed
    return Blended(out, recomputed, int(covered.sum()))
