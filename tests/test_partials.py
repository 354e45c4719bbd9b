"""Partial chunks findable from their parent key: the bounded index."""

from __future__ import annotations

import pytest

from kvmesh.partials import PartialIndex



def _key(i: int) -> bytes:
    return i.to_bytes(16, "little")


# ----------------------------------------------------------------- PartialIndex
def test_index_lists_children_newest_first_and_knows_their_parent() -> None:
    index = PartialIndex()
    index.add(_key(1), _key(10), 5)
    index.add(_key(1), _key(11), 7)
    index.add(_key(2), _key(20), 3)
    assert index.children(_key(1)) == [(_key(11), 7), (_key(10), 5)]
    assert index.parent_of(_key(20)) == (_key(2), 3)
    assert index.parent_of(_key(99)) is None
    assert index.children(_key(3)) == []
    assert len(index) == 3


def test_index_is_bounded_per_parent_keeping_the_newest() -> None:
    index = PartialIndex(per_parent=3, total=100)
    for i in range(10):
        index.add(_key(1), _key(100 + i), i + 1)
    assert index.children(_key(1)) == [(_key(109), 10), (_key(108), 9), (_key(107), 8)]
    assert index.parent_of(_key(100)) is None
    assert len(index) == 3


def test_index_is_bounded_in_all_dropping_the_parent_added_to_least_recently() -> None:
    index = PartialIndex(per_parent=2, total=4)
    index.add(_key(1), _key(10), 1)
    index.add(_key(2), _key(20), 1)
    index.add(_key(1), _key(11), 1)  # parent 1 is now the most recently added to
    index.add(_key(3), _key(30), 1)
    assert index.add(_key(3), _key(31), 1) == [_key(2)]  # five children: parent 2 goes, whole
    assert index.children(_key(2)) == [] and index.parent_of(_key(20)) is None
    assert set(index.parents()) == {_key(1), _key(3)}
    assert len(index) == 4


def test_discard_forgets_children_and_an_empty_parent() -> None:
    index = PartialIndex()
    index.add(_key(1), _key(10), 1)
    index.add(_key(1), _key(11), 2)
    assert index.discard(_key(1), [_key(10)])
    assert not index.discard(_key(1), [_key(10)])
    assert index.discard(_key(1), [_key(11)])
    assert index.parents() == []
    with pytest.raises(ValueError):
        index.add(_key(1), _key(12), 0)
