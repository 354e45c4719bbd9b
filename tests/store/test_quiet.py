"""Writes behind hold back while engines are served, and write anyway once their queue is backlogged."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

from kvmesh.store import TieredStore
from kvmesh.store.quiet import QuietGate
from kvmesh.tiers.disk import DiskTier
from kvmesh.tiers.memory import MemoryTier

MiB = 1024 * 1024


def _chunk(seed: int) -> torch.Tensor:  # 64 KiB
    return torch.randn(4, 2, 64, 2, 32, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_gate_waits_for_quiet_and_gives_up_when_told() -> None:
    clock = Clock()
    gate = QuietGate(0.25, clock)
    gate.wait_until_quiet(lambda: False)  # never busy: no wait
    assert gate.waits == 0
    gate.busy()
    calls = []

    def give_up() -> bool:
        calls.append(clock.now)
        clock.now += 0.1  # time passes while the writer waits
        return False

    gate.wait_until_quiet(give_up)
    assert gate.waits == 1 and clock.now >= 100.25 and len(calls) >= 2
    gate.busy()
    gate.wait_until_quiet(lambda: True)  # a backlog: go on at once
    assert gate.waits == 1
    with pytest.raises(ValueError, match="quiet_seconds"):
        QuietGate(-1)


def test_chunks_an_engine_computes_hold_the_writer_until_they_arrive_or_time_out() -> None:
    """A cold prefill sends no message for seconds: the chunks its lookup missed keep the writer waiting."""
    clock = Clock()
    gate = QuietGate(0.25, clock, hold_seconds=30)
    gate.busy()
    gate.expect([b"a", b"b"])
    clock.now += 5  # long past the quiet period, the prefill still runs
    assert gate.computing() == 2
    steps = []

    def give_up() -> bool:
        steps.append(clock.now)
        if len(steps) == 3:
            gate.arrived([b"a", b"b"])  # the engine committed what it computed
        clock.now += 0.01
        return False

    gate.wait_until_quiet(give_up, poll=0)
    assert len(steps) == 3 and gate.computing() == 0
    gate.expect([b"c"])
    clock.now += 31  # a request cancelled mid-prefill never commits: the hold ends
    assert gate.computing() == 0
    gate.expect([b"d"])
    assert gate.computing() == 1
    assert QuietGate(0, clock).computing() == 0 and not QuietGate(0, clock).expect([b"e"])


class Busy:
    """An engine sending the daemon a message every few milliseconds until stopped."""

    def __init__(self, gate: QuietGate) -> None:
        self.gate, self.stop = gate, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            self.gate.busy()
            time.sleep(0.005)

    def __enter__(self) -> Busy:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


def _gated_store(tmp_path: Path, l1_bytes: int) -> tuple[TieredStore, DiskTier, QuietGate]:
    """A store writing behind to a real disk tier, held back by a gate that waits for 0.2 s of quiet."""
    gate = QuietGate(0.2)
    disk = DiskTier(tmp_path, 64 * MiB)
    store = TieredStore(MemoryTier(l1_bytes, memoryview(bytearray(l1_bytes))), [disk], prefetch=False,
                        quiet_gate=gate)
    return store, disk, gate


def test_writes_behind_wait_while_engines_are_served(tmp_path: Path) -> None:
    store, disk, gate = _gated_store(tmp_path, 8 * MiB)
    with Busy(gate):
        assert store.put(b"k" * 16, _chunk(0))
        time.sleep(0.5)
        assert disk.stats().stores == 0  # held back while the engine talks
    assert store.flush(10)
    assert disk.stats().stores == 1  # written once it went quiet
    assert gate.waits >= 1


def test_a_backlogged_queue_is_written_even_while_engines_are_served(tmp_path: Path) -> None:
    # L1 of 2 MiB: the queue may hold 1 MiB and is written anyway from 512 KiB on (8 chunks of 64 KiB)
    store, disk, gate = _gated_store(tmp_path, 2 * MiB)
    with Busy(gate):
        for seed in range(10):
            assert store.put(bytes([seed]) * 16, _chunk(seed))
        deadline = time.monotonic() + 10
        while disk.stats().stores < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert disk.stats().stores >= 2  # the backlog went down while the engine kept talking
    assert store.flush(10)
    assert disk.stats().stores == 10
