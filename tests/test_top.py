"""`kvmesh top`: one frame over a real daemon that served lookups and stores during the interval."""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import torch
from typer.testing import CliRunner

from kvmesh.cli import app
from kvmesh.client import KVMeshClient
from kvmesh.config import KVMeshConfig
from kvmesh.keys import chunk_keys, model_namespace
from kvmesh.top import Snapshot, render

NS = model_namespace("top-model", "L4.H2.D32.bfloat16")


def _config(tmp_path: Path, **extra: object) -> KVMeshConfig:
    return KVMeshConfig.from_mapping({"socket_dir": str(tmp_path / "sock"), "instance": "top-test", "l1_size": "16MiB",
                                      "l1_prefault": False, "http_port": 0, **extra})


def test_one_frame_shows_the_intervals_hit_rate_and_each_tier(tmp_path: Path) -> None:
    config = _config(tmp_path, disk_path=str(tmp_path / "disk"))
    keys = chunk_keys(list(range(2000, 2512)), NS, 128)
    chunks = [torch.randn(4, 2, 128, 2, 32).to(torch.bfloat16) for _ in keys]
    with KVMeshClient(config) as client:
        try:
            client.put(keys[:2], chunks[:2])
            old = Snapshot.of(client.info(), 0.0)
            assert client.lookup(keys) == 2  # 256 of 512 tokens found
            new = Snapshot.of(client.info(), 2.0)
            frame = _text(render(new, old, config.instance))
            assert "hit rate 50.0% of 512 tokens asked" in frame
            assert "l1" in frame and "disk" in frame and "closed" not in frame  # a disk has no breaker

            done = threading.Event()

            def traffic() -> None:  # lookups all through the command's interval
                with KVMeshClient(config) as other:
                    while not done.is_set():
                        other.lookup(keys)
                        time.sleep(0.05)

            thread = threading.Thread(target=traffic)
            thread.start()
            try:
                result = CliRunner().invoke(app, ["top", "--once", "--interval", "1", "--set",
                                                  f"socket_dir={config.socket_dir}", "--set", "instance=top-test"])
            finally:
                done.set()
                thread.join()
            assert result.exit_code == 0, result.output
            assert "kvmesh daemon 'top-test'" in result.output
            assert re.search(r"hit rate 50\.0% of [1-9][\d,]* tokens asked", " ".join(result.output.split()))
            assert "engines connected" in result.output
        finally:
            client.shutdown_daemon()


def test_top_without_a_daemon_says_so(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["top", "--once", "--interval", "0.1", "--set",
                                      f"socket_dir={tmp_path / 'none'}", "--set", "instance=nobody"])
    assert result.exit_code == 1


def _text(renderable) -> str:
    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(renderable)
    return console.export_text()


def test_explain_prints_a_recent_requests_summary_and_names_an_unknown_one(tmp_path: Path) -> None:
    config = _config(tmp_path)
    args = ["--set", f"socket_dir={tmp_path / 'sock'}", "--set", "instance=top-test"]
    with KVMeshClient(config) as client:
        try:
            for index in range(3):
                client.record_request(f"cmpl-{index}-0-ab12", {"prompt_tokens": 1000 + index, "kvmesh_hit_tokens": 512,
                                                        "reason": f"reason number {index}",
                                                        "hit_tokens_by_tier": {"l1": 256, "disk": 256},
                                                        "promotion_seconds": 0.0125, "load_seconds": 0.003})
            # the response's id: vLLM's request id without its "-0-<suffix>"
            one = CliRunner().invoke(app, ["explain", "--request", "cmpl-1", "--json", *args])
            assert one.exit_code == 0, one.output
            assert '"prompt_tokens": 1001' in one.output and "reason number 1" in one.output
            assert "cmpl-0" not in one.output
            table = CliRunner().invoke(app, ["explain", "--recent", "2", *args], env={"COLUMNS": "240"})
            assert "cmpl-2" in table.output and "cmpl-1" in table.output and "cmpl-0" not in table.output
            assert "512 (l1 256, disk 256)" in table.output and "12.5 + 3.0 ms" in table.output
            missing = CliRunner().invoke(app, ["explain", "--request", "cmpl-9", *args])
            assert missing.exit_code == 1 and "no request 'cmpl-9'" in missing.output
        finally:
            client.shutdown_daemon()
