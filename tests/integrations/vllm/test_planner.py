from collections.abc import Sequence

import pytest

from kvmesh.integrations.vllm.planner import (
    ChunkTransfer,
    LeaseTicket,
    PlanError,
    RequestTracker,
    complete_chunks,
    match_prefix,
    plan_group_load,
    plan_group_save,
    plan_load,
    plan_load_chunks,
)
from kvmesh.keys import PartKeys, chunk_keys, model_namespace, namespace_root
from kvmesh.layout import KVGroup, KVLayout
from kvmesh.wire import ExtentRef

NS = model_namespace("m", "L1")
TOKENS = list(range(100, 100 + 700))
PAGES = KVLayout(2, 1, 8, block_size=128)
FULL = KVGroup("full", PAGES)


def plan_save_chunks(tracker: RequestTracker, computed: int, block_ids: Sequence[int], group: KVGroup = FULL,
                     step_end: int | None = None) -> list[ChunkTransfer]:
    saves = [plan_group_save(group, chunk, block_ids, computed if step_end is None else step_end)
             for chunk in complete_chunks(tracker, computed)]
    return [save for save in saves if save is not None]


def test_match_prefix_takes_full_hits_then_the_longest_matching_partial() -> None:
    keys = chunk_keys(TOKENS, NS, 256, include_partial=True)  # 256, 256, 188
    # an earlier, shorter prompt stored a partial chunk of 100 tokens after chunk 0
    earlier = chunk_keys(TOKENS[:356], NS, 256, include_partial=True)[1]
    unrelated = chunk_keys(list(range(5000, 5356)), NS, 256, include_partial=True)[1]
    found = match_prefix(TOKENS, keys, 1, [(unrelated.digest, 100), (earlier.digest, 100)], NS)
    assert [(k.start, k.end) for k in found] == [(0, 256), (256, 356)]
    assert found[1].digest == earlier.digest
    assert match_prefix(TOKENS, keys, 1, [(unrelated.digest, 100)], NS) == keys[:1]


def test_every_part_of_an_engine_names_a_stored_partial_chunk_by_the_chunks_own_key() -> None:
    # two tensor-parallel ranks each stored their own entry of the same partial chunk; both must report the
    # chunk itself, or the scheduler finds no partial chunk in common and such engines never load one
    keys = chunk_keys(TOKENS, NS, 256, include_partial=True)
    earlier = chunk_keys(TOKENS[:356], NS, 256, include_partial=True)[1]
    parts = PartKeys.every_part(2)
    found = [match_prefix(TOKENS, keys, 1, [(part(earlier.digest), 100)], NS, part) for part in parts]
    assert found[0] == found[1] == [keys[0], earlier]
    assert match_prefix(TOKENS, keys, 1, [(parts[1](earlier.digest), 100)], NS, parts[0]) == keys[:1]


def test_match_prefix_ignores_partials_longer_than_the_prompt() -> None:
    keys = chunk_keys(TOKENS[:300], NS, 256, include_partial=True)
    longer = chunk_keys(TOKENS[:400], NS, 256, include_partial=True)[1]
    assert match_prefix(TOKENS[:300], keys, 1, [(longer.digest, 144)], NS) == keys[:1]


def test_load_plan_skips_pages_the_engine_already_holds() -> None:
    keys = chunk_keys(TOKENS, NS, 256, include_partial=True)
    block_ids = list(range(50, 56))  # 6 blocks of 128 tokens
    plan = plan_load_chunks(keys, 128, 699, block_ids, 128)
    assert [(t.key.start, t.first_page, t.block_ids) for t in plan] == [
        (0, 1, [51]), (256, 0, [52, 53]), (512, 0, [54, 55])]


def test_save_plan_follows_computed_tokens_and_indexes_the_partial_tail() -> None:
    keys = chunk_keys(TOKENS, NS, 256, include_partial=True)
    tracker = RequestTracker("r", TOKENS, 256, keys, NS)
    block_ids = list(range(10, 16))
    assert plan_save_chunks(tracker, 200, block_ids) == []
    first = plan_save_chunks(tracker, 600, block_ids)
    assert [(t.key.start, t.block_ids, t.parent) for t in first] == [(0, [10, 11], None), (256, [12, 13], None)]
    last = plan_save_chunks(tracker, 700, block_ids)
    assert [(t.key.start, t.key.end, t.block_ids, t.parent) for t in last] == [(512, 700, [14, 15], keys[1].digest)]
    assert plan_save_chunks(tracker, 700, block_ids) == []
    # each chunk names the one before it in the prompt (L1 evicts a prompt from its end)
    assert [t.previous for t in first + last] == [None, keys[0].digest, keys[1].digest]


def test_a_prompt_shorter_than_a_chunk_is_a_partial_under_its_namespaces_root() -> None:
    keys = chunk_keys(TOKENS[:100], NS, 256, include_partial=True)
    tracker = RequestTracker("r", TOKENS[:100], 256, keys, NS)
    [only] = plan_save_chunks(tracker, 100, [7])
    assert only.parent == namespace_root(NS) and only.block_ids == [7]
    # every model, tenant and LoRA has its own first parent, none the all-zero one they once shared
    others = [model_namespace("m", "L1", "tenant-b"), model_namespace("other", "L1")]
    assert len({namespace_root(ns) for ns in [NS, *others]} | {bytes(16)}) == 4


def test_a_partial_under_another_namespaces_root_is_not_matched() -> None:
    short = TOKENS[:100]
    keys = chunk_keys(short, NS, 256, include_partial=True)
    other = model_namespace("m", "L1", "tenant-b")
    theirs = chunk_keys(short, other, 256, include_partial=True)[0]
    assert match_prefix(short, keys, 0, [(theirs.digest, 100)], NS) == []
    assert match_prefix(short, keys, 0, [(keys[0].digest, 100)], NS) == keys


def test_load_plan_pairs_each_chunk_with_its_pinned_extent_and_marks_the_rest_unpinned() -> None:
    keys = chunk_keys(TOKENS, NS, 256, include_partial=True)
    transfers = plan_load_chunks(keys, 0, 699, list(range(6)), 128)
    extents = [ExtentRef(0, 64, "a"), ExtentRef(64, 64, "b")]  # the lease pinned the first two chunks only
    plan = plan_load("r", transfers, LeaseTicket("lease", "epoch"), extents, 699)
    assert [(c.transfer.key.start, c.extent) for c in plan.chunks] == [
        (0, extents[0]), (256, extents[1]), (512, None)]
    assert [c.transfer.block_ids for c in plan.unpinned] == [[4, 5]]
    nothing = plan_load("r", transfers, None, [], 699)  # no daemon: no lease, every chunk unpinned
    assert nothing.lease is None and nothing.unpinned == nothing.chunks


WINDOW = KVGroup("window", PAGES, window=128)
STATE = KVGroup.state(1, 4096, 128, "MAMBA2:test")


def test_a_window_group_stores_a_chunks_last_window_and_loads_only_what_the_next_token_sees() -> None:
    keys = chunk_keys(TOKENS, NS, 256, include_partial=True)  # 256, 256, 188 tokens; blocks of 128
    tracker = RequestTracker("r", TOKENS, 256, keys, NS)
    block_ids = list(range(10, 16))
    saved = plan_save_chunks(tracker, 700, block_ids, WINDOW)
    # each entry keeps the pages of its chunk's last 128 tokens: one of two pages, both of the tail's
    assert [(t.key.start, t.block_ids) for t in saved] == [(0, [11]), (256, [13]), (512, [14, 15])]
    # a hit of 699 tokens needs tokens 572..698 of these layers: pages 4 and 5, from the tail's entry
    [tail] = plan_group_load(WINDOW, keys, 0, 699, block_ids)
    assert (tail.key.start, tail.first_page, tail.block_ids) == (512, 0, [14, 15])
    # a hit of 512 needs tokens 385..511: page 3, the second chunk's only stored page
    [second] = plan_group_load(WINDOW, keys[:2], 0, 512, block_ids)
    assert (second.key.start, second.first_page, second.block_ids) == (256, 0, [13])
    # a hit of 600 past the engine's own 512: only the pages past 512, from the tail's entry
    [past] = plan_group_load(WINDOW, keys, 512, 600, block_ids)
    assert (past.first_page, past.block_ids) == (0, [14])


def test_a_window_page_that_vllm_freed_is_never_stored() -> None:
    keys = chunk_keys(TOKENS[:512], NS, 256)
    tracker = RequestTracker("r", TOKENS[:512], 256, keys, NS)
    assert plan_save_chunks(tracker, 512, [10, 0, 12, 13], WINDOW) == [
        ChunkTransfer(keys[1], [13], 0, None, keys[0].digest)]


def test_a_state_is_stored_only_where_a_step_ends_and_loaded_into_two_blocks() -> None:
    keys = chunk_keys(TOKENS, NS, 256, include_partial=True)
    tracker = RequestTracker("r", TOKENS, 256, keys, NS)
    # one step computed tokens 0..599: the state after 256 never existed, the one after 512 neither
    assert plan_save_chunks(tracker, 600, [0, 0, 0, 0, 21], STATE) == []
    tracker = RequestTracker("r", TOKENS, 256, keys, NS)
    [first] = plan_save_chunks(tracker, 256, [20, 21], STATE)
    assert (first.key.end, first.block_ids) == (256, [21])  # the block after 256 tokens
    # the second chunk ended inside the step (no state); the tail at the prompt's end, inside a block: none
    assert plan_save_chunks(tracker, 700, [0, 0, 0, 0, 0, 25], STATE, step_end=700) == []
    aligned = chunk_keys(TOKENS[:640], NS, 256, include_partial=True)  # a tail of 128 tokens ends a block
    tracker = RequestTracker("r", TOKENS[:640], 256, aligned, NS)
    tracker.stored_chunks = 2
    [tail] = plan_save_chunks(tracker, 640, [0, 0, 0, 0, 25], STATE)
    assert (tail.key.end, tail.block_ids, tail.parent) == (640, [25], aligned[1].digest)
    # a hit of 512: the state of the chunk ending at 512 goes into block 3 (vLLM caches it) and block 4
    # (this step's, which vLLM filled from block 3 before the load)
    [load] = plan_group_load(STATE, keys[:2], 0, 512, [0, 0, 0, 33, 34])
    assert (load.key, load.block_ids, load.entry_pages) == (keys[1], [33, 34], [0, 0])
    with pytest.raises(PlanError, match="a hit ending at 511 does not end a chunk"):
        plan_group_load(STATE, keys[:2], 0, 511, [0, 0, 0, 33, 34])
