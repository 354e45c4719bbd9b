"""Trust on one node: the daemon's directory, its files and its peers belong to the user who runs kvmesh.

Without ``XDG_RUNTIME_DIR`` (containers, services) the daemon's socket, lock and log live in
``/tmp/kvmesh-<uid>``, a name any local user can take first: whoever created that directory could put their
own socket there and receive every saved KV or serve forged KV.  So the directory must be this user's own,
a real directory and mode 0700, or kvmesh refuses to use it; its files are opened without following
symlinks; and both ends of a connection check that the other runs as this user (``SO_PEERCRED``).
"""

from __future__ import annotations

import os
import socket
import stat
import struct
from pathlib import Path

DIR_MODE = 0o700
FILE_MODE = 0o600
_PEERCRED = struct.Struct("3i")  # pid, uid, gid


class UntrustedPath(PermissionError):
    """The socket directory, or a peer on the socket, is not this user's own."""


def private_dir(path: Path) -> Path:
    """``path`` created with mode 0700, or checked: a directory (not a symlink) of this user, mode 0700."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        path.mkdir(mode=DIR_MODE)
    except FileExistsError:
        pass
    info = os.lstat(path)
    me = os.geteuid()
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise UntrustedPath(f"kvmesh's socket directory {path} is not a directory but a "
                            f"{'symlink' if stat.S_ISLNK(info.st_mode) else 'file'}; remove it, or set "
                            "socket_dir to a directory of your own")
    if info.st_uid != me:
        raise UntrustedPath(f"kvmesh's socket directory {path} belongs to uid {info.st_uid}, not to you "
                            f"(uid {me}): another user could serve or read your KV there; remove it, or set "
                            "socket_dir to a directory of your own")
    if stat.S_IMODE(info.st_mode) & 0o077:
        raise UntrustedPath(f"kvmesh's socket directory {path} has mode {oct(stat.S_IMODE(info.st_mode))}: "
                            f"other users could place a socket there; `chmod 700 {path}`, or set socket_dir "
                            "to a private directory")
    return path


def open_private(path: Path, flags: int) -> int:
    """A file descriptor of ``path`` opened with ``flags``, created 0600, never through a symlink."""
    return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)


def peer_uid(sock: socket.socket) -> int:
    """The uid of the process at the other end of a Unix socket."""
    _, uid, _ = _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
    return uid


def check_peer(uid: int, what: str) -> None:
    """Refuse a peer that runs as another user (root, which can read any memory anyway, is allowed)."""
    if uid not in (os.geteuid(), 0):
        raise UntrustedPath(f"{what} runs as uid {uid}, not as you (uid {os.geteuid()}); refused")
