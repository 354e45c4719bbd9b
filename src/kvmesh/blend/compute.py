"""Blending, whatever runs the model's layers: stored passages' KV placed in a prompt, a few tokens recomputed.

The algorithm is written once, over :class:`LayerModel` (a model's decoder layers one at a time): the
transformers reference (``reference.py``) and the vLLM worker (``integrations/vllm/blend_model.py``) each
provide one, so the vLLM path computes what the oracle computes, with vLLM's own modules and weights.

How a prompt is blended (CacheBlend's structure):

1. Tokens ``[0, fixed)`` are an exact prefix (loaded as a prefix hit): their KV is given and never recomputed.
2. Every passage's stored KV (computed at positions starting at ``cached_start``) is placed where the passage
   now stands, its keys re-rotated to the new positions (``rope.rerotate_keys``); values unchanged.
3. Tokens ``[fixed, count)`` that no passage covers (instructions, separators) are always computed.
4. Layers ``0 .. check_layer`` are computed in full for every token from ``fixed`` on.  At ``check_layer``
   each reused token's fresh key is compared with its stored, re-rotated key; the selection rule picks which
   reused tokens the later layers recompute (a ``fraction`` of them).
5. Later layers compute only the selected and uncovered tokens, over the blended keys and values of all.

Selection rules, at equal budgets: ``cacheblend`` (the largest key deviation at the check layer),
``passage-start`` (each passage's first tokens, EPIC's rule: they carry the attention sink a passage computed
alone has), ``random`` (the control), ``kvmesh`` (each passage's first ``first_tokens``, then the largest
deviation), and ``question`` (each passage's first ``first_tokens``, then the tokens the prompt's question
attends to most at the check layer, ProphetKV's idea: what the answer will read is what must be right).  The
question is ``lookahead``: the prompt's tokens after the blended range, which the engine computes exactly
afterwards; the rule runs them through the layers up to the check layer only, to score.  Without them it
falls back to the deviation.  ``none`` reuses everything and computes only the uncovered tokens, in every
layer alone: the full-reuse bracket.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F

from kvmesh.blend.rope import rerotate_keys

RULES = ("cacheblend", "passage-start", "random", "kvmesh", "question", "none")
QUESTION_TOKENS = 256  # the question's last tokens whose attention scores the reused tokens
QUERY_GROUP = 256  # queries attended together at most, over the keys up to the group's last position
QUERY_SPAN = 512  # positions a group's queries span at most: every query attends over the keys up to the last one


@dataclass(frozen=True)
class Passage:
    """A stored passage placed in a prompt: tokens ``[start, end)`` of the prompt, its stored KV.

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
    seconds: dict[str, float] = field(default_factory=dict)  # place (and re-rotate), full layers, select, the rest


@dataclass(frozen=True)
class BlendSettings:
    """How much is recomputed and how it is chosen (module docstring)."""

    rule: str = "kvmesh"
    fraction: float = 0.15
    check_layer: int = 1
    first_tokens: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ValueError(f"unknown selection rule {self.rule!r}; known: {', '.join(RULES)}")
        if not 0.0 <= self.fraction <= 1.0:
            raise ValueError(f"the recompute fraction is between 0 and 1, got {self.fraction}")
        if self.check_layer < 0 or self.first_tokens < 0:
            raise ValueError(f"check_layer and first_tokens are not negative, got {self.check_layer}, "
                             f"{self.first_tokens}")


class LayerModel(Protocol):
    """A decoder-only model run one layer at a time, over a flat batch of tokens (``[tokens, hidden]``)."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    def inv_freq(self) -> torch.Tensor:
        """The rotary frequencies (``rope.UnsupportedRope`` where a delta rotation is not exact)."""
        ...

    def embed(self, ids: torch.Tensor) -> torch.Tensor: ...

    def project(self, layer: int, hidden: torch.Tensor, positions: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries ``[tokens, heads, dim]``, keys and values ``[tokens, kv_heads, dim]``, rotated at ``positions``."""
        ...

    def attention(self, queries: torch.Tensor, positions: torch.Tensor, keys: torch.Tensor, values: torch.Tensor
                  ) -> torch.Tensor:
        """Each query (``[tokens, heads, dim]``, at ``positions``, ascending) over the keys and values up to its own
        position (``[tokens, kv_heads, dim]``, every token of the prompt): ``[tokens, heads, dim]``."""
        ...

    def finish(self, layer: int, hidden: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """The layer's output states from its input states and the attention's ``[tokens, heads * dim]``."""
        ...


def select(settings: BlendSettings, passages: Sequence[Passage], deviation: torch.Tensor,
           generator: torch.Generator, attention: torch.Tensor | None = None) -> torch.Tensor:
    """Positions of reused tokens to recompute: a ``fraction`` of them, chosen by the settings' rule.

    ``deviation`` and ``attention`` (the question's, for the ``question`` rule) hold a score per position.
    """
    if not passages:
        return torch.zeros(0, dtype=torch.long)
    reused = torch.cat([torch.arange(p.start, p.end) for p in passages])
    budget = min(len(reused), round(settings.fraction * len(reused)))
    if budget == 0 or settings.rule == "none":
        return torch.zeros(0, dtype=torch.long)
    if settings.rule == "cacheblend":
        return reused[deviation[reused].topk(budget).indices]
    if settings.rule == "random":
        return reused[torch.randperm(len(reused), generator=generator)[:budget]]
    if settings.rule == "passage-start":
        return _starts(passages, budget, -(-budget // len(passages)))
    starts = _starts(passages, budget, settings.first_tokens)  # "kvmesh" and "question"
    score = attention if settings.rule == "question" and attention is not None else deviation
    rest = torch.ones(score.shape[0], dtype=torch.bool)
    rest[starts] = False
    candidates = reused[rest[reused]]
    more = candidates[score[candidates].topk(min(len(candidates), budget - len(starts))).indices]
    return torch.cat((starts, more))


def question_attention(queries: torch.Tensor, positions: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """How much attention the question's ``queries`` (at ``positions``) give each key, summed over heads and queries.

    ``keys`` are every token's up to the last query (``[tokens, kv_heads, dim]``); each query sees the keys up to
    its own position, as in the model.
    """
    queries, positions = queries[-QUESTION_TOKENS:].float(), positions[-QUESTION_TOKENS:]
    visible = int(positions[-1]) + 1
    grouped = keys[:visible].float().repeat_interleave(queries.shape[1] // keys.shape[1], dim=1)
    logits = torch.einsum("qhd,khd->hqk", queries, grouped) * queries.shape[-1] ** -0.5
    hidden = torch.arange(visible).unsqueeze(0) > positions.unsqueeze(1)  # [queries, keys]: not yet seen
    weights = logits.masked_fill(hidden, float("-inf")).softmax(dim=-1)
    return weights.sum(dim=(0, 1))


def _starts(passages: Sequence[Passage], budget: int, each: int) -> torch.Tensor:
    """The first ``each`` tokens of every passage, in order, at most ``budget`` in all."""
    picked = [torch.arange(p.start, min(p.end, p.start + each)) for p in passages]
    return torch.cat(picked)[:budget] if picked else torch.zeros(0, dtype=torch.long)


def _project(model: LayerModel, layer: int, hidden: torch.Tensor, positions: torch.Tensor,
             keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """The queries of the tokens at ``positions`` (``hidden``: their states); their K and V written into
    ``keys``/``values`` (``[tokens, kv_heads, head_dim]``, every token of the prompt)."""
    q, k, v = model.project(layer, hidden, positions)
    keys[positions] = k.to(keys.dtype)
    values[positions] = v.to(values.dtype)
    return q


def _query_groups(positions: torch.Tensor) -> list[slice]:
    """Runs of consecutive queries (``positions`` ascending), each at most ``QUERY_GROUP`` long and spanning fewer
    than ``QUERY_SPAN`` positions.

    A group's queries all attend over the keys up to its last position, so a group of selected tokens scattered
    over the prompt would compute (and mask away) scores for the many keys its first queries cannot see; with
    the span bounded, that waste is at most ``QUERY_SPAN`` keys per query.
    """
    starts = positions.tolist()
    groups, first = [], 0
    for index, at in enumerate(starts):
        if index - first == QUERY_GROUP or at - starts[first] >= QUERY_SPAN:
            groups.append(slice(first, index))
            first = index
    if starts:
        groups.append(slice(first, len(starts)))
    return groups


def _attend(model: LayerModel, layer: int, hidden: torch.Tensor, q: torch.Tensor, positions: torch.Tensor,
            keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """The rest of the layer for the tokens at ``positions``: attention over every token's K/V, then its MLP."""
    attended = model.attention(q, positions, keys, values)
    return model.finish(layer, hidden, attended.reshape(len(positions), -1))


def torch_attention(q: torch.Tensor, positions: torch.Tensor, keys: torch.Tensor, values: torch.Tensor
                    ) -> torch.Tensor:
    """``LayerModel.attention`` with torch's fused CPU kernel: queries in groups, each over the keys it may see."""
    out = torch.empty_like(q)
    for group in _query_groups(positions):
        # each group of queries (in position order) attends only to the keys up to its last position, masked
        # causally: a group spanning few positions wastes little on keys its first queries may not see.  Four
        # dimensions and grouped heads as they are, so torch takes its fused CPU kernel (three dimensions or
        # repeated heads fall back to one that holds every score).
        at = positions[group]
        visible = int(at[-1]) + 1
        mask = torch.arange(visible).unsqueeze(0) <= at.unsqueeze(1)  # causal, by position
        out[group] = F.scaled_dot_product_attention(
            q[group].transpose(0, 1).unsqueeze(0), keys[:visible].to(q.dtype).transpose(0, 1).unsqueeze(0),
            values[:visible].to(q.dtype).transpose(0, 1).unsqueeze(0), attn_mask=mask,
            enable_gqa=True)[0].transpose(0, 1)
    return out


@torch.inference_mode()
def blend_kv(model: LayerModel, tokens: Sequence[int], passages: Sequence[Passage],
             settings: BlendSettings = BlendSettings(), prefix_kv: torch.Tensor | None = None,
             lookahead: Sequence[int] = ()) -> Blended:
    """The blended KV of ``tokens`` whose ``passages`` come from storage (module docstring).

    ``prefix_kv`` (``[layers, 2, fixed, kv_heads, head_dim]``) is the exact KV of the first ``fixed`` tokens.
    ``lookahead``: the prompt's tokens after ``tokens`` (its question), read by the ``question`` rule only; their
    KV is not part of the result.
    """
    started = time.perf_counter()
    count = len(tokens)
    if settings.rule != "question" or not passages:
        lookahead = ()
    tokens = [*tokens, *lookahead]
    fixed = 0 if prefix_kv is None else prefix_kv.shape[2]
    dtype = passages[0].kv.dtype if passages else (prefix_kv.dtype if prefix_kv is not None else model.dtype)
    out = torch.zeros(model.num_layers, 2, len(tokens), model.num_kv_heads, model.head_dim, dtype=dtype)
    if prefix_kv is not None:
        out[:, :, :fixed] = prefix_kv
    covered = torch.zeros(len(tokens), dtype=torch.bool)
    covered[:fixed] = True
    ordered = sorted(passages, key=lambda p: p.start)
    inv_freq = model.inv_freq() if passages else torch.zeros(0)
    for passage in ordered:
        if passage.start < fixed or covered[passage.start:passage.end].any() or passage.end > count:
            raise ValueError(f"passages overlap, the exact prefix or run past the prompt at "
                             f"[{passage.start}, {passage.end})")
        covered[passage.start:passage.end] = True
        out[:, 0, passage.start:passage.end] = rerotate_keys(passage.kv[:, 0], passage.start - passage.cached_start,
                                                             inv_freq)
        out[:, 1, passage.start:passage.end] = passage.kv[:, 1]
    uncovered = torch.nonzero(~covered[:count]).flatten()
    computed = torch.arange(fixed, len(tokens))  # the lookahead's tokens go as far as the check layer
    full_layers = 0 if settings.rule == "none" or not passages else min(settings.check_layer + 1, model.num_layers)
    stored_keys = out[full_layers - 1, 0].clone() if full_layers else None  # the check layer's, as placed
    seconds = {"place": time.perf_counter() - started}
    mark = time.perf_counter()
    active = computed if full_layers else uncovered
    hidden = model.embed(torch.tensor(list(tokens))[active])
    generator = torch.Generator().manual_seed(settings.seed)
    recomputed = uncovered
    for index in range(model.num_layers):
        if not len(active):
            continue
        q = _project(model, index, hidden, active, out[index, 0], out[index, 1])
        if index == full_layers - 1 and stored_keys is not None:
            # the check layer: every token's fresh K/V is written; only the tokens chosen now (and those no passage
            # covers) go on, so only they attend and pass the MLP here and in every later layer
            seconds["full_layers"] = time.perf_counter() - mark
            mark = time.perf_counter()
            deviation = (out[index, 0] - stored_keys).float().pow(2).sum(dim=(1, 2))
            attention = None
            if lookahead:
                asking = torch.searchsorted(active, torch.arange(count, len(tokens)))
                attention = question_attention(q[asking], active[asking], out[index, 0])
            chosen = select(settings, ordered, deviation, generator, attention)
            recomputed = torch.cat((uncovered, chosen)).unique(sorted=True)
            kept = torch.searchsorted(active, recomputed)
            hidden, q, active = hidden[kept], q[kept], recomputed
            seconds["select"] = time.perf_counter() - mark
            mark = time.perf_counter()
        hidden = _attend(model, index, hidden, q, active, out[index, 0], out[index, 1])
    seconds["selected_layers"] = time.perf_counter() - mark
    return Blended(out[:, :, :count], recomputed, int(covered[fixed:count].sum()), seconds)
