"""The LRU order gives keys lazily: an eviction reads the first few, not a copy of every entry."""

from __future__ import annotations

from kvmesh.tiers.eviction import LRUPolicy


def test_candidates_come_oldest_first_once_each_while_the_caller_removes_them() -> None:
    policy = LRUPolicy()
    for i in range(100):
        policy.add(bytes([i]))
    policy.touch(bytes([0]))  # now the newest
    kept = {bytes([i]) for i in range(1, 40, 3)}  # pinned: the caller skips them, they stay
    taken = []
    for key in policy.candidates():
        if key not in kept:
            policy.remove(key)
            taken.append(key)
    assert taken == [bytes([i]) for i in range(1, 100) if bytes([i]) not in kept] + [bytes([0])]
    assert len(policy) == len(kept)


def test_taking_the_first_candidate_reads_a_prefix_not_the_whole_order() -> None:
    policy = LRUPolicy()
    for i in range(100_000):
        policy.add(i.to_bytes(4, "little"))
    reads = 0
    order = policy._order  # the OrderedDict the candidates are read from

    class Watched(type(order)):  # counts the keys iterated out of the order
        def __iter__(self):
            nonlocal reads
            for key in super().__iter__():
                reads += 1
                yield key

    policy._order = Watched(order)
    first = next(policy.candidates())
    assert first == (0).to_bytes(4, "little") and reads <= 16


# ------------------------------------------------------------------------------------------ by value
def _chain(policy, name: str, chunks: int, tokens: int = 256, nbytes: int = 1000) -> list[bytes]:
    """A prompt's chunks, each described with its position and the chunk before it, then added."""
    keys = [f"{name}{i}".encode() for i in range(chunks)]
    for index, key in enumerate(keys):
        policy.describe(key, nbytes, index * tokens, tokens, keys[index - 1] if index else None)
        policy.add(key)
    return keys


def _evict_all(policy) -> list[bytes]:
    order = []
    while len(policy):
        key = next(policy.candidates())
        policy.remove(key)
        order.append(key)
    return order


def test_a_prompt_leaves_from_its_end_never_from_its_head() -> None:
    from kvmesh.tiers.eviction import ValuePolicy

    policy = ValuePolicy()
    keys = _chain(policy, "p", 5)
    for key in keys[:2]:  # the head is used more (shared by more requests) but still goes last
        policy.touch(key)
    assert _evict_all(policy) == keys[::-1]


def test_what_is_used_more_and_costs_more_to_recompute_stays_longer() -> None:
    from kvmesh.tiers.eviction import ValuePolicy, prefill_cost

    policy = ValuePolicy()
    once, often, deep = _chain(policy, "once", 1), _chain(policy, "often", 1), _chain(policy, "deep", 16)
    for _ in range(3):
        policy.touch(often[0])
    # values: once 1 x cost(0); often 4 x cost(0); the deep prompt's last chunk 1 x cost(3840), in between
    assert prefill_cost(0, 256) < prefill_cost(15 * 256, 256) < 4 * prefill_cost(0, 256)
    order = _evict_all(policy)
    assert order[:3] == [once[0], deep[-1], deep[-2]]
    assert order.index(often[0]) > order.index(deep[-3])  # used four times: outlives most of the deep prompt


def test_candidates_a_caller_keeps_come_back_in_the_next_call() -> None:
    from kvmesh.tiers.eviction import ValuePolicy

    policy = ValuePolicy()
    a, b = _chain(policy, "a", 1), _chain(policy, "b", 1)
    pinned = next(policy.candidates())  # the caller looked and kept it (pinned)
    assert set(policy.candidates()) == {a[0], b[0]}  # both still offered, each once
    assert pinned in policy


def test_a_chunk_stored_before_its_parent_never_leaves_the_parent_stuck() -> None:
    from kvmesh.tiers.eviction import ValuePolicy

    policy = ValuePolicy()
    policy.describe(b"child", 1000, 256, 256, b"parent")
    policy.add(b"child")  # promoted from disk before the chunk before it
    policy.describe(b"parent", 1000, 0, 256, None)
    policy.add(b"parent")
    policy.remove(b"child")
    assert _evict_all(policy) == [b"parent"]  # a leaf, evictable: not waiting for a child count below 0


def test_a_tier_evicting_by_value_never_exceeds_its_budget_and_forgets_aborted_reservations() -> None:
    import random

    from kvmesh.tiers.eviction import ValuePolicy
    from kvmesh.tiers.memory import MemoryTier, ReserveStatus

    rng = random.Random(4)
    tier = MemoryTier(64 * 1024, alignment=1, policy=ValuePolicy())
    for _ in range(3000):
        prompt, index = rng.randrange(40), rng.randrange(8)
        key, previous = f"{prompt}-{index}".encode(), (f"{prompt}-{index - 1}".encode() if index else None)
        if rng.random() < 0.3:
            extent = tier.acquire(key)
            if extent is not None:
                tier.release(key, extent)
            continue
        reservation = tier.reserve(key, rng.randrange(1000, 9000), start=index * 256, tokens=256, previous=previous)
        if reservation.status is ReserveStatus.OK:
            (tier.abort if rng.random() < 0.1 else tier.commit)(key)
        stats = tier.stats()
        assert stats.bytes_used <= tier.capacity
        assert len(tier.policy) == stats.entries
        assert not tier.policy._pending  # described, then committed or aborted: nothing left behind
