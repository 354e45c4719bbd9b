"""The router's choice: the lowest estimated time to first token, and the load it is estimated from."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from kvmesh.router.policy import (
    BELOW_L1_WEIGHT,
    DECODE_STEP_SECONDS,
    INITIAL_PREFILL_SECONDS_PER_TOKEN,
    Candidate,
    Chooser,
    EngineLoad,
    PendingCredit,
    PrefillSpeed,
)


def test_cache_sends_a_prompt_to_the_engine_whose_node_holds_it() -> None:
    a, b = EngineLoad(), EngineLoad()
    chooser = Chooser("cache")
    for _ in range(4):  # whatever the round-robin turn
        order = chooser.order([Candidate("a", a, 0), Candidate("b", b, 1500)], 2000)
        assert [c.name for c in order] == ["b", "a"]


def test_a_hot_prefix_spills_once_its_engines_queue_costs_more_than_the_prefill_it_saves() -> None:
    """Every request holds 1,000 of 1,100 tokens on a; each routed one adds its 100 uncached tokens to a's
    queue, and once a's queue exceeds the 1,000 tokens b would prefill, b is chosen."""
    a, b = EngineLoad(), EngineLoad()
    chooser = Chooser("cache")
    chosen = []
    for _ in range(30):
        first = chooser.order([Candidate("a", a, 1000), Candidate("b", b, 0)], 1100)[0]
        chosen.append(first.name)
        first.load.start(1100 - first.held_tokens)
    assert chosen[:10] == ["a"] * 10  # a's queue (100 tokens a request) is still cheaper than 1,000
    assert "b" in chosen and Counter(chosen)["a"] < 30


def test_ties_go_to_fewer_requests_in_flight_then_take_turns() -> None:
    a, b = EngineLoad(), EngineLoad()
    chooser = Chooser("cache")
    firsts = [chooser.order([Candidate("a", a), Candidate("b", b)], 100)[0].name for _ in range(4)]
    assert sorted(firsts) == ["a", "a", "b", "b"]  # no load, no cache: they take turns
    decoding = a.start(0)
    a.first_token(decoding)  # a decodes one request: DECODE_STEP_SECONDS more
    assert {chooser.order([Candidate("a", a), Candidate("b", b)], 100)[0].name for _ in range(4)} == {"b"}


def test_below_l1_tokens_count_a_little_less_than_l1_ones() -> None:
    load = EngineLoad()
    assert Candidate("a", load, 1000, 400).credit == pytest.approx(600 + 400 * BELOW_L1_WEIGHT)
    chooser = Chooser("cache")
    order = chooser.order([Candidate("disk", EngineLoad(), 1000, 1000), Candidate("l1", EngineLoad(), 1000, 0)], 1200)
    assert order[0].name == "l1"


def test_round_robin_and_random_ignore_the_cache() -> None:
    a, b = EngineLoad(), EngineLoad()
    turns = Chooser("round-robin")
    names = [turns.order([Candidate("a", a, 0), Candidate("b", b, 2000)], 2000)[0].name for _ in range(4)]
    assert names == ["a", "b", "a", "b"]
    drawn = Chooser("random", random.Random(3))
    counts = Counter(drawn.order([Candidate("a", a, 0), Candidate("b", b, 2000)], 2000)[0].name for _ in range(200))
    assert 60 < counts["a"] < 140


def test_an_unknown_policy_is_named() -> None:
    with pytest.raises(ValueError, match="'best'"):
        Chooser("best")


def test_an_engine_learns_its_prefill_speed_from_requests_it_prefilled_alone() -> None:
    load = EngineLoad()
    ticket = load.start(1000, now=0.0)
    load.first_token(ticket, now=3.0)  # 3 ms a token
    assert load.prefill_seconds_per_token == pytest.approx(
        INITIAL_PREFILL_SECONDS_PER_TOKEN + 0.2 * (0.003 - INITIAL_PREFILL_SECONDS_PER_TOKEN))
    learned = load.prefill_seconds_per_token
    first, second = load.start(1000, now=10.0), load.start(1000, now=10.0)
    load.first_token(first, now=20.0)  # second still waited: a queue, not a speed
    assert load.prefill_seconds_per_token == learned
    load.finish(first)
    load.finish(second)
    load.finish(ticket)
    assert load.backlog_seconds() == 0.0
    waiting, decoding = load.start(500), load.start(10)
    load.first_token(decoding)
    assert load.backlog_seconds() == pytest.approx(learned * 500 + DECODE_STEP_SECONDS)
    assert waiting != decoding


def test_a_routed_prompt_credits_its_engine_until_the_time_runs_out() -> None:
    pending = PendingCredit(seconds=30)
    chunks = [(b"k1", 256), (b"k2", 512), (b"k3", 600)]
    pending.add("a", chunks[:2], now=100.0)
    assert pending.tokens("a", chunks, now=110.0) == 512
    assert pending.tokens("b", chunks, now=110.0) == 0
    assert pending.tokens("a", [(b"other", 256), *chunks[1:]], now=110.0) == 0  # from the first chunk only
    assert pending.tokens("a", chunks, now=131.0) == 0


PREFIX = [(b"system-0", 256), (b"system-1", 512), (b"system-2", 768)]  # a system prompt every user shares


def _prompt(user: int) -> tuple[tuple[bytes, int], ...]:
    return (*PREFIX, (f"user-{user}".encode(), 1000))


def test_a_prefix_requests_in_flight_share_goes_to_an_idle_engine_once_then_both_hold_it() -> None:
    """a holds the shared system prompt and serves a request with it; b is idle and holds nothing.  The greedy
    estimate prefers a (a short question against b's whole prefill), but the prefix is in demand: b takes one
    request, and once b holds the prefix too the estimate balances the two."""
    a, b = EngineLoad(), EngineLoad()
    chooser = Chooser("cache")
    a.start(232, chunks=_prompt(0))
    first = chooser.order([Candidate("a", a, 768, chunks=_prompt(1)), Candidate("b", b, 0, chunks=_prompt(1))], 1000)
    assert first[0].name == "b"
    assert chooser.order([Candidate("a", a, 768, chunks=_prompt(1)), Candidate("b", b, 0, chunks=_prompt(1))], 1000,
                         replicate=False)[0].name == "a"  # what the estimate alone says
    b.start(1000, chunks=_prompt(1))
    # both busy: no idle engine to replicate on; the estimate decides (a's queue is shorter)
    busy = chooser.order([Candidate("a", a, 768, chunks=_prompt(2)), Candidate("b", b, 768, chunks=_prompt(2))], 1000)
    assert busy[0].name == "a"


def test_a_conversations_own_history_stays_where_it_is_though_another_engine_idles() -> None:
    """a holds this user's history (past the shared system prompt) and serves another user sharing only the
    system prompt: the history is not contended, so the request stays on a."""
    a, b = EngineLoad(), EngineLoad()
    chooser = Chooser("cache")
    a.first_token(a.start(232, chunks=_prompt(0)))  # decoding
    history = (*PREFIX, (b"user-7-history", 1000), (b"user-7-turn", 1100))
    order = chooser.order([Candidate("a", a, 1000, chunks=history), Candidate("b", b, 768, chunks=history)], 1100)
    assert order[0].name == "a"
    # nothing in flight shares the prompt at all: the estimate alone
    c = EngineLoad()
    c.start(500, chunks=[(b"unrelated", 256)])
    alone = chooser.order([Candidate("c", c, 768, chunks=_prompt(3)), Candidate("b", EngineLoad(), 0,
                                                                                chunks=_prompt(3))], 1000)
    assert alone[0].name == "c"


def _learn(load: EngineLoad, seconds: float, tokens: int = 280) -> None:
    ticket = load.start(tokens, now=0.0)
    load.first_token(ticket, now=seconds)
    load.finish(ticket)


def test_engines_sharing_a_speed_learn_it_together_so_an_idle_one_is_not_judged_slower() -> None:
    """b's one slow first token (a noisy measurement) would price it above a forever after; with one speed for
    both, the idle engine stays the cheaper choice for the next request."""
    shared = PrefillSpeed()
    a, b = EngineLoad(speed=shared), EngineLoad(speed=shared)
    _learn(b, 0.6)  # 2.1 ms a token
    for _ in range(5):
        _learn(a, 0.3)  # 1.1 ms a token
    assert a.prefill_seconds_per_token == b.prefill_seconds_per_token == shared.seconds_per_token
    a.first_token(a.start(10))  # a decodes one request; b is idle
    assert Chooser("cache").order([Candidate("a", a, 768), Candidate("b", b, 768)], 1048)[0].name == "b"
    alone_a, alone_b = EngineLoad(), EngineLoad()  # each its own speed: b, measured slower once, loses
    _learn(alone_b, 0.6)
    for _ in range(5):
        _learn(alone_a, 0.3)
    alone_a.first_token(alone_a.start(10))
    assert alone_a.prefill_seconds_per_token < alone_b.prefill_seconds_per_token
    assert Chooser("cache").order([Candidate("a", alone_a, 768), Candidate("b", alone_b, 768)], 1048)[0].name == "a"
