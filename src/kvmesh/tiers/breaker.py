"""A circuit breaker: stop calling a remote tier that keeps failing, and probe it now and then.

A cache that waits on a dead server makes every request slower than having no
cache.  After ``failure_threshold`` consecutive failures the breaker *opens*:
callers skip the remote and treat the call as a miss, at no cost.  Once
``reset_seconds`` have passed it lets exactly one probe through (*half-open*);
a success closes it, a failure opens it for another ``reset_seconds``.
The clock is injectable so the state machine is tested without sleeping.
"""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Callable


def circuit_open(tier: object) -> bool:
    """Whether ``tier`` has a breaker that is not closed (open, or probing a server that failed)."""
    breaker = getattr(tier, "breaker", None)
    return isinstance(breaker, CircuitBreaker) and breaker.state is not BreakerState.CLOSED


def failing(tier: object) -> bool:
    """Whether ``tier``'s last call failed or its breaker keeps calls away (what a miss's explanation says)."""
    breaker = getattr(tier, "breaker", None)
    return isinstance(breaker, CircuitBreaker) and breaker.failing


class BreakerState(enum.Enum):
    CLOSED = "closed"  # calls go through
    OPEN = "open"  # calls are refused until reset_seconds have passed
    HALF_OPEN = "half_open"  # one probe is out; the others are refused until it reports


class CircuitBreaker:
    """Consecutive-failure breaker; thread-safe.

    Callers ask :meth:`allow` before a call and report its outcome with
    :meth:`record_success` or :meth:`record_failure`.  A probe that never
    reports (its caller died) is replaced by a new one after another
    ``reset_seconds``, so the breaker cannot stay half-open forever.
    """

    def __init__(self, failure_threshold: int = 3, reset_seconds: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if failure_threshold < 1:
            raise ValueError(f"failure_threshold must be at least 1, got {failure_threshold}")
        if reset_seconds < 0:
            raise ValueError(f"reset_seconds must not be negative, got {reset_seconds}")
        self.failure_threshold = failure_threshold
        self.reset_seconds = reset_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._since = 0.0  # when the breaker last opened, or when the current probe went out

    @property
    def state(self) -> BreakerState:
        with self._lock:
            return self._state

    def allow(self) -> bool:
        """May a call go to the remote now?  (In half-open, True only for the single probe.)"""
        with self._lock:
            if self._state is BreakerState.CLOSED:
                return True
            now = self._clock()
            if now - self._since < self.reset_seconds:
                return False
            self._state = BreakerState.HALF_OPEN
            self._since = now
            return True

    @property
    def failing(self) -> bool:
        """The last call failed, or calls are refused (open, or one probe out)."""
        with self._lock:
            return self._failures > 0 or self._state is not BreakerState.CLOSED

    def record_success(self) -> None:
        with self._lock:
            self._state = BreakerState.CLOSED
            self._failures = 0

    def record_failure(self) -> None:
        with self._lock:
            self._failures += 1
            if self._state is BreakerState.HALF_OPEN or self._failures >= self.failure_threshold:
                self._state = BreakerState.OPEN
                self._since = self._clock()
