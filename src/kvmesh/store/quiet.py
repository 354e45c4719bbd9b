"""Holding writes behind back while engines are being served: the foreground never waits on the background.

Measured (benchmarks/bench_foreground.py, docs/benchmarks.md "The foreground under writes behind"): while the
writer thread wrote stores down, every request an engine sent, even a hit of vLLM's own cache, reached its
first token 7-10x later, and the node daemon's control round trips, normally under 1 ms, took up to 1 s. The
cause, found later: the daemon ran on one core, the one vLLM had bound the engine thread that started it to
(``daemon/affinity.py`` now widens its mask). This gate came first, from a wrong diagnosis (the interpreter's
lock), and is kept because it costs nothing measured and keeps writes out of prefills on machines whose cores
are all taken: the writer waits, between batches, until no engine has sent the daemon a message for
``quiet_seconds``. Under load that never pauses, the queue would only grow; once it holds ``force_fraction`` of
its byte budget the writer writes anyway, so stores are delayed, not lost.

A cold prefill sends no message while it computes (seconds), so quiet alone let the writer run during it.
A lookup that misses therefore announces the chunks the engine is about to compute (``expect``), and the
writer also waits until they are committed (or reserved and refused, or aborted: ``arrived``), at most
``hold_seconds`` after the lookup (a request cancelled mid-prefill never commits).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable

MAX_EXPECTED = 1 << 16


class QuietGate:
    """When engines last talked to the daemon, and a wait until they have been quiet for a while."""

    def __init__(self, quiet_seconds: float, clock: Callable[[], float] = time.monotonic,
                 hold_seconds: float = 30.0) -> None:
        if quiet_seconds < 0:
            raise ValueError(f"quiet_seconds must be >= 0, got {quiet_seconds}")
        self.quiet_seconds = quiet_seconds
        self.hold_seconds = hold_seconds
        self._clock = clock
        self._last = float("-inf")
        self._lock = threading.Lock()
        self._expected: dict[bytes, float] = {}  # chunks an engine is computing -> until when to wait for them
        self.waits = 0  # how often the writer waited (a count, for tests and metrics)

    def expect(self, keys: Iterable[bytes]) -> None:
        """An engine missed these chunks and computes them now: hold back until they arrive (or time out)."""
        if not self.quiet_seconds:
            return
        until = self._clock() + self.hold_seconds
        with self._lock:
            for key in keys:
                self._expected[key] = until
            if len(self._expected) > MAX_EXPECTED:  # never unbounded: the oldest expectations go first
                for key in list(self._expected)[:len(self._expected) - MAX_EXPECTED]:
                    del self._expected[key]

    def arrived(self, keys: Iterable[bytes]) -> None:
        """These chunks were committed, refused or aborted: nobody computes them any more."""
        with self._lock:
            for key in keys:
                self._expected.pop(key, None)

    def computing(self) -> int:
        """How many chunks engines are still expected to store (expired expectations dropped)."""
        now = self._clock()
        with self._lock:
            for key in [k for k, until in self._expected.items() if until <= now]:
                del self._expected[key]
            return len(self._expected)

    def busy(self) -> None:
        """An engine's message arrived: background work holds back for ``quiet_seconds`` from now."""
        now = self._clock()
        with self._lock:
            self._last = now

    def wait_until_quiet(self, give_up: Callable[[], bool], poll: float = 0.01) -> None:
        """Return once engines have been quiet for ``quiet_seconds``, or ``give_up()`` says to go on anyway."""
        waited = False
        while True:
            with self._lock:
                remaining = self._last + self.quiet_seconds - self._clock()
            busy = remaining > 0 or self.computing() > 0
            if not busy or give_up():
                break
            waited = True
            time.sleep(min(remaining, poll) if remaining > 0 else poll)
        if waited:
            self.waits += 1
