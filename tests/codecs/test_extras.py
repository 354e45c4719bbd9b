"""A codec whose library (the ``codecs`` extra) is missing says how to install it; raw needs none."""

from __future__ import annotations

import subprocess
import sys

import pytest

RUN = """
import sys
for name in {blocked!r}:
    sys.modules[name] = None  # as if not installed
import torch
from kvmesh.codecs import MissingCodecDependency, decode_any, get_codec
{body}
"""


def _run(blocked: tuple[str, ...], body: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", RUN.format(blocked=blocked, body=body)], capture_output=True,
                          text=True, check=False)


@pytest.mark.parametrize(("blocked", "spec", "missing"), [
    (("numba",), "ecq", "numba"), (("zstandard",), "cachegen", "zstandard"), (("lz4",), "lossless:compressor=lz4",
                                                                             "lz4"),
    (("numba",), "fp8", "numba"), (("numba",), "kivi", "numba"),
])
def test_a_codec_without_its_library_is_refused_when_built_naming_the_extra(blocked, spec, missing) -> None:
    body = f"""
try:
    get_codec({spec!r})
except MissingCodecDependency as err:
    print(err)
"""
    result = _run(blocked, body)
    assert result.returncode == 0, result.stderr
    assert f"needs {missing}" in result.stdout and "pip install 'kvmesh[codecs]'" in result.stdout


def test_raw_entries_need_no_codec_library() -> None:
    body = """
chunk = torch.arange(64, dtype=torch.float32).to(torch.bfloat16).view(1, 2, 4, 1, 8)
data = get_codec('raw').encode(chunk, 'chunk')
assert torch.equal(decode_any(data), chunk)
print('ok')
"""
    result = _run(("numba", "zstandard", "lz4"), body)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_decoding_an_entry_whose_codec_cannot_run_names_the_extra() -> None:
    """Unreadable here, not corrupt: a node without the extra leaves such entries to the nodes that have it."""
    body = """
import base64
from kvmesh.codecs import UnreadableEntry
data = base64.b64decode(sys.argv[1])
try:
    decode_any(data)
except UnreadableEntry as err:
    print(err)
"""
    import base64

    import torch

    from kvmesh.codecs import get_codec

    data = get_codec("ecq").encode(torch.ones(1, 2, 16, 1, 16, dtype=torch.bfloat16))
    result = subprocess.run([sys.executable, "-c", RUN.format(blocked=("numba",), body=body),
                             base64.b64encode(data).decode()], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert "numba" in result.stdout and "pip install 'kvmesh[codecs]'" in result.stdout
