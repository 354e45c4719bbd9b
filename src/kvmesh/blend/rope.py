"""Moving stored keys to new positions: RoPE is a rotation per channel pair, so a delta rotation re-places them.

A passage's keys were rotated at the positions it had when computed.  Rotating them again by
``delta = new_start - cached_start`` gives the keys it would have at the new positions, exactly up to rounding,
for every rotary embedding that is a pure rotation (default, linear, llama3 scaling).  The angles come from the
model's own frequencies, in fp32, never from a cached cos/sin table (which may be cast to the model's dtype or
carry a YaRN scale).  Values are not rotated.
"""

from __future__ import annotations

from typing import Any

import torch


class UnsupportedRope(ValueError):
    """A rotary embedding that a delta rotation cannot move exactly (scaled amplitudes, dynamic frequencies)."""


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """The pair partner of each channel, negated on the first half (the "neox" pairing: i with i + d/2)."""
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def rerotate_keys(keys: torch.Tensor, delta: int, inv_freq: torch.Tensor) -> torch.Tensor:
    """``keys`` (any shape ending in ``head_dim``) moved by ``delta`` positions (negative moves them back).

    ``inv_freq`` holds the model's ``rotary_dim / 2`` frequencies; channels past ``rotary_dim`` (partial rotary)
    are left as they are.  Computed in fp32 and cast back once.
    """
    rotary = 2 * inv_freq.numel()
    if rotary > keys.shape[-1]:
        raise UnsupportedRope(f"{inv_freq.numel()} frequencies do not fit keys of {keys.shape[-1]} channels")
    angles = float(delta) * inv_freq.double()  # the product in fp64: large positions keep their precision
    angles = torch.cat((angles, angles)).float()
    moving = keys[..., :rotary].float()
    moved = (moving * angles.cos() + rotate_half(moving) * angles.sin()).to(keys.dtype)
    return moved if rotary == keys.shape[-1] else torch.cat((moved, keys[..., rotary:]), dim=-1)


def model_inv_freq(model: Any) -> torch.Tensor:
    """The frequencies of a transformers model's rotary embedding, refused where a delta rotation is not exact."""
    rotary = model.model.rotary_emb
    rope_type = getattr(rotary, "rope_type", "default")
    if rope_type not in ("default", "linear", "llama3"):
        raise UnsupportedRope(f"kvmesh re-rotates default, linear and llama3 RoPE; this model's is {rope_type!r}")
    if float(getattr(rotary, "attention_scaling", 1.0)) != 1.0:
        raise UnsupportedRope(f"this model's RoPE scales cos/sin by {rotary.attention_scaling}: not a pure rotation")
    return rotary.inv_freq.detach().float()
