"""Why a request's hit stopped where it did: a summary per request, returned to the user who asks for it.

A request that sends ``"kv_transfer_params": {"kvmesh": {"explain": true}}`` gets, in its response's
``kv_transfer_params``, what the cache did for it: the engine's own hit, the tokens kvmesh found and loaded, how
many chunks came from below L1, and why the hit ended there (the prompt's last token, a chunk evicted from L1
and held by no lower tier, a chunk never stored under this namespace, a promotion that did not finish in
time, a recurrent state's boundary, a part stored by some ranks or groups only).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from kvmesh.client import LookupResult
from kvmesh.keys import ChunkKey


@dataclass
class Explanation:
    prompt_tokens: int
    engine_hit_tokens: int = 0  # what vLLM's own prefix cache held
    kvmesh_hit_tokens: int = 0  # stored tokens kvmesh found from the prompt's start
    loaded_tokens: int = 0  # what kvmesh loaded beyond the engine's own hit
    chunks_found: int = 0
    chunks_from_below_l1: int = 0  # found on disk or in Redis, promoted into L1 for this request
    reason: str = ""  # why the hit ends where it does
    blended_tokens: int = 0  # tokens after the exact hit materialized by blending stored passages (approximate)
    passages_reused: int = 0  # stored passages that blend reused

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def kvmesh_params(request: object) -> dict[str, Any]:
    """The request's ``kv_transfer_params["kvmesh"]`` (what it asks of kvmesh: explain, blend, passages), or {}."""
    params = getattr(request, "kv_transfer_params", None) or {}
    own = params.get("kvmesh") if isinstance(params, dict) else None
    return own if isinstance(own, dict) else {}


def wants_explanation(request: object) -> bool:
    return bool(kvmesh_params(request).get("explain"))


def hit_end_reason(tokens: int, keys: Sequence[ChunkKey], hit_keys: Sequence[ChunkKey],
                   per_part: Sequence[Sequence[ChunkKey]], first_part: LookupResult, cut: str | None,
                   chunk_size: int) -> str:
    """In words, why the hit of ``hit_keys`` ends where it does (``cut``: what shortened the stored hit)."""
    end = hit_keys[-1].end if hit_keys else 0
    if cut == "promotion":
        return (f"chunks found on disk or in Redis were not in L1 within promotion_wait_seconds: the hit stops at "
                f"token {end} and the engine computes the rest")
    if cut == "state":
        return ("this model keeps recurrent state: a hit ends where a state is stored (a chunk's end at a block's "
                f"end, before the prompt's last token): token {end}")
    if end >= tokens:
        return "every chunk of the prompt is stored; the engine computes the prompt's last token itself"
    index = len(hit_keys)
    if any(len(found) > index for found in per_part):
        return (f"chunk {index} is stored for some tensor-parallel ranks or KV cache groups only (each stores its "
                "own entry; the others were evicted or lost)")
    if hit_keys and hit_keys[-1].num_tokens < chunk_size:
        return f"the stored tokens end at token {end}, where an earlier prompt ended; this prompt goes on"
    if index >= len(keys):
        return (f"the prompt's last {tokens - end} tokens are fewer than a chunk, and partial chunks are not stored "
                "(save_partial_chunks is off)")
    key = keys[index]
    span = f"chunk {index} (tokens {key.start}-{key.end - 1})"
    if first_part.hits == index and first_part.miss_evicted_ago is not None:
        return f"{span} was evicted from L1 {first_part.miss_evicted_ago:.0f} s ago and no lower tier holds it"
    return (f"{span} is not stored: never seen under this namespace (model fingerprint, page format, tenant "
            "salt, LoRA), or gone from every tier")
