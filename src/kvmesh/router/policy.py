"""Which engine answers a request first: the choice, and the load each engine carries.

``cache`` picks the engine with the lowest estimated time to first token::

    estimate(e) = backlog(e) + prefill_seconds_per_token(e) * (prompt tokens - credit(e))
    backlog(e)  = prefill_seconds_per_token(e) * (uncached tokens of e's requests still before their first
                  token) + DECODE_STEP_SECONDS * (e's requests past their first token)
    credit(e)   = tokens in e's node's L1 + BELOW_L1_WEIGHT * tokens below it (disk, Redis)

One rule, no thresholds: a hot prefix stays on the engine that holds it until that engine's queue costs more
than the prefill another engine would pay, then spills.  A request counts in its engine's load from the
moment it is routed (every path: streamed, not streamed, retried), so a burst of the same prompt does not all
land on one engine before any of them started.  Recently routed prompts credit their engine for a short time
(``PendingCredit``): the node stores a prompt's KV only once the engine computed it, and a burst's siblings
belong with their first.
"""

from __future__ import annotations

import itertools
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

POLICIES = ("cache", "round-robin", "random")
BELOW_L1_WEIGHT = 0.95  # a chunk on disk or in Redis loads at a few GB/s: nearly as good as one in L1
DECODE_STEP_SECONDS = 0.01  # what a running decode adds to a new request's first token (one batched step)
INITIAL_PREFILL_SECONDS_PER_TOKEN = 0.001  # until an engine's own TTFTs are measured
PENDING_SECONDS = 30.0  # how long a routed prompt credits its engine before its node must confirm it
EWMA_WEIGHT = 0.2
MIN_MEASURED_TOKENS = 64  # shorter prefills say more about overheads than about per-token cost


@dataclass
class InFlight:
    uncached_tokens: int
    started: float
    first_token: bool = False


@dataclass
class EngineLoad:
    """What the router knows of one engine's work: its requests in flight and its prefill speed."""

    prefill_seconds_per_token: float = INITIAL_PREFILL_SECONDS_PER_TOKEN
    in_flight: dict[int, InFlight] = field(default_factory=dict)
    _ids: itertools.count = field(default_factory=itertools.count)

    def backlog_seconds(self) -> float:
        waiting = sum(r.uncached_tokens for r in self.in_flight.values() if not r.first_token)
        decoding = sum(1 for r in self.in_flight.values() if r.first_token)
        return self.prefill_seconds_per_token * waiting + DECODE_STEP_SECONDS * decoding

    def estimate(self, prompt_tokens: int, credit: float) -> float:
        return self.backlog_seconds() + self.prefill_seconds_per_token * max(prompt_tokens - credit, 0.0)

    def start(self, uncached_tokens: int, now: float | None = None) -> int:
        ticket = next(self._ids)
        self.in_flight[ticket] = InFlight(uncached_tokens, time.monotonic() if now is None else now)
        return ticket

    def first_token(self, ticket: int, now: float | None = None) -> None:
        """The request's first token arrived: its prefill is done; learn the engine's speed from it when it
        was the only prefill the engine had."""
        request = self.in_flight.get(ticket)
        if request is None or request.first_token:
            return
        request.first_token = True
        alone = not any(not r.first_token for r in self.in_flight.values())
        if alone and request.uncached_tokens >= MIN_MEASURED_TOKENS:
            seconds = (time.monotonic() if now is None else now) - request.started
            measured = seconds / request.uncached_tokens
            self.prefill_seconds_per_token += EWMA_WEIGHT * (measured - self.prefill_seconds_per_token)

    def finish(self, ticket: int) -> None:
        self.in_flight.pop(ticket, None)


@dataclass(frozen=True, slots=True)
class Candidate:
    """One engine a request could go to, with what its node holds of the prompt."""

    name: str
    load: EngineLoad
    held_tokens: int = 0
    below_l1_tokens: int = 0

    @property
    def credit(self) -> float:
        return (self.held_tokens - self.below_l1_tokens) + BELOW_L1_WEIGHT * self.below_l1_tokens


class Chooser:
    """Orders the engines for one request under one policy (the first is tried first; the rest are the
    fall-backs, best first, for an engine that fails before its first byte)."""

    def __init__(self, policy: str, rng: random.Random | None = None) -> None:
        if policy not in POLICIES:
            raise ValueError(f"--policy must be one of {', '.join(POLICIES)}, got {policy!r}")
        self.policy = policy
        self._turn = itertools.count()
        self._rng = rng or random.Random()

    def order(self, candidates: Sequence[Candidate], prompt_tokens: int) -> list[Candidate]:
        if not candidates:
            return []
        turn = next(self._turn)
        rotated = [candidates[(turn + i) % len(candidates)] for i in range(len(candidates))]
        if self.policy == "round-robin":
            return rotated
        if self.policy == "random":
            return self._rng.sample(list(candidates), len(candidates))
        # ties: fewer requests in flight, then the round-robin turn
        position = {id(c): i for i, c in enumerate(rotated)}
        key: Callable[[Candidate], tuple[float, int, int]] = lambda c: (  # noqa: E731
            round(c.load.estimate(prompt_tokens, c.credit), 6), len(c.load.in_flight), position[id(c)])
        return sorted(candidates, key=key)


class PendingCredit:
    """Prompts routed in the last ``PENDING_SECONDS``, by chunk key, per engine: credited as held until the
    node confirms (or the time runs out), so a burst of one prompt goes where its first went."""

    def __init__(self, seconds: float = PENDING_SECONDS) -> None:
        self.seconds = seconds
        self._routed: dict[str, dict[bytes, tuple[int, float]]] = {}

    def add(self, engine: str, keys: Sequence[tuple[bytes, int]], now: float | None = None) -> None:
        """``keys``: each chunk's key and the token where it ends, first to last."""
        expires = (time.monotonic() if now is None else now) + self.seconds
        routed = self._routed.setdefault(engine, {})
        for digest, end in keys:
            routed[digest] = (end, expires)

    def tokens(self, engine: str, keys: Sequence[tuple[bytes, int]], now: float | None = None) -> int:
        """The leading tokens of a prompt routed to ``engine`` lately."""
        now = time.monotonic() if now is None else now
        routed = self._routed.get(engine, {})
        for digest in [d for d, (_, expires) in routed.items() if expires <= now]:
            del routed[digest]
        held = 0
        for digest, end in keys:
            if digest not in routed:
                break
            held = end
        return held
