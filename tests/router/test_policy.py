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
