"""The daemon's directory, files and peers belong to the user who runs kvmesh, or kvmesh refuses them."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from kvmesh.client import KVMeshClient
from kvmesh.config import KVMeshConfig
from kvmesh.socket_dir import UntrustedPath, check_peer, open_private, private_dir


def _config(socket_dir: Path) -> KVMeshConfig:
    return KVMeshConfig.from_mapping({"socket_dir": str(socket_dir), "instance": "trust", "l1_size": "16MiB",
                                      "l1_prefault": False, "http_port": 0})


def test_a_new_directory_is_private_and_so_are_the_daemons_files(tmp_path: Path) -> None:
    config = _config(tmp_path / "new" / "kvmesh")
    with KVMeshClient(config) as client:
        try:
            directory = config.socket_path().parent
            assert stat.S_IMODE(directory.stat().st_mode) == 0o700
            for suffix in (".lock", ".log"):
                assert stat.S_IMODE(config.socket_path().with_suffix(suffix).stat().st_mode) & 0o077 == 0
        finally:
            client.shutdown_daemon()


def test_a_directory_others_can_write_is_refused_before_any_daemon_starts(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)  # as a /tmp/kvmesh-<uid> another user created first would be
    with pytest.raises(UntrustedPath, match=r"mode 0o777.*chmod 700"):
        KVMeshClient(_config(shared))
    assert list(shared.iterdir()) == []  # no socket, lock or log was made there


def test_a_symlinked_directory_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(target)
    with pytest.raises(UntrustedPath, match="symlink"):
        private_dir(tmp_path / "link")


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a directory to another user needs root")
def test_a_directory_of_another_user_is_refused(tmp_path: Path) -> None:
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, 65534, 65534)
    with pytest.raises(UntrustedPath, match="belongs to uid 65534"):
        private_dir(theirs)


def test_files_are_never_opened_through_a_symlink(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    (tmp_path / "kv.lock").symlink_to(victim)
    with pytest.raises(OSError):
        open_private(tmp_path / "kv.lock", os.O_WRONLY | os.O_CREAT)
    assert victim.read_text() == "keep me"


def test_a_peer_of_another_user_is_refused() -> None:
    check_peer(os.geteuid(), "this process")
    other = 65534 if os.geteuid() != 65534 else 65533
    with pytest.raises(UntrustedPath, match=f"uid {other}"):
        check_peer(other, "a client")
