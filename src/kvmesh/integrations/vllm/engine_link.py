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
import threading
import time
from collections import Counter
from typing import Any

from kvmesh.client import CacheFault, ConfigMismatch, DaemonUnavailable, KVMeshClient
from kvmesh.config import KVMeshConfig

log = logging.getLogger("kvmesh.vllm")

RECONNECT_SECONDS = 10.0  # after a failed connection, how long requests run without cache before the next try
LOST_BACKOFF_SECONDS = 1.0  # after a call lost the daemon (or its deadline passed), before the next try
# what a connector call may absorb as "no cache this time"; everything else propagates
ABSORBED = (CacheFault, ConfigMismatch)


class DaemonLink:
    def __init__(self, config: KVMeshConfig, engine: dict[str, Any] | None = None) -> None:
        self.config = config
        self.engine = engine or {}
        self._client: KVMeshClient | None = None
        self._retry_at = 0.0
        self._warned: set[str] = set()
        self._lock = threading.Lock()  # guards _client and _connecting against the reconnecting thread
        self._connecting = False
        self._unreported: Counter[str] = Counter()  # faults of a lost link, counted once it is re-made

    def connect_at_start(self) -> None:
        """Reach (or start) the daemon while the engine starts; a mismatching daemon stops the engine."""
        self._open(absorbed=(CacheFault,))

    def client(self) -> KVMeshClient | None:
        """The daemon connection; None (a miss) while there is none.

        A lost connection is re-made on a background thread (which may start a daemon, taking seconds),
        never on the caller's: the engine's scheduler and forward pass run on, without cache meanwhile.
        """
        with self._lock:
            if self._client is not None or self._connecting or time.monotonic() < self._retry_at:
                return self._client
            self._connecting = True
        threading.Thread(target=self._reconnect, name="kvmesh-reconnect", daemon=True).start()
        return None

    def _reconnect(self) -> None:
        try:
            self._open(absorbed=ABSORBED)
        finally:
            with self._lock:
                self._connecting = False

    def _open(self, absorbed: tuple[type[BaseException], ...]) -> None:
        try:
            client = KVMeshClient(self.config, engine=self.engine)
        except absorbed as err:
            self._retry_at = time.monotonic() + RECONNECT_SECONDS
            self.fault("connect", f"kvmesh daemon unavailable, serving without cache: {err}", err)
        else:
            with self._lock:
                self._client = client
            unreported, self._unreported = self._unreported, Counter()
            for kind, times in unreported.items():  # faults met while the link was down
                for _ in range(times):
                    self.count(kind)

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
        if isinstance(err, DaemonUnavailable):  # the link is broken: drop it, back off, count once re-made
            self._unreported[kind] += 1
            self._drop_client()
            self._retry_at = max(self._retry_at, time.monotonic() + LOST_BACKOFF_SECONDS)
        else:
            self.count(kind)

    def count(self, kind: str) -> None:
        """Count a fault in the daemon's metrics, if one is reachable (best effort: it may be the fault)."""
        if self._client is not None:
            try:
                self._client.report_error(kind)
            except DaemonUnavailable:
                pass

    def _drop_client(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()

    def close(self) -> None:
        self._drop_client()
