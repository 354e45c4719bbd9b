"""Reaching the node daemon's socket, and starting a detached daemon when none answers.

Kept apart from the client's protocol code: this is process and lock handling (spawn, wait for
the instance's lock, read the daemon's log when it fails to start).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from kvmesh.client.faults import DaemonUnavailable
from kvmesh.config import KVMeshConfig
from kvmesh.socket_dir import UntrustedPath, check_peer, open_private, peer_uid, private_dir

log = logging.getLogger("kvmesh.client")

# how long a spawned daemon may take to import and take its instance's lock before we call it failed
# (imports alone took over 5 s on a loaded 2-core machine)
DAEMON_LOCK_GRACE = 30.0


def connect(config: KVMeshConfig) -> socket.socket:
    """A connection to the instance's daemon, starting one first when none answers and autostart is on."""
    path = config.socket_path()
    sock = try_connect(str(path))
    if sock is not None:
        return sock
    if not config.autostart_daemon:
        raise DaemonUnavailable(
            f"no kvmesh daemon answers on {path}; start one with `kvmesh daemon` "
            "or set autostart_daemon: true")
    try:
        _spawn_daemon(config)
    except UntrustedPath:
        raise  # not a fault of the cache: the setup is unsafe, and says so
    except (OSError, subprocess.SubprocessError) as err:  # no socket directory, no process: no daemon
        raise DaemonUnavailable(f"cannot start a kvmesh daemon for {path}: {err}") from err
    started = time.monotonic()
    while time.monotonic() < started + config.daemon_start_timeout:
        sock = try_connect(str(path))
        if sock is not None:
            return sock
        if time.monotonic() > started + DAEMON_LOCK_GRACE and not daemon_holds_lock(path.with_suffix(".lock")):
            raise DaemonUnavailable(f"the kvmesh daemon failed to start; last lines of "
                                    f"{daemon_log_path(config)}:\n{_tail(daemon_log_path(config))}")
        time.sleep(0.05)
    raise DaemonUnavailable(
        f"started a kvmesh daemon but it did not answer on {path} within "
        f"{config.daemon_start_timeout}s; see {daemon_log_path(config)}")


def daemon_log_path(config: KVMeshConfig) -> str:
    return str(config.socket_path().with_suffix(".log"))


def _spawn_daemon(config: KVMeshConfig) -> None:
    path = config.socket_path()
    private_dir(path.parent)  # this user's own, 0700, or refused (socket_dir.py)
    log.info("starting kvmesh daemon for instance %s", config.instance)
    log_fd = open_private(Path(daemon_log_path(config)), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    with os.fdopen(log_fd, "ab") as out:
        # the settings go through a pipe, not the command line: every user's `ps` shows command lines
        launcher = subprocess.Popen(
            [sys.executable, "-m", "kvmesh.daemon", "--detach", "--config-stdin"],
            stdin=subprocess.PIPE, stdout=out, stderr=out, start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
        assert launcher.stdin is not None
        launcher.stdin.write(json.dumps(config.to_dict()).encode())
        launcher.stdin.close()
    launcher.wait(timeout=30)  # returns as soon as the daemon has forked away


def daemon_holds_lock(lock_path: Path) -> bool:
    """True while some process (a starting or running daemon) holds the instance's lock."""
    try:
        with os.fdopen(open_private(lock_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND), "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(lock, fcntl.LOCK_UN)
            return False
    except OSError:
        return False


def wait_for_lock_release(config: KVMeshConfig, timeout: float) -> None:
    """Wait until the instance's daemon has let go of its lock (it has stopped), at most ``timeout``."""
    lock = config.socket_path().with_suffix(".lock")
    deadline = time.monotonic() + timeout
    while daemon_holds_lock(lock) and time.monotonic() < deadline:
        time.sleep(0.02)


def _tail(path: str, lines: int = 15) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def socket_is_live(path: Path) -> bool:
    """True when a daemon answers on ``path``."""
    sock = try_connect(str(path))
    if sock is None:
        return False
    sock.close()
    return True


def try_connect(path: str) -> socket.socket | None:
    """A connection to the daemon at ``path``, None if none answers; a daemon of another user is refused."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError:
        sock.close()
        return None
    try:
        check_peer(peer_uid(sock), f"the kvmesh daemon on {path}")
    except UntrustedPath:
        sock.close()
        raise
    return sock
