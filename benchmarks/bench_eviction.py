"""Eviction by value vs LRU: tokens served from cache per GiB, on a workload larger than the cache.

A trace replayed through kvmesh's L1 bookkeeping (``MemoryTier``, no bytes moved) with each eviction policy:

- ``--users`` returning users, chosen for each request by a Zipf law (``--zipf``): a few come back often,
  most rarely;
- every prompt starts with one of ``--system-prompts`` shared system prompts (1,024 tokens), then the user's own
  document, whose length is drawn per user from ``--contexts`` (mixed lengths), then the conversation so far:
  each visit adds ``--turn-tokens`` tokens of question and answer (up to ``--max-tokens``);
- a request is served from cache up to its first missing chunk (prefix caching), then everything it lacks is
  stored, as an engine with kvmesh does.

Reported per policy and cache size: prompt tokens served from cache (per GiB of cache, and as a share of all
prompt tokens) and the share of prefill work saved (later tokens cost more: attention, ``eviction.prefill_cost``).

    python benchmarks/bench_eviction.py --cache-gib 1 2 4
"""

from __future__ import annotations

import argparse
import hashlib
import random
from dataclasses import dataclass

from kvmesh.tiers.eviction import EVICTION_POLICIES, prefill_cost
from kvmesh.tiers.memory import MemoryTier, ReserveStatus

GiB = 1 << 30


@dataclass
class Result:
    served_tokens: int = 0
    prompt_tokens: int = 0
    saved_cost: float = 0.0
    total_cost: float = 0.0
    evictions: int = 0


def _key(*parts: object) -> bytes:
    return hashlib.blake2b(repr(parts).encode(), digest_size=16).digest()


def make_trace(args: argparse.Namespace) -> list[tuple[int, int]]:
    """(user, visit number) per request."""
    rng = random.Random(args.seed)
    weights = [1 / (rank + 1) ** args.zipf for rank in range(args.users)]
    users = rng.choices(range(args.users), weights=weights, k=args.requests)
    visits: dict[int, int] = {}
    trace = []
    for user in users:
        visits[user] = visits.get(user, 0) + 1
        trace.append((user, visits[user]))
    return trace


def prompt_chunks(user: int, visit: int, args: argparse.Namespace, contexts: list[int]) -> list[tuple[bytes, int]]:
    """The keys of a prompt's chunks, first to last, with each chunk's start position."""
    system = user % args.system_prompts
    length = min(1024 + contexts[user] + visit * args.turn_tokens, args.max_tokens)
    keys: list[tuple[bytes, int]] = []
    for index in range(length // args.chunk_tokens):
        start = index * args.chunk_tokens
        owner = ("system", system) if start < 1024 else ("user", user)  # a user's chunks name their prefix
        keys.append((_key(*owner, index), start))
    return keys


def replay(policy: str, capacity: int, trace: list[tuple[int, int]], args: argparse.Namespace,
           contexts: list[int]) -> Result:
    tier = MemoryTier(capacity, alignment=1, policy=EVICTION_POLICIES[policy]())
    chunk_bytes = args.chunk_tokens * args.bytes_per_token
    result = Result()
    for user, visit in trace:
        chunks = prompt_chunks(user, visit, args, contexts)
        hits = tier.lookup([key for key, _ in chunks])
        for index, (key, start) in enumerate(chunks):
            cost = prefill_cost(start, args.chunk_tokens)
            result.total_cost += cost
            result.prompt_tokens += args.chunk_tokens
            if index < hits:
                result.served_tokens += args.chunk_tokens
                result.saved_cost += cost
                extent = tier.acquire(key)  # a load: the entry is used
                assert extent is not None
                tier.release(key, extent)
            else:
                previous = chunks[index - 1][0] if index else None
                reservation = tier.reserve(key, chunk_bytes, start=start, tokens=args.chunk_tokens,
                                           previous=previous)
                if reservation.status is ReserveStatus.OK:
                    tier.commit(key)
    result.evictions = tier.stats().evictions
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=400)
    parser.add_argument("--requests", type=int, default=8000)
    parser.add_argument("--zipf", type=float, default=1.0)
    parser.add_argument("--system-prompts", type=int, default=4)
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--turn-tokens", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=16384)
    parser.add_argument("--chunk-tokens", type=int, default=256)
    parser.add_argument("--bytes-per-token", type=int, default=23040, help="the demo model in bf16")
    parser.add_argument("--cache-gib", type=float, nargs="+", default=[1.0, 2.0, 4.0])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed + 1)
    contexts = [rng.choice(args.contexts) for _ in range(args.users)]
    trace = make_trace(args)
    distinct = {key for user, visit in trace for key, _ in prompt_chunks(user, visit, args, contexts)}
    working_set = len(distinct) * args.chunk_tokens * args.bytes_per_token / GiB
    print(f"{args.requests} requests of {args.users} users (Zipf {args.zipf}), contexts {args.contexts}, "
          f"{args.system_prompts} system prompts; distinct KV {working_set:.1f} GiB")
    print("| cache GiB | policy | tokens served from cache per GiB | share of prompt tokens | share of prefill "
          "work saved | evictions |")
    print("| --- | --- | --- | --- | --- | --- |")
    for gib in args.cache_gib:
        for policy in EVICTION_POLICIES:
            result = replay(policy, int(gib * GiB), trace, args, contexts)
            print(f"| {gib:g} | {policy} | {result.served_tokens / gib:,.0f} | "
                  f"{result.served_tokens / result.prompt_tokens:.1%} | "
                  f"{result.saved_cost / result.total_cost:.1%} | {result.evictions:,} |", flush=True)


if __name__ == "__main__":
    main()
