"""Why a hit ends where it does, from what the lookup said: the cause and its sentence."""

from __future__ import annotations

from kvmesh import wire
from kvmesh.client import LookupResult
from kvmesh.integrations.vllm.explain import CAUSES, hit_end_reason, tokens_by_tier
from kvmesh.keys import chunk_keys, model_namespace

NS = model_namespace("explain-test", "L2.H1.D8.bfloat16")
KEYS = chunk_keys(list(range(4 * 32)), NS, 32)


def _reason(found: LookupResult, hits: int = 1) -> tuple[str, str]:
    return hit_end_reason(4 * 32, KEYS, KEYS[:hits], [KEYS[:hits]], found, None, 32)


def test_a_chunk_lost_tier_by_tier_is_told_oldest_first_with_the_store_that_never_got_there() -> None:
    evicted = LookupResult(1, [], miss_gone=(wire.GoneFrom("l1", "evicted", 40.2),))
    assert _reason(evicted) == ("evicted", "chunk 1 (tokens 32-63) was evicted from L1 40 s ago and no lower tier "
                                           "holds it")
    both = LookupResult(1, [], miss_gone=(wire.GoneFrom("l1", "evicted", 40), wire.GoneFrom("disk", "evicted", 5)))
    assert _reason(both) == ("evicted", "chunk 1 (tokens 32-63) was evicted from L1 40 s ago and evicted from disk "
                                        "5 s ago and no tier holds it now")
    unwritten = LookupResult(1, [], miss_gone=(
        wire.GoneFrom("disk", "not written (the write queue was full)", 9), wire.GoneFrom("l1", "evicted", 2)))
    assert _reason(unwritten) == ("store_dropped", "chunk 1 (tokens 32-63) was not written to disk 9 s ago (the "
                                                   "write queue was full) and evicted from L1 2 s ago and no tier "
                                                   "holds it now")
    corrupt = LookupResult(0, [], miss_gone=(wire.GoneFrom("redis", "dropped as corrupt", 1),))
    assert _reason(corrupt, hits=0) == ("dropped", "chunk 0 (tokens 0-31) was dropped as corrupt from redis 1 s ago "
                                                   "and no tier holds it now")


def test_a_tier_that_could_not_be_asked_comes_before_what_the_others_remember() -> None:
    found = LookupResult(1, [], miss_gone=(wire.GoneFrom("l1", "evicted", 3),), unavailable=("redis",))
    cause, reason = _reason(found)
    assert cause == "tier_unavailable" and reason.startswith("chunk 1 (tokens 32-63) is not in the tiers that "
                                                             "answered; redis could not be asked")
    assert {cause for cause, _ in (_reason(LookupResult(1, [])), _reason(found))} <= set(CAUSES)


def test_tokens_by_tier_credits_l1_with_every_chunk_not_found_below_it() -> None:
    assert tokens_by_tier(KEYS[:3], {1: "disk", 2: "redis"}) == {"l1": 32, "disk": 32, "redis": 32}
    assert tokens_by_tier([], {}) == {}
