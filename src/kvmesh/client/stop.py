"""Stopping a daemon for good, including one an engine was still starting in the background (tests, benchmarks)."""

from __future__ import annotations

import time

from kvmesh.client import KVMeshClient
from kvmesh.client.spawn import daemon_holds_lock
from kvmesh.config import KVMeshConfig


def stop_daemon(config: KVMeshConfig, timeout: float = 30.0, settle: float = 0.0) -> None:
    """Shut the instance's daemon down, and one that is still starting (it holds the lock, not yet the socket).

    Engines re-make a lost link on a background thread, which may start a (detached) daemon just before the
    engine is stopped; a test that only asked the socket once would leave that daemon running.  ``settle``:
    after the last one is gone, keep watching this long for a daemon whose launcher outlived its engine
    (seen once in a clean-clone run, ~8 s after the engine stopped), and stop it too.
    """
    _stop_now(config, timeout)
    watch_until = time.monotonic() + settle
    lock = config.socket_path().with_suffix(".lock")
    while time.monotonic() < watch_until:
        if daemon_holds_lock(lock) or config.socket_path().exists():
            _stop_now(config, timeout)
        time.sleep(0.2)


def _stop_now(config: KVMeshConfig, timeout: float) -> None:
    observer = KVMeshConfig.from_mapping({"autostart_daemon": False}, base=config)
    lock = config.socket_path().with_suffix(".lock")
    deadline = time.monotonic() + timeout
    while True:
        try:
            with KVMeshClient(observer, check_config=False) as client:
                client.shutdown_daemon()
        except ConnectionError as err:
            if not daemon_holds_lock(lock):
                return
            if time.monotonic() > deadline:  # the last answer says why (another protocol version, no socket)
                raise TimeoutError(f"a kvmesh daemon for {config.socket_path()} holds its lock but could not be "
                                   f"stopped within {timeout:g} s: {err}") from None
            time.sleep(0.1)
