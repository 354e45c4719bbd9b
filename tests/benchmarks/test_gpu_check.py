"""``benchmarks/gpu_check.py`` before any GPU run: its per-layout check, on CPU tensors, must find every round trip
bit-exact.

There is no CUDA device here, so the copier is the CPU's stand-in for ``DeviceCopier`` (the same copy function,
``page_copy.move_pages_device``, with events that are done at once), host memory is not pinned and there is no
device to synchronize.  What runs is the check's own code: each of vLLM's GPU layouts, runs of blocks and
scattered blocks, through a real shared-memory segment.  A broken check found here costs no lent GPU time.
"""

from __future__ import annotations

import sys
import uuid
from pathlib import Path

import pytest
import torch

from kvmesh.page_copy import PageJob, move_pages_device
from kvmesh.tiers.shm import SharedSegment

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import gpu_check  # noqa: E402


class _Done:
    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        return


class _CpuCopier:
    """``DeviceCopier``'s interface over CPU tensors."""

    def move(self, jobs: list[PageJob], layers: list[torch.Tensor], into_engine: bool, wait: bool = True,
             engine_waits: bool = True) -> _Done:
        move_pages_device(jobs, layers, into_engine)
        return _Done()


@pytest.fixture
def segment():
    segment = SharedSegment.create(f"kvmesh-gpu-check-test-{uuid.uuid4().hex[:8]}", 1 << 26, prefault=False)
    yield segment
    segment.close()
    segment.unlink()


@pytest.mark.parametrize("layout", ["LBHNC", "LBNHC", "BLHNC", "MLA"])
@pytest.mark.parametrize("pattern", ["runs", "scattered"])
def test_each_layouts_round_trip_is_bit_exact(layout: str, pattern: str, segment: SharedSegment,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gpu_check, "LAYERS", 4)
    monkeypatch.setattr(gpu_check, "CHUNKS", 2)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args, **kwargs: None)
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: self)
    row = gpu_check.check_layout(layout, pattern, segment, _CpuCopier(), torch.device("cpu"), repeat=1)
    assert row["bit_exact"] is True and row["background_load_bit_exact"] is True
    page = 576 if layout == "MLA" else 2 * gpu_check.HEAD_SIZE * gpu_check.HEADS
    assert row["bytes"] == 4 * 2 * gpu_check.CHUNK_BLOCKS * gpu_check.BLOCK * page * 2  # bf16
