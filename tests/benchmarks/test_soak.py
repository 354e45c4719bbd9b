"""The soak with faults in its short form (~2.5 minutes of faults on two engines): it must run clean.

``benchmarks/soak.py`` is run as a user runs it; its report is the evidence: no failed request, no wrong
answer among the probes compared one at a time, no budget exceeded, and every kind of fault injected
(``disk-full`` only where a tmpfs can be mounted, which needs root: otherwise the report says why not).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SOAK = Path(__file__).resolve().parents[2] / "benchmarks" / "soak.py"
sys.path.insert(0, str(SOAK.parent))

from soak_faults import KINDS  # noqa: E402


def test_the_short_soak_with_faults_runs_clean(tmp_path: Path) -> None:
    report_path = tmp_path / "soak.json"
    done = subprocess.run(
        [sys.executable, str(SOAK), "--seconds", "150", "--seed", "7", "--probe-every", "10", "--warmup", "5",
         "--gap", "2:4", "--workdir", str(tmp_path / "work"), "--report", str(report_path)],
        capture_output=True, text=True, timeout=1500, start_new_session=True)
    assert report_path.exists(), done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(report_path.read_text())
    print(done.stdout[-2500:])
    assert report["failed"] == 0, report["failures"]
    assert report["wrong"] == 0, [p for p in report["probe_log"] if p["ok"] is False]
    assert not any(report["overshoots"].values()), report["max"]
    injected = {kind for kind, count in report["faults"].items() if count}
    assert injected | set(report["not_run"]) == set(KINDS), report["fault_log"]
    assert set(report["not_run"]) <= {"disk-full"}, report["not_run"]
    # answers were compared both where nothing came from a cache and where all but the last token did
    assert report["checked_at_depth"]["cold"] >= 1 and report["checked_at_depth"]["hit"] >= 1, report["probe_log"]
    assert done.returncode == 0
