"""An engine process's link to the node daemon: connect, reconnect, and tell cache faults from bugs.

Both sides of the vLLM connector (scheduler and worker) hold one.  The failure contract lives here:

* a **cache fault** (:class:`~kvmesh.client.CacheFault`: daemon gone or restarted, a lease that expired)
  is a miss or a reported load failure; the first of each kind is logged with its cause, every one is
  counted in the daemon's ``kvmesh_errors_total{kind}``;
* a daemon that runs with **other settings** (:class:`~kvmesh.client.ConfigMismatch`) stops the engine
  at start-up; met later (another engine restarted the daemon with its own settings), it is logged as
  an error every time and the engine runs without cache until the daemon agrees again;
* **anything else** (a refused request, a programming error, an unsupported device) is not caught here:
  it reaches vLLM, which logs the traceback.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from kvmesh.client import CacheFault, ConfigMismatch, DaemonUnavailable, KVMeshClient
from kvmesh.config import KVMeshConfig

log = logging.getLogger("kvmesh.vllm")

RECONNECT_SECONDS = 10.0  # after a failed connection, how long requests run without cache before the next try
# what a connector call may absorb as "no cache this time"; everything else propagates
ABSORBED = (CacheFault, ConfigMismatch)


class DaemonLink:
    def __init__(self, config: KVMeshConfig, engine: dict[str, Any] | None = None) -> None:
        self.config = config
        self.engine = engine or {}
        self._client: KVMeshClient | None = None
        self._retry_at = 0.0
        self._warned: set[str] = set()

    def connect_at_start(self) -> None:
        """Reach (or start) the daemon while the engine starts; a mismatching daemon stops the engine."""
        self._open(absorbed=(CacheFault,))

    def client(self) -> KVMeshClient | None:
        """The daemon connection, opened on first use; None (a miss) while no usable daemon can be had."""
        if self._client is None and time.monotonic() >= self._retry_at:  # a recent failure waits its turn
            self._open(absorbed=ABSORBED)
        return self._client

    def _open(self, absorbed: tuple[type[BaseException], ...]) -> None:
        try:
            self._client = KVMeshClient(self.config, engine=self.engine)
        except absorbed as err:
            self._retry_at = time.monotonic() + RECONNECT_SECONDS
            self.fault("connect", f"kvmesh daemon unavailable, serving without cache: {err}", err)

    def fault(self, kind: str, message: str, err: BaseException) -> None:
        """Record a fault of the cache: logged once per kind (a config mismatch every time), counted."""
        if isinstance(err, ConfigMismatch):
            log.error("%s", message)
            self._drop_client()
            self._retry_at = time.monotonic() + RECONNECT_SECONDS
            return
        if not isinstance(err, CacheFault):
            raise TypeError(f"{type(err).__name__} is not a cache fault") from err
        if kind not in self._warned:
            self._warned.add(kind)
            log.warning("%s", message)
        self.count(kind)

    def count(self, kind: str) -> None:
        """Count a fault in the daemon's metrics, if one is reachable (best effort: it may be the fault)."""
        if self._client is not None:
            try:
                self._client.report_error(kind)
            except DaemonUnavailable:
                pass

    def _drop_client(self) -> None:
        if self._client is not None:
            try:
                self._client.close()
            finally:
                self._client = None

    def close(self) -> None:
        self._drop_client()
