"""How far blended KV takes a model from a full prefill of the same tokens: KL, top-1 and greedy agreement."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch


def kv_cache(kv: torch.Tensor):
    """A transformers cache holding ``kv`` (``[layers, 2, tokens, kv_heads, head_dim]``)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    for index in range(kv.shape[0]):
        cache.update(kv[index, 0].transpose(0, 1).unsqueeze(0).contiguous(),
                     kv[index, 1].transpose(0, 1).unsqueeze(0).contiguous(), index)
    return cache


def cache_tensor(cache: Any) -> torch.Tensor:
    """A transformers cache's K/V as ``[layers, 2, tokens, kv_heads, head_dim]`` (``kv_cache``'s inverse)."""
    return torch.stack([torch.stack([layer.keys[0].transpose(0, 1), layer.values[0].transpose(0, 1)])
                        for layer in cache.layers])


@torch.inference_mode()
def extend_kv(model: Any, kv: torch.Tensor, tokens: Sequence[int]) -> torch.Tensor:
    """``kv`` followed by the KV of ``tokens`` computed exactly over it (as an engine computes a prompt's rest)."""
    if not tokens:
        return kv
    return cache_tensor(model(input_ids=torch.tensor([list(tokens)]), past_key_values=kv_cache(kv),
                              use_cache=True).past_key_values)


@torch.inference_mode()
def continuation_logprobs(model: Any, kv: torch.Tensor, follow: Sequence[int]) -> torch.Tensor:
    """Log-probabilities at each token of ``follow`` read after the KV ``kv`` (teacher-forced)."""
    out = model(input_ids=torch.tensor([list(follow)]), past_key_values=kv_cache(kv), use_cache=True)
    return torch.log_softmax(out.logits[0].float(), dim=-1)


@torch.inference_mode()
def greedy(model: Any, kv: torch.Tensor, first: int, steps: int) -> list[int]:
    cache, token, produced = kv_cache(kv), torch.tensor([[first]]), []
    for _ in range(steps):
        out = model(input_ids=token, past_key_values=cache, use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        produced.append(int(token))
    return produced


@dataclass(frozen=True)
class Divergence:
    kl: float  # mean KL(reference || test) over the positions, in nats
    top1: float  # share of positions whose most likely next token agrees


def divergence(reference: torch.Tensor, test: torch.Tensor) -> Divergence:
    kl = (reference.exp() * (reference - test)).sum(-1).mean()
    top1 = (reference.argmax(-1) == test.argmax(-1)).float().mean()
    return Divergence(float(kl), float(top1))


def matching_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens two greedy answers share."""
    for index, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return index
    return min(len(a), len(b))
