"""What to load and what to save for one request: pure bookkeeping, no engine, no daemon.

The vLLM connector's scheduler side uses this to turn a lookup into a load
plan (which stored chunks go into which engine blocks) and, step by step, to
decide which chunks of a prompt have just been computed and should be saved.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from kvmesh.client import LookupResult
from kvmesh.integrations.vllm.explain import Explanation
from kvmesh.keys import ChunkKey, Namespace, PartKeys, chunk_digest, namespace_root
from kvmesh.layout import KVGroup
from kvmesh.page_copy import pages_for_tokens
from kvmesh.wire import ExtentRef


@dataclass(frozen=True, slots=True)
class ChunkTransfer:
    """Move pages of one stored chunk to or from engine blocks.

    ``block_ids[i]`` pairs with page ``first_page + i`` of the chunk's entry, or page ``page_index[i]`` where
    that is given (a recurrent state's one page, loaded into two blocks).  ``parent`` is set for a partial
    chunk (so the daemon can index it); ``previous`` names the chunk before
    this one in its prompt (for L1's eviction; None for the first).
    """

    key: ChunkKey
    block_ids: list[int]
    first_page: int = 0
    parent: bytes | None = None
    previous: bytes | None = None
    page_index: tuple[int, ...] = ()

    @property
    def entry_pages(self) -> list[int]:
        """The entry's page for each of ``block_ids``."""
        return list(self.page_index) or list(range(self.first_page, self.first_page + len(self.block_ids)))


@dataclass(frozen=True, slots=True)
class LeaseTicket:
    """The lease that pins a plan's entries, valid in the daemon ``epoch`` that granted it."""

    lease_id: str
    epoch: str


@dataclass(frozen=True, slots=True)
class ChunkLoad:
    """One chunk to load: its pages and blocks, and where the lease pinned its entry.

    ``extent`` is None when the chunk is not pinned (evicted between lookup and lease, or no daemon):
    its blocks are reported failed and vLLM recomputes them.
    """

    transfer: ChunkTransfer
    extent: ExtentRef | None


@dataclass(frozen=True, slots=True)
class LoadPlan:
    """One rank's load of one request (with tensor parallelism each rank has its own entries and lease)."""

    req_id: str
    lease: LeaseTicket | None  # None: nothing could be pinned (no daemon)
    chunks: list[ChunkLoad]
    num_tokens: int  # tokens the request loads (counted once: rank 0's plan of the shape's token_group)
    rank: int = 0
    group: int = 0  # the KV cache group whose pages these are (layout.KVGroup)
    background: bool = False  # vLLM's load_async: the worker reports it in get_finished once copied

    @property
    def unpinned(self) -> list[ChunkLoad]:
        return [chunk for chunk in self.chunks if chunk.extent is None]


def plan_load(req_id: str, transfers: Sequence[ChunkTransfer], lease: LeaseTicket | None,
              extents: Sequence[ExtentRef], num_tokens: int, rank: int = 0, group: int = 0,
              background: bool = False) -> LoadPlan:
    """Pair each chunk with the extent its lease pinned; the lease pins a prefix, so the rest get None."""
    chunks = [ChunkLoad(transfer, extents[index] if index < len(extents) else None)
              for index, transfer in enumerate(transfers)]
    return LoadPlan(req_id, lease, chunks, num_tokens, rank, group, background)


@dataclass(frozen=True, slots=True)
class SavePlan:
    req_id: str
    chunks: list[ChunkTransfer]
    group: int = 0  # the KV cache group whose pages these are


@dataclass
class RequestTracker:
    """The scheduler's memory of one request."""

    req_id: str
    tokens: list[int]
    chunk_size: int
    keys: list[ChunkKey]  # full chunks of the prompt, then its partial tail chunk if any
    namespace: Namespace  # the keys' namespace (model, layout, tenant, LoRA)
    hit_keys: list[ChunkKey] = field(default_factory=list)  # what the last lookup found
    stored_chunks: int = 0  # leading chunks of ``keys`` known to be stored (hit or saved)
    local_tokens: int = 0  # the engine's own hit, as last presented to the lookup
    asked: bool = False  # the request asked for its explanation in its response
    identity: dict[str, str] = field(default_factory=dict)  # its namespace's parts (SchedulerSide._identity)
    explanation: Explanation = field(init=False)  # what the cache did for the request (every request has one)

    def __post_init__(self) -> None:
        self.explanation = Explanation(len(self.tokens))

    @property
    def hit_tokens(self) -> int:
        return self.hit_keys[-1].end if self.hit_keys else 0


def match_prefix(tokens: Sequence[int], keys: Sequence[ChunkKey], hits: int,
                 partials: Sequence[tuple[bytes, int]], ns: Namespace,
                 entry_key: Callable[[bytes], bytes] = lambda digest: digest) -> list[ChunkKey]:
    """The stored chunks that cover the longest prefix of ``tokens``.

    ``hits`` leading chunks of ``keys`` are stored; ``partials`` are stored
    partial chunks that follow the last hit, by their entries' keys (``entry_key`` of the chunk's key:
    a tensor-parallel rank's own).  A partial chunk counts only if it holds exactly this prompt's next
    tokens (its key is recomputed from them).  Every chunk returned is named by the chunk's own key, never a
    part's entry key, so that the parts of one engine agree on what they found and each caller maps a chunk
    to a part's entry itself (``PartKeys``).
    """
    found = list(keys[:hits])
    if hits == len(keys):
        return found
    start = found[-1].end if found else 0
    parent = found[-1].digest if found else namespace_root(ns)
    for digest, count in sorted(partials, key=lambda item: -item[1]):
        end = start + count
        if end > len(tokens):
            continue
        own = chunk_digest(parent, ns, tokens[start:end])
        if entry_key(own) == digest:
            found.append(ChunkKey(own, start, end))
            break
    return found


def lookup_parts(client: Any, tokens: Sequence[int], keys: Sequence[ChunkKey], ns: Namespace,
                 parts: Sequence[PartKeys], count: bool, prefetch: bool = True
                 ) -> tuple[list[list[ChunkKey]], list[LookupResult]]:
    """Each part's stored chunks covering the longest prefix of ``tokens`` (``match_prefix``), and each part's
    lookup: one lookup per part (tensor-parallel rank, KV cache group), under the part's own keys.

    ``count``: the first part's lookup counts in the daemon's metrics (the others never do); ``prefetch``
    False: a probe that moves nothing between tiers.  The engine's scheduler, a prefill confirming what it
    stored, and the router's probe of a node all ask this way.
    """
    found = [client.lookup_with_partials([part.key(k) for k in keys], count=count and index == 0,
                                         root=part(namespace_root(ns)), prefetch=prefetch)
             for index, part in enumerate(parts)]
    per_part = [match_prefix(tokens, keys, result.hits, [(p.digest, p.tokens) for p in result.partials], ns, part)
                for part, result in zip(parts, found)]
    return per_part, found


def held_by_every_part(per_part: Sequence[list[ChunkKey]]) -> list[ChunkKey]:
    """The stored prefix every part holds, by its end: the shortest part's (each part's entries are stored,
    evicted and lost on their own).  What a prefill confirms, the router credits and ``kvmesh explain`` shows."""
    ends = [held[-1].end if held else 0 for held in per_part]
    return list(per_part[ends.index(min(ends))])


def end_at_state(hit_keys: list[ChunkKey], prompt_tokens: int, block: int) -> bool:
    """Drop the hit's last chunks until it ends where a recurrent state is stored: a block's end, before the
    prompt's last token (models with recurrent state); whether any was dropped."""
    cut = False
    while hit_keys and (hit_keys[-1].end > prompt_tokens - 1 or hit_keys[-1].end % block):
        hit_keys.pop()
        cut = True
    return cut


def plan_load_chunks(hit_keys: Sequence[ChunkKey], first_token: int, last_token: int,
                     block_ids: Sequence[int], block_size: int) -> list[ChunkTransfer]:
    """Chunks and pages that bring tokens ``first_token .. last_token-1`` into the request's blocks.

    ``first_token`` is block-aligned (the engine's own hit); pages before it are
    already in the engine and are not touched.
    """
    transfers = []
    wanted = pages_for_tokens(first_token, last_token, block_size)
    for key in hit_keys:
        if key.end <= first_token or key.start >= last_token:
            continue
        chunk_pages = pages_for_tokens(key.start, key.end, block_size)
        pages = range(max(chunk_pages.start, wanted.start), min(chunk_pages.stop, wanted.stop))
        if len(pages):
            transfers.append(ChunkTransfer(key, [block_ids[p] for p in pages], pages.start - chunk_pages.start))
    return transfers


class PlanError(RuntimeError):
    """A load or save plan that contradicts what the engine keeps: a bug in kvmesh or a vLLM it does not know."""


def plan_group_load(group: KVGroup, hit_keys: Sequence[ChunkKey], first_token: int, last_token: int,
                    block_ids: Sequence[int]) -> list[ChunkTransfer]:
    """What one KV cache group loads for a hit of ``last_token`` tokens past the engine's own ``first_token``.

    * ``full``: every page of the tokens (``plan_load_chunks``).
    * ``window``: the pages of the tokens vLLM keeps for the next one, ``[last - window + 1, last)``, each from
      the chunk entry that keeps it (``KVGroup.kept_tokens``).
    * ``state``: the state stored with the hit's last chunk, which ends exactly at ``last_token``, into its
      own block (which vLLM then caches) and into the block the next step runs from: vLLM copies the former
      into the latter before the connector loads, so both must be written.
    """
    size = group.block_size
    if group.kind == "full":
        return plan_load_chunks(hit_keys, first_token, last_token, block_ids, size)
    if group.kind == "state":
        last = hit_keys[-1] if hit_keys else None
        if last is None or last.end != last_token:
            raise PlanError(f"a recurrent state is stored after a chunk's last token; a hit ending at {last_token} "
                            f"does not end a chunk (last chunk ends at {last.end if last else 'none'})")
        blocks = list(dict.fromkeys((block_ids[(last_token - 1) // size], block_ids[-1])))
        return [ChunkTransfer(last, blocks, 0, page_index=(0,) * len(blocks))]
    wanted = pages_for_tokens(max(first_token, last_token - group.window + 1), last_token, size)
    transfers = []
    for key in hit_keys:
        kept = pages_for_tokens(*group.kept_tokens(key.start, key.end), size)
        pages = range(max(kept.start, wanted.start), min(kept.stop, wanted.stop))
        if len(pages):
            transfers.append(ChunkTransfer(key, [block_ids[p] for p in pages], pages.start - kept.start))
    covered = sum(len(t.block_ids) for t in transfers)
    if covered != len(wanted):
        raise PlanError(f"the stored window pages cover {covered} of the {len(wanted)} pages a hit of {last_token} "
                        f"tokens needs (window {group.window}, block {size})")
    return transfers


@dataclass(frozen=True, slots=True)
class CompletedChunk:
    """A chunk of the prompt whose tokens are all computed: to be stored (each group's part of it)."""

    key: ChunkKey
    parent: bytes | None  # set for a partial chunk: the chunk it continues (or the namespace's root)
    previous: bytes | None  # the chunk before it in the prompt


def complete_chunks(tracker: RequestTracker, computed_tokens: int) -> list[CompletedChunk]:
    """Chunks whose tokens are all computed now and not yet known to be stored; advances the tracker."""
    completed = []
    while tracker.stored_chunks < len(tracker.keys):
        key = tracker.keys[tracker.stored_chunks]
        if key.end > computed_tokens:
            break
        previous = tracker.keys[tracker.stored_chunks - 1].digest if tracker.stored_chunks else None
        parent = None
        if key.num_tokens < tracker.chunk_size:  # the partial tail: index it under its parent
            parent = previous if previous is not None else namespace_root(tracker.namespace)
        completed.append(CompletedChunk(key, parent, previous))
        tracker.stored_chunks += 1
    return completed


def plan_group_save(group: KVGroup, chunk: CompletedChunk, block_ids: Sequence[int],
                    step_end: int) -> ChunkTransfer | None:
    """The pages of one group that store ``chunk``; None where this step did not leave them.

    ``step_end`` is where this step's computation ends.  A recurrent state exists only there (vLLM keeps the
    state after each step), so a chunk that ends inside a step is stored without its state and no hit ends
    at it; nor at a prompt's end inside a block (a partial chunk), where the state after a step that stopped
    there could differ in rounding from the state a prefill running past it computes.  Window pages vLLM has
    already freed (its null block) are never stored.
    """
    key, size = chunk.key, group.block_size
    if group.kind == "state":
        if key.end != step_end or key.end % size:  # vLLM's own cache hits at block ends only: so do kvmesh's
            return None
        pages = range((key.end - 1) // size, (key.end - 1) // size + 1)
    else:
        pages = pages_for_tokens(*group.kept_tokens(key.start, key.end), size)
    if pages.stop > len(block_ids):
        raise PlanError(f"a computed chunk ends at token {key.end}, past the request's {len(block_ids)} blocks")
    blocks = [block_ids[p] for p in pages]
    if group.kind == "window" and NULL_BLOCK in blocks:
        return None
    return ChunkTransfer(key, blocks, 0, chunk.parent, chunk.previous)


NULL_BLOCK = 0  # vLLM's null block (its block pool's first): stands for a page it freed or never kept

