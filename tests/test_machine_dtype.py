"""The dtype engines run in by default: bf16 where the CPU has it natively, fp32 where it would be emulated."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from kvmesh import machine_dtype as md
from kvmesh.integrations.vllm.serve import build_serve_command

AVX2_EPYC = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx avx2 fma avx512f\n\n"
ZEN4 = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 avx512_vnni\n"
SAPPHIRE_RAPIDS = "processor\t: 0\nflags\t\t: avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8\n"
GRAVITON3 = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n"
GRAVITON2 = "processor\t: 0\nFeatures\t: fp asimd aes crc32\n"


@pytest.mark.parametrize("cpuinfo, machine, expected", [
    (AVX2_EPYC, "x86_64", "float32"),
    (ZEN4, "x86_64", "bfloat16"),
    (SAPPHIRE_RAPIDS, "x86_64", "bfloat16"),
    (GRAVITON3, "aarch64", "bfloat16"),
    (GRAVITON2, "aarch64", "float32"),
    ("", "x86_64", "bfloat16"),  # flags unreadable: vLLM's own choice
    (AVX2_EPYC, "ppc64le", "bfloat16"),  # a CPU whose bf16 flags kvmesh does not know: vLLM's own choice
])
def test_the_choice_follows_the_cpus_native_bf16(cpuinfo: str, machine: str, expected: str) -> None:
    choice = md.choose_dtype(md.cpu_flags(cpuinfo), machine)
    assert choice.dtype == expected
    assert choice.reason


def test_the_reason_names_what_the_cpu_has_or_lacks() -> None:
    assert "amx_bf16" in md.choose_dtype(md.cpu_flags(SAPPHIRE_RAPIDS), "x86_64").reason
    lacking = md.choose_dtype(md.cpu_flags(AVX2_EPYC), "x86_64").reason
    assert "avx512_bf16" in lacking and "amx_bf16" in lacking


@pytest.fixture
def fake_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """This process's machine choice as if it ran on another CPU (a real machine cannot change its CPU)."""
    def use(cpuinfo: str, machine: str = "x86_64") -> None:
        path = tmp_path / "cpuinfo"
        path.write_text(cpuinfo)
        monkeypatch.setattr(md, "CPUINFO", path)
        monkeypatch.setattr(md.platform, "machine", lambda: machine)
        md.machine_dtype.cache_clear()

    yield use
    md.machine_dtype.cache_clear()


def test_the_choice_is_logged_once_per_process(fake_cpu, caplog: pytest.LogCaptureFixture) -> None:
    fake_cpu(AVX2_EPYC)
    with caplog.at_level(logging.INFO, logger="kvmesh"):
        first, second = md.machine_dtype(), md.machine_dtype()
    assert first == second and first.dtype == "float32"
    lines = [r.getMessage() for r in caplog.records if "engines run in" in r.getMessage()]
    assert len(lines) == 1 and "float32" in lines[0] and "no native bf16" in lines[0]


def test_serve_adds_the_machines_dtype_when_the_user_gives_none(fake_cpu) -> None:
    fake_cpu(AVX2_EPYC)
    command = build_serve_command("m", ["--port", "8001"], {})
    assert command.argv[command.argv.index("--dtype") + 1] == "float32"
    assert command.dtype_choice is not None and command.dtype_choice.dtype == "float32"
    fake_cpu(SAPPHIRE_RAPIDS)
    command = build_serve_command("m", ["--port", "8001"], {})
    assert command.argv[command.argv.index("--dtype") + 1] == "bfloat16"


@pytest.mark.parametrize("given", [["--dtype", "bfloat16"], ["--dtype=bfloat16"], ["--dtype", "auto"]])
def test_an_explicit_dtype_always_wins(fake_cpu, given: list[str]) -> None:
    fake_cpu(AVX2_EPYC)
    command = build_serve_command("m", [*given, "--port", "8001"], {})
    assert command.dtype_choice is None
    assert sum(a == "--dtype" or a.startswith("--dtype=") for a in command.argv) == 1
    assert command.argv[-len(given) - 2:] == [*given, "--port", "8001"]


def test_a_dtype_flag_without_its_value_is_refused() -> None:
    with pytest.raises(ValueError, match="--dtype needs a value"):
        build_serve_command("m", ["--port", "8001", "--dtype"], {})
