"""Which engine answers a request first: the choice, and the load each engine carries.

``cache`` picks the engine with the lowest estimated time to first token::

    estimate(e) = backlog(e) + prefill_seconds_per_token(e) * (prompt tokens - credit(e))
    backlog(e)  = prefill_seconds_per_token(e) * (uncached tokens of e's requests still before their first
                  token) + DECODE_STEP_SECONDS * (e's requests past their first token)
    credit(e)   = tokens in e's node's L1 + BELOW_L1_WEIGHT * tokens below it (disk, Redis)

No thresholds: a prompt stays on the engine that holds it until that engine's queue costs more than the
prefill another engine would pay, then spills.  A request counts in its engine's load from the moment it is
routed (every path: streamed, not streamed, retried), so a burst of the same prompt does not all land on one
engine before any of them started.  Recently routed prompts credit their engine for a short time
(``PendingCredit``): the node stores a prompt's KV only once the engine computed it, and a burst's siblings
belong with their first.

One exception, for a prefix in demand (a long system prompt every user shares): the estimate is greedy, one
request at a time, and the engine that holds a hot prefix is always the cheaper choice for the next request
while its queue is short, so the prefix would never be computed anywhere else and one engine would serve all
of it while another idles.  So where the best engine's whole advantage is a prefix that requests in flight on
it share right now (``contended``), and another engine has nothing in flight, the idle engine takes the
request: it pays the prefix once, and from then on both hold it and the estimate balances them.  A prefix
only one conversation uses (a chat's own history) is never contended, so returning users stay where their
history is.
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
    chunks: tuple[tuple[bytes, int], ...] = ()  # its prompt's chunks (key, end), first to last: what it shares


@dataclass
class PrefillSpeed:
    """Seconds a prefill takes per uncached token, learned from first tokens.

    The engines of one model in one pool (the router's engines, or its prefill engines) share one: each engine
    learning its own from a few requests differed by noise and fixed overheads more than by hardware, and an
    engine judged slower was never chosen again, so it never learned otherwise (measured: on the hot-prefix
    workload one engine took every request after the twelfth).  Engines of one model on different hardware
    are therefore estimated alike.
    """

    seconds_per_token: float = INITIAL_PREFILL_SECONDS_PER_TOKEN

    def learn(self, measured: float) -> None:
        self.seconds_per_token += EWMA_WEIGHT * (measured - self.seconds_per_token)


@dataclass
class EngineLoad:
    """What the router knows of one engine's work: its requests in flight and its prefill speed."""

    speed: PrefillSpeed = field(default_factory=PrefillSpeed)
    in_flight: dict[int, InFlight] = field(default_factory=dict)
    _ids: itertools.count = field(default_factory=itertools.count)

    @property
    def prefill_seconds_per_token(self) -> float:
        return self.speed.seconds_per_token

    def backlog_seconds(self) -> float:
        waiting = sum(r.uncached_tokens for r in self.in_flight.values() if not r.first_token)
        decoding = sum(1 for r in self.in_flight.values() if r.first_token)
        return self.prefill_seconds_per_token * waiting + DECODE_STEP_SECONDS * decoding

    def estimate(self, prompt_tokens: int, credit: float) -> float:
        return self.backlog_seconds() + self.prefill_seconds_per_token * max(prompt_tokens - credit, 0.0)

    def start(self, uncached_tokens: int, now: float | None = None,
              chunks: Sequence[tuple[bytes, int]] = ()) -> int:
        ticket = next(self._ids)
        self.in_flight[ticket] = InFlight(uncached_tokens, time.monotonic() if now is None else now,
                                          chunks=tuple(chunks))
        return ticket

    def contended(self, chunks: Sequence[tuple[bytes, int]]) -> int:
        """The leading tokens of a prompt (its chunks' keys and ends) that a request in flight here shares."""
        shared = 0
        for request in self.in_flight.values():
            for ours, theirs in zip(chunks, request.chunks):
                if ours != theirs:
                    break
                shared = max(shared, ours[1])
        return shared

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
            self.speed.learn(seconds / request.uncached_tokens)

    def finish(self, ticket: int) -> None:
        self.in_flight.pop(ticket, None)


@dataclass(frozen=True, slots=True)
class Candidate:
    """One engine a request could go to, with what its node holds of the prompt."""

    name: str
    load: EngineLoad
    held_tokens: int = 0
    below_l1_tokens: int = 0
    chunks: tuple[tuple[bytes, int], ...] = ()  # the prompt's chunks under this engine's keys: (key, end)

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

    def order(self, candidates: Sequence[Candidate], prompt_tokens: int, replicate: bool = True) -> list[Candidate]:
        """``replicate``: whether a contended prefix may go to an idle engine (not where a prefill engine has
        just stored the prompt for the decode engine chosen next: there the handoff is the point)."""
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
        ordered = sorted(candidates, key=key)
        best = ordered[0]
        if replicate and best.held_tokens and best.held_tokens <= best.load.contended(best.chunks):
            idle = next((c for c in ordered[1:] if not c.load.in_flight and c.held_tokens < best.held_tokens), None)
            if idle is not None:  # a prefix in demand: replicate it on an idle engine (the module's docstring)
                ordered.remove(idle)
                ordered.insert(0, idle)
        return ordered


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
