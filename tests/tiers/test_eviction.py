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
