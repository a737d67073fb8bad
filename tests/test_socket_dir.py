"""The agent socket's directory: no one else can have made it or be able to swap it.

Regression for the squatting finding: with XDG_RUNTIME_DIR unset the socket used to go
under /tmp/sidecar-<uid>, which another user could create first (mode 0777: they renamed
the sidecar's directory and bound their own agent.sock, receiving the agent's hello and
token; mode 0755: a PermissionError traceback).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from sidecar.adapters.agent_socket import SocketPathError, prepare_socket_path
from sidecar.cli import EXIT_CONFIG, main
from sidecar.config import load_config

OTHER_UID = 12345
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")


def test_default_socket_is_never_in_a_shared_directory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    assert load_config(environ={}).agent.socket == "/run/sidecar/agent.sock"
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1000")
    xdg = load_config(environ={}).agent.socket
    assert xdg == "/run/user/1000/sidecar/agent.sock"


def test_directories_the_sidecar_creates_are_0700_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        prepare_socket_path(tmp_path / "a" / "b" / "agent.sock")
    finally:
        os.umask(old)
    for level in (tmp_path / "a", tmp_path / "a" / "b"):
        info = os.lstat(level)
        assert stat.S_IMODE(info.st_mode) == 0o700
        assert info.st_uid == os.geteuid()


def test_a_group_socket_gets_a_directory_its_group_can_enter(tmp_path: Path) -> None:
    # A pod's emptyDir: writable by every container, group-sticky for the pod's fsGroup.
    shared = tmp_path / "run-sidecar"
    shared.mkdir()
    os.chmod(shared, 0o2777)
    prepare_socket_path(shared / "sock" / "agent.sock", socket_mode=0o660)
    mode = stat.S_IMODE(os.lstat(shared / "sock").st_mode)
    assert mode & 0o777 == 0o750  # the group may enter, nobody else may write
    # The shared directory itself is refused for the socket: others may write to it.
    with pytest.raises(SocketPathError, match="others may write"):
        prepare_socket_path(shared / "agent.sock", socket_mode=0o660)


@needs_root
@pytest.mark.parametrize("squatter_mode", [0o777, 0o755])
def test_a_directory_someone_else_made_first_is_refused(tmp_path: Path, squatter_mode: int) -> None:
    squatted = tmp_path / f"sidecar-{os.geteuid()}"
    squatted.mkdir()
    os.chown(squatted, OTHER_UID, OTHER_UID)
    os.chmod(squatted, squatter_mode)
    # As the socket directory itself, and as the parent of one the sidecar would create.
    with pytest.raises(SocketPathError, match=f"owned by uid {OTHER_UID}"):
        prepare_socket_path(squatted / "agent.sock")
    with pytest.raises(SocketPathError, match=f"owned by uid {OTHER_UID}"):
        prepare_socket_path(squatted / "sidecar" / "agent.sock")


@needs_root
def test_run_refuses_a_squatted_directory_with_one_line_exit_3(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    squatted = tmp_path / "squatted"
    squatted.mkdir(mode=0o755)
    os.chown(squatted, OTHER_UID, OTHER_UID)
    code = main(["run", "--socket", str(squatted / "agent.sock"), "--store", str(tmp_path / "d")])
    assert code == EXIT_CONFIG
    err = capsys.readouterr().err.strip()
    assert "unsafe agent socket" in err and "Traceback" not in err
    assert len(err.splitlines()) == 1
    assert not (squatted / "agent.sock").exists()


def test_a_symlinked_directory_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(SocketPathError, match="symlink"):
        prepare_socket_path(tmp_path / "link" / "agent.sock")
    with pytest.raises(SocketPathError, match="symlink"):
        prepare_socket_path(tmp_path / "link" / "sub" / "agent.sock")


def test_a_socket_directory_others_can_write_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    with pytest.raises(SocketPathError, match="others may write"):
        prepare_socket_path(shared / "agent.sock")


def test_a_parent_of_ours_that_others_can_write_is_refused(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root-owned parents are trusted (a pod's shared volume)")
    parent = tmp_path / "open"
    parent.mkdir()
    os.chmod(parent, 0o777)
    with pytest.raises(SocketPathError, match="others may rename"):
        prepare_socket_path(parent / "sidecar" / "agent.sock")


def test_a_stale_socket_of_ours_is_replaced_and_other_files_are_not(tmp_path: Path) -> None:
    import socket

    directory = tmp_path / "run"
    directory.mkdir(mode=0o700)
    path = directory / "agent.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))
    prepare_socket_path(path)
    assert not path.exists()
    path.write_text("not a socket")
    with pytest.raises(SocketPathError, match="not a socket"):
        prepare_socket_path(path)
