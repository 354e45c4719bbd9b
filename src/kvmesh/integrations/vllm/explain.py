"""Why a request's hit stopped where it did: a summary per request, returned to the user who asks for it.

A request that sends ``"kv_transfer_params": {"kvmesh": {"explain": true}}`` gets, in its response's
``kv_transfer_params``, what the cache did for it: the engine's own hit, the tokens kvmesh found per tier and
loaded, the promotion's wait and the load's copy time, and why the hit ended there (``cause`` as a word,
``reason`` in a sentence): the prompt's last token, a chunk evicted from L1 and held by no lower tier, a lower
tier that could not be asked, a chunk never stored under this namespace or stored under another (the daemon
names the part that differs), a promotion that did not finish in time, a recurrent state's boundary, a part
stored by some ranks or groups only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
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
    cause: str = ""  # the same as one word (CAUSES), for programs
    hit_tokens_by_tier: dict[str, int] = field(default_factory=dict)  # kvmesh_hit_tokens by where each chunk was
    promotion_seconds: float = 0.0  # how long the request waited for chunks to come up from disk or Redis
    load_seconds: float = 0.0  # the workers' copy into the engine's pages (the daemon adds it when recorded)
    loaded_bytes: int = 0
    blended_tokens: int = 0  # tokens after the exact hit materialized by blending stored passages (approximate)
    passages_reused: int = 0  # stored passages that blend reused
    loaded_in_background: bool = False  # vLLM's load_async: the request waited for its copy, no other request did

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def kvmesh_params(request: object) -> dict[str, Any]:
    """The request's ``kv_transfer_params["kvmesh"]`` (what it asks of kvmesh: explain, blend, passages), or {}."""
    params = getattr(request, "kv_transfer_params", None) or {}
    own = params.get("kvmesh") if isinstance(params, dict) else None
    return own if isinstance(own, dict) else {}


def wants_explanation(request: object) -> bool:
    return bool(kvmesh_params(request).get("explain"))


CAUSES = ("promotion", "state", "last_token", "parts", "prompt_ended", "partial_off", "tier_unavailable",
          "evicted", "dropped", "store_dropped", "not_stored", "namespace", "daemon_down", "lookup_failed")


def hit_end_reason(tokens: int, keys: Sequence[ChunkKey], hit_keys: Sequence[ChunkKey],
                   per_part: Sequence[Sequence[ChunkKey]], first_part: LookupResult, cut: str | None,
                   chunk_size: int) -> tuple[str, str]:
    """Why the hit of ``hit_keys`` ends where it does (``cut``: what shortened the stored hit): a cause (one of
    ``CAUSES``) and a sentence."""
    end = hit_keys[-1].end if hit_keys else 0
    if cut == "promotion":
        return "promotion", (f"chunks found on disk or in Redis were not in L1 within promotion_wait_seconds: the "
                             f"hit stops at token {end} and the engine computes the rest")
    if cut == "state":
        return "state", ("this model keeps recurrent state: a hit ends where a state is stored (a chunk's end at a "
                         f"block's end, before the prompt's last token): token {end}")
    if end >= tokens:
        return "last_token", "every chunk of the prompt is stored; the engine computes the prompt's last token itself"
    index = len(hit_keys)
    if any(len(found) > index for found in per_part):
        return "parts", (f"chunk {index} is stored for some tensor-parallel ranks or KV cache groups only (each "
                         "stores its own entry; the others were evicted or lost)")
    if hit_keys and hit_keys[-1].num_tokens < chunk_size:
        return "prompt_ended", (f"the stored tokens end at token {end}, where an earlier prompt ended; this prompt "
                                "goes on")
    if index >= len(keys):
        return "partial_off", (f"the prompt's last {tokens - end} tokens are fewer than a chunk, and partial chunks "
                               "are not stored (save_partial_chunks is off)")
    key = keys[index]
    span = f"chunk {index} (tokens {key.start}-{key.end - 1})"
    if first_part.unavailable:
        tiers = " and ".join(first_part.unavailable)
        return "tier_unavailable", (f"{span} is not in the tiers that answered; {tiers} could not be asked (its "
                                    "circuit breaker is open after failures, or the call failed), so what it "
                                    "holds is a miss for now")
    if first_part.hits == index and first_part.miss_gone:
        gone = first_part.miss_gone
        events = " and ".join(_gone_event(g.tier, g.what, g.ago) for g in gone)
        rest = "no lower tier holds it" if [g.tier for g in gone] == ["l1"] else "no tier holds it now"
        whats = {g.what for g in gone}
        cause = ("store_dropped" if any(w.startswith("not ") for w in whats)
                 else "evicted" if whats == {"evicted"} else "dropped")
        return cause, f"{span} was {events} and {rest}"
    return "not_stored", (f"{span} is not stored: never seen under this namespace (model fingerprint, page format, "
                          "tenant salt, LoRA), or gone from every tier")


def _gone_event(tier: str, what: str, ago: float) -> str:
    """"evicted from L1 40 s ago", "not written to disk 3 s ago (the write queue was full)"."""
    where = "L1" if tier == "l1" else tier
    if what.startswith("not "):  # "not written (why)", "not stored (why)": a store that did not get there
        verb, _, why = what.partition(" (")
        return f"{verb} {'to' if verb.endswith('written') else 'in'} {where} {ago:.0f} s ago ({why}"
    return f"{what} from {where} {ago:.0f} s ago"


def tokens_by_tier(hit_keys: Sequence[ChunkKey], found_in: dict[int, str]) -> dict[str, int]:
    """How many of the hit's tokens each tier held (``found_in``: the index of a chunk found below L1 -> its
    tier, as the first lookup saw it; the others were in L1)."""
    counts: dict[str, int] = {}
    for index, key in enumerate(hit_keys):
        tier = found_in.get(index, "l1")
        counts[tier] = counts.get(tier, 0) + key.num_tokens
    return counts
