"""Engine processes load no codec or Redis library, and none of the daemon's modules."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("numba", "llvmlite", "zstandard", "lz4", "redis")


def _modules_after(code: str) -> list[str]:
    probe = code + (
        "\nimport json, sys\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.partition('.')[0] in {HEAVY!r})))\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    return json.loads(out.splitlines()[-1])


def test_the_engine_side_modules_import_no_codec_library() -> None:
    assert _modules_after("import kvmesh.client, kvmesh.integrations.vllm.scheduler, "
                          "kvmesh.integrations.vllm.worker, kvmesh.integrations.vllm.planner") == []


def test_reading_a_config_that_names_compressing_codecs_imports_none_of_them() -> None:
    code = ("import kvmesh.client\nfrom kvmesh.config import KVMeshConfig\n"
            "KVMeshConfig.load({'codec': 'ecq', 'disk_codec': 'lossless:compressor=lz4', 'redis_codec': 'kivi'})")
    assert _modules_after(code) == []


def test_a_codec_that_runs_loads_what_it_needs() -> None:
    code = ("import torch\nfrom kvmesh.codecs import get_codec\n"
            "get_codec('ecq').encode(torch.zeros(1, 2, 16, 1, 16, dtype=torch.bfloat16))")
    assert {"numba", "zstandard"} <= {name.partition(".")[0] for name in _modules_after(code)}


def test_the_engine_side_modules_import_nothing_of_the_daemon() -> None:
    probe = ("import kvmesh.client, kvmesh.integrations.vllm.scheduler, kvmesh.integrations.vllm.worker\n"
             "import sys\nprint(sorted(m for m in sys.modules if m.startswith(('kvmesh.store', 'kvmesh.codecs', "
             "'kvmesh.daemon', 'kvmesh.tiers.disk', 'kvmesh.tiers.redis', 'kvmesh.tiers.memory'))))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[-1] == "[]"
