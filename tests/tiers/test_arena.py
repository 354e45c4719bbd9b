from hypothesis import given, settings
from hypothesis import strategies as st

from kvmesh.tiers.arena import ExtentAllocator


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 20_000)), max_size=80))
def test_extents_never_overlap_or_leave_the_arena(ops) -> None:
    arena = ExtentAllocator(64 * 1024, alignment=1024)
    live: dict[int, int] = {}
    for allocate, size in ops:
        if allocate or not live:
            offset = arena.allocate(size)
            if offset is not None:
                live[offset] = arena.rounded(size)
        else:
            offset = sorted(live)[size % len(live)]
            arena.free(offset, live.pop(offset))
        spans = sorted(live.items())
        for (a, a_size), (b, _) in zip(spans, spans[1:]):
            assert a + a_size <= b
        assert all(offset + size <= arena.capacity for offset, size in spans)
        assert arena.used == sum(live.values())
    for offset, size in list(live.items()):
        arena.free(offset, size)
    assert arena.largest_free() == arena.capacity  # everything coalesced back
