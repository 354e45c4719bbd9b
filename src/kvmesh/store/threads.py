"""Background threads of the store, and the idle scheduling class they run in."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable

from kvmesh.store.types import Priority

log = logging.getLogger("kvmesh.store")


def run_when_idle() -> None:
    """Put the calling thread in the idle scheduling class (else at the lowest nice); best effort.

    Linux schedules a SCHED_IDLE thread only on a core no normal thread wants, and preempts it as soon
    as one does, so writes behind and promotions never take time from an engine's compute threads.
    """
    set_scheduling(threading.get_native_id(), idle=True)


def set_scheduling(tid: int, idle: bool) -> None:
    """Move thread ``tid`` into the idle scheduling class, or into the normal one at nice 19; best effort.

    Back to normal matters when an engine waits: an engine that skips a request while its chunks are
    promoted may keep both cores busy (vLLM's scheduler loop, OpenMP threads spinning), and an idle-class
    thread then never runs (measured: the promotion missed the 5 s wait and the engine computed instead).
    """
    try:
        os.sched_setscheduler(tid, os.SCHED_IDLE if idle else os.SCHED_OTHER, os.sched_param(0))
    except (AttributeError, OSError):
        pass
    try:  # out of the idle class: the lowest normal priority, a small but certain share of a busy core
        os.setpriority(os.PRIO_PROCESS, tid, 19)
    except (AttributeError, OSError):
        log.debug("cannot change a background thread's priority", exc_info=True)


def start_thread(name: str, loop: Callable[[], None], priority: Priority) -> threading.Thread:
    """A daemon thread named ``kvmesh-<name>`` running ``loop`` at ``priority``."""

    def run() -> None:
        if priority == "idle":
            run_when_idle()
        loop()

    thread = threading.Thread(target=run, name=f"kvmesh-{name}", daemon=True)
    thread.start()
    return thread
